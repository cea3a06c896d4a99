"""The fixed-n section: the four certifiers on one new prompt, per class count."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.backbone import Backbone
from experiments.bench.backbone import unit_rows
from experiments.bench.timing import median_seconds


SCALED_N = 100_000  # cache sizes are reported for Cohen's n


def benchmark_class_count(backbone: Backbone, x, num_classes: int, config,
                          cache_root: str) -> dict:
  """The four certifiers on one new prompt with `num_classes` classes."""
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  from ovc_jax import ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers.modified_irs import IRSParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers.mvn_ovc import MVNParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top

  d = backbone.model.config.embed_dim
  key = sampler.input_key(config.seed, 0)
  k1, k2 = jax.random.split(jax.random.key(config.seed + 1))
  known = unit_rows(k1, (2, num_classes, d))
  novel = unit_rows(k2, (num_classes, d)) * 1e-3 + known[0]
  novel = novel / jnp.linalg.norm(novel, axis=-1, keepdims=True)
  classifier = EmbeddingClassifier(backbone.model.embed_images)
  params = ovc.OVCParams(
      SmoothingParams(sigma=config.sigma, n0=config.n0, n=config.n,
                      alpha=config.alpha, batch_size=config.batch_size),
      IRSParams(n_p=config.n_p, gamma=config.gamma, alpha_zeta=config.alpha),
      MVNParams(delta=0.0, batch_size=config.mvn_batch_size),
      cached_batch_size=config.cached_batch_size)

  # The known prompts: certified once, leaving the three caches on disk.
  prov = caches.Provenance.for_input(
      backbone, noise_space="normalized", smoothing=params.smoothing, key=key,
      image=x, dtype=config.dtype, num_classes=num_classes)
  known_result = ovc.certify_known_prompts(classifier, backbone.params, x, key,
                                           known, params)
  ovc.save_caches(cache_root, known_result.caches, prov, alpha=config.alpha)
  source = ovc.StoredCaches(cache_root, prov, known_class_embeddings=known)
  paths = {k: os.path.join(cache_root, k) for k in ovc.CACHE_KINDS}

  def runner(method):
    return lambda: ovc.certify_novel_prompt(
        method, classifier, backbone.params, x, key, source, novel, params)

  out = {}
  results = {}
  for name, method in (("standard_rs_s", "standard"), ("irs_s", "irs"),
                       ("cached_ovc_s", "cached"), ("mvn_ovc_s", "mvn")):
    fn = runner(method)
    results[name] = fn()  # compiles; not timed
    out[name] = median_seconds(fn, config.repeats)
  std = out["standard_rs_s"]
  out["speedup_irs"] = std / out["irs_s"]
  out["speedup_cached"] = std / out["cached_ovc_s"]
  out["speedup_mvn"] = std / out["mvn_ovc_s"]
  out["irs_applied"] = bool(results["irs_s"].irs.irs_applied)
  ref = results["standard_rs_s"].certificate
  cached = results["cached_ovc_s"].certificate
  out["cached_identical_to_standard"] = bool(
      ref.prediction == cached.prediction and ref.radius == cached.radius
      and np.array_equal(ref.counts, cached.counts))
  # Bytes per input per sigma at n = 100,000: the embeddings scale with n0 + n,
  # the Gaussian fit (mean and factor) does not.
  row_bytes = d * np.dtype(np.float32).itemsize
  on_disk = {k: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
             for k, p in paths.items()}
  out["cache_bytes_cached"] = int(on_disk["embeddings"]
                                  + (SCALED_N - config.n) * row_bytes)
  out["cache_bytes_mvn"] = int(on_disk["gaussian"])
  out["cache_bytes_measured"] = on_disk
  context = {"novel": novel, "classifier": classifier, "params": params,
             "key": key, "source": source,
             "real_embeddings": known_result.caches.embedding_draws.estimation}
  return out, context
