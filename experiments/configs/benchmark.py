"""Configs of the benchmark.

  python -m experiments.benchmark --workdir=DIR                                         # quick (CPU)
  python -m experiments.benchmark --workdir=DIR --config=experiments/configs/benchmark.py:full  # accelerators
  python -m experiments.benchmark --workdir=DIR --config=experiments/configs/benchmark.py:ci    # the test's

quick: n reduced so that standard RS on full-size architectures finishes on a
2-core CPU; both sides of every ratio use the same n. Its `large` section then
times Cached-OVC and MVN-OVC at n = large.n = 100,000 (caches in memory and on
disk, warm and cold) against standard RS measured at n and large.standard_n
and scaled to n0 + large.n (the output says so; a fast encoder is measured
at large.n instead), with a roofline table and
each method's peak memory. full: Cohen's n = 100,000 on both sides. ci: the
toy model only and a small `large` section, for the test. Every variant
also certifies batched.inputs toy test images in one jit(vmap(core.certify))
call against a Python loop over standard.certify (64 inputs at n = 1000; 8 at
n = 100 in ci); batched: that section alone. Every variant also measures
compressed caches (int16, int8): bytes, ambiguous rows and Cached-OVC's time
at large.n against float32; compressed: that section alone.
"""

from ml_collections import config_dict


# What --help says about the variants (experiments.common.config_help).
VARIANTS = """quick (the default: n reduced so that a 2-core CPU finishes, plus the
n = 100,000 section for Cached-OVC and MVN-OVC) | full (Cohen's n = 100,000,
five architectures; accelerators) | ci (toy model, small; the test's) |
batched (only the batched section at quick size: 64 toy inputs, n = 1000, in
one jit(vmap(...)) call against a loop over standard.certify) | compressed
(only the compressed-cache section at quick size)"""
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
  c.mvn_batch_size = 100_000
  c.cached_batch_size = 100_000
  c.encoder_repeats = 5
  c.peer = True      # time transformers' FlaxCLIPModel on the same weights
  c.compile = True   # time to first result in fresh processes (cold / warm cache)
  c.dtype = "float32"
  c.seed = 0
  # The n = 100,000 section: Cached-OVC and MVN-OVC at n = large.n on a cache
  # of that size (Gaussian-fit draws of the architecture's real noisy
  # embeddings, L2-normalised: the time depends on n, d and C, not on the
  # values), standard RS timed at n and at large.standard_n (or as many as
  # the encoder takes in large.standard_seconds) and its per-sample cost
  # scaled to n0 + large.n (measured instead where that second n reaches
  # large.n, or n >= large.n).
  c.large = config_dict.ConfigDict()
  c.large.enabled = True
  c.large.architectures = ()        # of c.architectures; empty: all of them
  c.large.n = 100_000
  c.large.standard_n = 500
  c.large.standard_seconds = 20.0   # more than standard_n where that is quick
  c.large.standard_repeats = 2      # each n: the least of these runs
  c.large.repeats = 3
  c.large.min_total_s = 1.0        # a cheap call repeats until this many seconds
  c.large.disk_bytes = 512 << 20   # the file the disk's read speed is timed on
  c.large.memory = True            # peak memory of each method, in child processes
  c.large.memory_methods = ("cached", "mvn", "standard")
  # Certifying a batch of toy inputs in one jit(vmap(core.certify)) call
  # against a Python loop over standard.certify, side by side, at each noise
  # batch size (samples per input per step): what batching across inputs
  # buys when one input's noise batch is too small to fill the device (2
  # samples), and what it costs when it already fills it (100, on a CPU).
  c.batched = config_dict.ConfigDict()
  c.batched.enabled = True
  c.batched.alone = False       # only this section (the 'batched' variant)
  c.batched.inputs = 64
  c.batched.n0 = 100
  c.batched.n = 1000
  c.batched.batch_sizes = (2, 100)
  c.batched.repeats = 3
  # Compressed Cached-OVC caches (int16, int8) against float32: bytes and
  # the share of ambiguous rows on the toy CLIP's own noisy embeddings at
  # each of toy_sigmas, then Cached-OVC's time at n = large.n from memory
  # and from a cold disk on rows of each architecture's shape (a Gaussian
  # fit of its real noisy embeddings), and the paper's storage per format.
  c.compressed = config_dict.ConfigDict()
  c.compressed.enabled = True
  c.compressed.alone = False        # only this section (the 'compressed' variant)
  c.compressed.formats = ("int16", "int8")
  c.compressed.toy_sigmas = (0.12, 0.25, 0.5)
  c.compressed.toy_inputs = 4       # toy test images
  c.compressed.toy_n = 10_000       # estimation rows per input and sigma (+ n0)
  c.compressed.architectures = ("ViT-B-32", "RN50")
  c.compressed.repeats = 3
  c.compressed.min_total_s = 1.0    # a cheap call repeats until this many seconds
  c.variant = arg or "quick"
  if c.variant == "full":
    c.architectures = ("toy", "ViT-B-32", "ViT-B-16", "RN50", "RN101")
    c.n = 100_000
    c.batch_size = 1000
    c.n_p = 10_000
    c.gamma = 0.01
    c.repeats = 5
    c.large.standard_n = 100_000
  elif c.variant == "ci":
    c.architectures = ("toy",)
    c.n = c.n0  # the n0 and n passes run one compiled program
    c.repeats = 1
    c.encoder_repeats = 1
    c.large.n = 5000
    c.large.standard_n = 400
    c.large.standard_seconds = 0.0    # keeps the toy model's fit a fit
    c.large.standard_repeats = 1
    c.large.repeats = 1
    c.large.min_total_s = 0.0
    c.large.disk_bytes = 16 << 20     # one DISK_READ_CHUNK
    c.large.memory_methods = ("cached", "mvn")  # a standard child loads the model
    c.batched.inputs = 8
    c.batched.n0 = 20
    c.batched.n = 100
    c.batched.batch_sizes = (50,)
    c.batched.repeats = 1
    c.compressed.toy_sigmas = (0.25,)
    c.compressed.toy_inputs = 1
    c.compressed.toy_n = c.n          # the main section's shapes
    c.compressed.architectures = ("toy",)
    c.compressed.repeats = 1
    c.compressed.min_total_s = 0.0
  elif c.variant == "batched":
    c.batched.alone = True
  elif c.variant == "compressed":
    c.compressed.alone = True
  elif c.variant != "quick":
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown benchmark variant {arg!r}: quick, full, "
                     "ci, batched or compressed")
  return c
