"""Configs of the attack experiment (PGD on CLIP and on CLIPure-Cos).

  python -m experiments.attack                         # embedded default: toy CLIP, toy test split
  python -m experiments.attack --config=experiments/configs/attack.py:cifar10,vit_b32,strong --workdir=DIR
  python -m experiments.attack --config.linf.eps=0.0156862745 --config.clipure.step_size=0.5

The argument after ':' is a comma-separated list of variants, applied in order:
  datasets   toy | cifar10 | imagenet
  backbones  toy | vit_b32 | vit_b16 | vit_l14 | rn50 | rn101 | openclip_vit_b32
  scale      quick (CI-sized: 20 images, 3 steps, 1 restart)
             | strong (100 steps, 5 restarts)
  blank      single_blank (the paper's "a photo of a ."; default: the mean
             over the dataset's templates, as the official code's t_blank)
  gradients  masking (CLIPure-Cos attacked with each gradient, full,official,bpda,
             at the official step size and at the per-image steps 30 / sqrt(B)
             of batches B = 2, 32, 256: gradient masking measured side by side)
Any field can then be set with --config.FIELD=VALUE (`--help` lists them all).

Default threat models, in [0, 1] pixel units before CLIP preprocessing:
L-inf eps = 4/255 (step 1/255) and L2 eps = 0.5 (step 0.1), 20 PGD steps,
2 restarts, on every 2nd toy test image (500 images).
"""

from ml_collections import config_dict

from experiments.configs.certify import BACKBONES

# What --help says about the variants (experiments.common.config_help).
VARIANTS = """datasets toy | cifar10 | imagenet;
backbones toy | vit_b32 | vit_b16 | vit_l14 | rn50 | rn101 | openclip_vit_b32;
scale quick (CI-sized: 20 images, 3 steps, 1 restart) | strong (100 steps, 5
restarts); blank single_blank (the paper's "a photo of a ."; default: the mean
over the dataset's templates); gradients masking (CLIPure-Cos under the full,
official and bpda attack gradients, at step size 30 and 30 / sqrt(B) for B = 2,
32, 256)"""
EXAMPLE_VARIANTS = "cifar10,vit_b32,strong"

# Every `skip`-th test image: toy 500 of 1,000; CIFAR-10 500 of 10,000;
# ImageNet 500 of 50,000 (Cohen et al.'s subsets).
DATASET_SKIP = {"toy": 2, "cifar10": 20, "imagenet": 100}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # What is attacked.
  c.dataset = "toy"
  c.data_dir = ""             # empty: the dataset's default location
  c.backbone = "toy"
  c.tokenizer = ""            # empty: the backbone's own tokenizer files
  c.dtype = "float32"
  c.classes = ""              # empty: the dataset's class names; or a file / comma list
  # The zero-shot prompt; empty: the dataset's first template.
  c.prompt = "a photo of a {}."
  c.skip = DATASET_SKIP["toy"]
  c.max = -1                  # stop at this dataset index (-1: none), as certify's
  c.batch_size = 50           # images attacked at once
  c.seed = 0                  # random starts: fold_in(key(seed), dataset index)
  c.logit_scale = 100.0       # cross-entropy logits = scale * cos (CLIP's 100)
  # PGD (Madry et al.), both norms.
  c.steps = 20
  c.restarts = 2
  c.linf = config_dict.ConfigDict()
  c.linf.eps = 4 / 255
  c.linf.step_size = 1 / 255
  c.l2 = config_dict.ConfigDict()
  c.l2.eps = 0.5
  c.l2.step_size = 0.1
  # CLIPure-Cos (the official defaults).
  c.clipure = config_dict.ConfigDict()
  c.clipure.steps = 10
  c.clipure.step_size = 30.0
  # "templates": the mean over blank_templates; "single": "a photo of a .".
  c.clipure.blank = "templates"
  # How PGD differentiates through the purification: a comma list of
  # full (exact), official (each step's direction detached, as the official
  # code) and bpda (identity on the backward pass); one CLIPure-Cos column each.
  c.clipure.attack_gradients = "full"
  # Batch sizes B whose official step (~ step_size / sqrt(B) per image, the
  # official code normalising over the batch) get CLIPure-Cos columns of their
  # own, per image; empty: the step size above only.
  c.clipure.batch_equivalents = ()
  # Official against full gradient (and where purification puts embeddings)
  # on the first this many selected images; 0: not measured.
  c.clipure.gradient_path_images = 0
  c.blank_templates = ""      # empty: the dataset's templates; or a file / ';' list

  for variant in filter(None, (arg or "").split(",")):
    _apply(c, variant.strip())
  return c


def _apply(c: config_dict.ConfigDict, variant: str) -> None:
  if variant in DATASET_SKIP:
    c.dataset = variant
    c.skip = DATASET_SKIP[variant]
  elif variant in BACKBONES:
    c.backbone = BACKBONES[variant]
  elif variant == "quick":
    c.skip, c.steps, c.restarts, c.batch_size = 50, 3, 1, 10
  elif variant == "strong":
    c.steps, c.restarts = 100, 5
  elif variant == "single_blank":
    c.clipure.blank = "single"
  elif variant == "masking":
    c.clipure.attack_gradients = "full,official,bpda"
    c.clipure.batch_equivalents = (2, 32, 256)
    c.clipure.gradient_path_images = 8
  else:
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown attack config variant {variant!r}; "
                     "the variants are: " + " ".join(VARIANTS.split()))
