"""The sections of `python -m experiments.benchmark`, one module each.

  backbone       what is certified: the backbone, the input, class embeddings
  timing         median and least wall times of a call
  encoder        encoder images/s against FlaxCLIPModel, XLA's FLOP count,
                 compile times in fresh processes (`--compile_child`)
  class_counts   the four certifiers on one new prompt at fixed n, per class count
  large          the n = 100,000 section: Cached-OVC and MVN-OVC at Cohen's n,
                 standard RS scaled to it, the roofline
  disk           the page cache and a cold sequential read (for `large`)
  memory         peak memory per method in fresh processes (`--memory_child`)
  batched        B inputs in one jit(vmap(core.certify)) call against a loop
  targets        the targets a run is checked against
  report         the printed tables and the speedup chart

The package is not named `benchmark`, so `experiments.benchmark` stays the
entry point (and the module its child processes run).
"""
