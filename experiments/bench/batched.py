"""The batched section: B inputs in one jit(vmap(core.certify)) call against a
Python loop over standard.certify."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.timing import median_seconds


def benchmark_batched(config) -> dict:
  """B toy test images certified in one jit(vmap(core.certify)) call against
  a Python loop over standard.certify, same keys, same SmoothingParams, at
  each noise batch size of batched.batch_sizes.

  Both sides are compiled first (not timed); each is then timed as the
  median of batched.repeats runs. The loop is what a user writes without the
  core: one host call per input, each a compiled sampler call, a read-back
  and scipy's bound. The check columns compare the two input by input.
  """
  from ovc_jax import datasets, models, preprocessing, sampler, zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import core, standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  cfg = config.batched
  clip = models.load_clip("toy", dtype=config.dtype)
  test = datasets.load_dataset("toy")
  count = int(cfg.inputs)
  xs = jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(test.images[:count], jnp.float32) / 255, clip.preprocess)
  keys = jax.vmap(lambda i: sampler.input_key(config.seed, i))(
      jnp.arange(count))
  classifier = EmbeddingClassifier(clip.model.embed_images)
  params = classifier.params(clip.params, zeroshot.class_embeddings(
      clip, "a photo of a {}.", test.class_names))
  rows = {}
  for batch_size in cfg.batch_sizes:
    smoothing = SmoothingParams(sigma=config.sigma, n0=int(cfg.n0),
                                n=int(cfg.n), alpha=config.alpha,
                                batch_size=int(batch_size))
    certify_batch = jax.jit(jax.vmap(
        lambda x, key, s=smoothing: core.certify(key, classifier, params, x,
                                                 s)))

    def loop(s=smoothing):
      return [standard.certify(keys[i], classifier, params, xs[i], s)
              for i in range(count)]

    batched = jax.device_get(certify_batch(xs, keys))  # compiles
    host = loop()  # compiles the sampler's program
    batched_s = median_seconds(lambda f=certify_batch: f(xs, keys),
                               cfg.repeats)
    loop_s = median_seconds(loop, cfg.repeats)
    gaps = [c.radius - float(batched.radius[i]) for i, c in enumerate(host)]
    rows[str(batch_size)] = {
        "batch_size": int(batch_size),
        "samples_per_step_batched": count * int(batch_size),
        "batched_s": batched_s, "loop_s": loop_s,
        "speedup": loop_s / batched_s,
        "same_counts": all(np.array_equal(batched.counts[i], c.counts)
                           for i, c in enumerate(host)),
        "same_predictions": all(int(batched.prediction[i]) == c.prediction
                                for i, c in enumerate(host)),
        "max_radius_gap": max(gaps),
        "radius_within_tolerance": all(
            0.0 <= gap <= core.radius_tolerance(smoothing, c.pA_lower)
            for gap, c in zip(gaps, host)),
        "certified": sum(c.prediction >= 0 for c in host),
    }
  return {"inputs": count, "n0": int(cfg.n0), "n": int(cfg.n),
          "rows": rows}


def print_batched(report: dict, stream=sys.stdout) -> None:
  w = stream.write
  w(f"\nbatched certification: {report['inputs']} toy inputs, "
    f"n0={report['n0']}, n={report['n']}; one jit(vmap(core.certify)) call "
    "against a loop over standard.certify (seconds for all inputs)\n")
  w(f"{'noise batch':>12} {'per step':>9} {'batched_s':>10} {'loop_s':>10} "
    f"{'speedup':>8}  checks\n")
  for row in report["rows"].values():
    checks = ("same counts and predictions, radius within tolerance"
              if row["same_counts"] and row["same_predictions"]
              and row["radius_within_tolerance"] else "DIFFERENT")
    w(f"{row['batch_size']:>12} {row['samples_per_step_batched']:>9} "
      f"{row['batched_s']:>10.3f} {row['loop_s']:>10.3f} "
      f"{row['speedup']:>7.2f}x  {checks} (largest radius gap "
      f"{row['max_radius_gap']:.1e}; {row['certified']} of "
      f"{report['inputs']} certified)\n")
