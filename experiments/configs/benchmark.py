"""Configs of the benchmark.

  python -m experiments.benchmark --workdir=DIR                                         # quick (CPU)
  python -m experiments.benchmark --workdir=DIR --config=experiments/configs/benchmark.py:full  # accelerators

quick: n reduced so that standard RS on full-size architectures finishes on a
2-core CPU; both sides of every ratio use the same n. full: Cohen's n = 100,000.
"""

from ml_collections import config_dict


# What --help says about the variants (experiments.common.config_help).
VARIANTS = """quick (the default: n reduced so that a 2-core CPU finishes) | full
(Cohen's n = 100,000, five architectures; accelerators)"""
EXAMPLE_VARIANTS = "full"


def get_config(arg: str | None = "quick") -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # 'toy' is the project's trained toy-world CLIP; the others are full-size
  # architectures with random weights (speed does not depend on the values).
  c.architectures = ("toy", "ViT-B-32", "RN50")
  c.class_counts = (10, 1000)
  c.sigma = 0.25
  c.alpha = 0.001
  c.n0 = 100
  c.n = 200
  c.batch_size = 100
  c.repeats = 3
  # Modified-IRS: the novel prompt is a slightly perturbed known prompt, so
  # that the IRS path (n0 + n_p encoder passes) is what is timed.
  c.n_p = 20
  c.gamma = 0.5
  c.mvn_batch_size = 10_000
  c.cached_batch_size = 10_000
  c.encoder_repeats = 5
  c.peer = True      # time transformers' FlaxCLIPModel on the same weights
  c.compile = True   # time to first result in fresh processes (cold / warm cache)
  c.dtype = "float32"
  c.seed = 0
  c.variant = arg or "quick"
  if c.variant == "full":
    c.architectures = ("toy", "ViT-B-32", "ViT-B-16", "RN50", "RN101")
    c.n = 100_000
    c.batch_size = 1000
    c.n_p = 10_000
    c.gamma = 0.01
    c.repeats = 5
  elif c.variant != "quick":
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown benchmark variant {arg!r}: quick or full")
  return c
