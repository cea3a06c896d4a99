"""Configs of the paper's experiments (docs/METHOD.md, section 6).

  python -m experiments.paper --workdir=workdirs/paper                         # embedded default, CPU
  python -m experiments.paper --workdir=DIR \
      --config=experiments/configs/paper.py:cifar10,paper --config.backbones=vit_b32,rn50,openclip_vit_b32

Variants: datasets toy | cifar10 | imagenet; scale ci (tiny, for tests) |
paper (n = 100,000, Cohen's subsampling, sigma in {0.12, 0.25, 0.5, 1.0}).
Backbones are names of experiments/configs/certify.py's BACKBONES.
"""

from ml_collections import config_dict

from ovc_jax.dataset_settings import DEFAULT_SKIP


# What --help says about the variants (experiments.common.config_help).
VARIANTS = """datasets toy | cifar10 | imagenet; scale ci (tiny, for tests) |
paper (n = 100,000, Cohen's subsampling, sigma in {0.12, 0.25, 0.5, 1.0});
sequential (also sequential CERTIFY beside fixed-n at n, per backbone).
--config.backbones takes names of experiments/configs/certify.py's BACKBONES
(toy, vit_b32, vit_b16, vit_l14, rn50, rn101, openclip_vit_b32)"""
EXAMPLE_VARIANTS = "cifar10,paper"


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.backbones = ("toy",)
  c.dataset = "toy"
  c.data_dir = ""
  c.download = False  # cifar10: fetch the verified archive into data_dir first
  c.noise_spaces = ("normalized", "pixel")
  c.sigmas = (0.12, 0.25, 0.5)
  c.n0 = 100
  c.n = 4000
  c.n_p = 2000
  c.gamma = 0.01
  c.alpha = 0.001
  c.batch_size = 1000
  c.skip = 100     # 10 toy-world test images
  c.max = -1
  c.num_novel = 3
  c.seed = 0
  c.mvn_delta = 0.025  # see README "MVN-OVC's margin"
  c.dtype = "float32"
  # The `sequential` variant: sequential CERTIFY beside fixed-n per backbone.
  c.sequential = False
  c.sequential_max_radius_sigmas = 2.0
  for variant in filter(None, (arg or "").split(",")):
    variant = variant.strip()
    if variant in DEFAULT_SKIP:
      c.dataset = variant
      c.skip = DEFAULT_SKIP[variant]
    elif variant == "ci":
      c.sigmas = (0.25, 0.5)
      # The sizes of the tests' CI-sized certify runs, whose programs a
      # shared compilation cache then holds.
      c.n0, c.n, c.n_p, c.batch_size = 50, 400, 200, 200
      c.gamma = 0.05
      c.skip, c.max = 500, -1
    elif variant == "sequential":
      c.sequential = True
    elif variant == "paper":
      c.sigmas = (0.12, 0.25, 0.5, 1.0)
      c.n0, c.n, c.n_p = 100, 100_000, 10_000
    else:
      # SystemExit, not ValueError: ml_collections would print a traceback.
      raise SystemExit(f"error: unknown paper config variant {variant!r}; "
                       "the variants are: toy, cifar10, imagenet, ci, paper, "
                       "sequential")
  return c
