"""Configs of the toy CLIP training run.

  python -m experiments.train_toy_clip --workdir=workdirs/toy_clip    # the committed model
  python -m experiments.train_toy_clip --config=experiments/configs/train_toy_clip.py:tiny \
      --workdir=/tmp/tiny --export_dir=/tmp/tiny_export                # seconds: a smoke test

Variants after ':' (comma-separated): 'tiny' (a few steps of a very small
model, for tests), 'no_eval_cert' (skip the smoothed-classifier evaluation).
Any field can be set with --config.FIELD=VALUE; a workdir remembers its
config and refuses another.

The image tower is sized for certification on a CPU: about 7 MFLOPs per
32x32 image (patch 8: 16 patch tokens and a class token; width 64; 4 layers),
so the default certification run's ~50,000 noisy images per input take a few
seconds on two cores.
"""

from ml_collections import config_dict


# What --help says about the variants (experiments.common.config_help).
VARIANTS = """tiny (a few steps of a very small model, for tests) | no_eval_cert
(skip the smoothed-classifier evaluation)"""
EXAMPLE_VARIANTS = "tiny"


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 0

  # The model (ovc_jax.models.CLIPConfig fields; the vocabulary and the
  # special token ids come from the tokenizer).
  c.model = config_dict.ConfigDict()
  c.model.embed_dim = 64
  c.model.vision = config_dict.ConfigDict(dict(
      image_size=32, patch_size=8, width=64, layers=4, heads=2, mlp_dim=256,
      activation="gelu"))
  c.model.text = config_dict.ConfigDict(dict(
      context_length=16, width=64, layers=3, heads=2, mlp_dim=256,
      activation="gelu"))

  # Training.
  # Small batches, many steps: what limits this model is the number of
  # updates, and on two CPU cores a step of batch 32 costs 21 ms against 54 ms
  # at batch 64.
  c.batch_size = 32
  c.num_steps = 24000
  c.learning_rate = 1e-3
  c.end_learning_rate = 1e-5
  c.warmup_steps = 300
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  # Noise augmentation in CLIP-normalised space: each image's sigma is drawn
  # from these (0: clean), covering the sigmas it is certified at.
  c.noise_sigmas = (0.0, 0.12, 0.25, 0.5)
  # Share of captions replaced by a zero-shot template true of the image
  # (training.with_template_captions: makes the loss ask for the shape).
  c.template_caption_fraction = 0.5

  # Bookkeeping.
  c.log_every = 400
  c.checkpoint_every = 2000
  c.keep_checkpoints = 2

  # Final evaluation on the held-out toy test split.
  c.eval = config_dict.ConfigDict()
  c.eval.batch_size = 500
  c.eval.template = "a photo of a {}."
  c.eval.certify = True
  c.eval.cert_sigmas = (0.12, 0.25, 0.5)
  c.eval.cert_every = 10       # every 10th test image: 100 images
  c.eval.cert_n0 = 100
  c.eval.cert_n = 1000
  c.eval.cert_alpha = 0.001
  c.eval.cert_batch_size = 550
  c.eval.cert_seed = 0

  for variant in filter(None, (arg or "").split(",")):
    _apply(c, variant.strip())
  return c


def _apply(c: config_dict.ConfigDict, variant: str) -> None:
  if variant == "tiny":
    c.model.embed_dim = 16
    c.model.vision.update(patch_size=16, width=16, layers=1, heads=1, mlp_dim=32)
    c.model.text.update(width=16, layers=1, heads=1, mlp_dim=32)
    c.batch_size = 16
    c.num_steps = 8
    c.warmup_steps = 2
    c.log_every = 2
    c.checkpoint_every = 3
    c.eval.batch_size = 250
    c.eval.cert_every = 250
    c.eval.cert_sigmas = (0.25,)
    c.eval.cert_n0 = 10
    c.eval.cert_n = 20
    c.eval.cert_batch_size = 20
  elif variant == "no_eval_cert":
    c.eval.certify = False
  else:
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown train_toy_clip config variant "
                     f"{variant!r}; the variants are: tiny, no_eval_cert")
