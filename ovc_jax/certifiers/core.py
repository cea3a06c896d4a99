"""The traceable certification core: certify inside jit, vmap and sharding.

Every function here is pure: explicit keys and params in, arrays out, no
host read-back. So other JAX code can compile it into its own program,
`jax.vmap` it over a batch of inputs and keys, `jax.jit` the result once per
shape, and shard the batch axis over devices with `jax.sharding` (docs/JAX.md
shows how). The host certifiers (`standard.certify`, `ovc.certify_known_
prompts`, `cached_ovc.certify_cached`, `mvn_ovc.certify_mvn`) draw their
counts with these same functions and finish with scipy's bounds instead.

  certification_counts(key, apply_fn, params, x, smoothing)  CERTIFY's counts
  cached_counts(cache, class_embeddings, cached)             Cached-OVC's (float32 caches)
  mvn_counts(key, fit, class_embeddings, smoothing, mvn)     MVN-OVC's
  certificate(counts, smoothing, margin=0.0)                 counts -> certificate

and, each a counts function followed by `certificate`,

  certify(key, apply_fn, params, x, smoothing)
  certify_cached(cache, class_embeddings, smoothing, cached)
  certify_mvn(key, fit, class_embeddings, smoothing, mvn)  (approximate)

The certificate uses the JAX Clopper-Pearson bound (`ovc_jax.bounds`), which
rounds toward safety: the prediction is the host certifier's, and the radius
is never above scipy's and at most a few ulps plus
`bounds.jax_float32_tolerance` in pA_lower below it (`RADIUS_TOLERANCE`
bounds the gap; docs/JAX.md says why). Under x64 the gap shrinks to
`bounds.JAX_FLOAT64_TOLERANCE`.

Checks: shapes, dtypes and the parameter objects always; values (finite
inputs, class matrices and fits, counts that fit n) on the host when they are
concrete, skipped when traced (`ovc_jax.tracing`), where a non-finite
embedding or logit counts for no class instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from scipy import stats

from ovc_jax import bounds
from ovc_jax import sampler
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certificates import (Counts, JaxCertificate, SmoothingParams,
                                  certify_counts_jax)
from ovc_jax.certifiers.cached_ovc import (CachedParams, EmbeddingDraws,
                                           cached_counts)
from ovc_jax.certifiers.mvn_ovc import GaussianFit, MVNParams, mvn_counts
from ovc_jax.certifiers.standard import (certification_counts,
                                         certification_draws)

__all__ = [
    "CachedParams", "Counts", "EmbeddingDraws", "GaussianFit",
    "JaxCertificate", "MVNParams", "SmoothingParams", "cached_counts",
    "certificate", "certification_counts", "certification_draws", "certify",
    "certify_cached", "certify_mvn", "mvn_counts", "radius_tolerance",
]


def radius_tolerance(smoothing: SmoothingParams, p_lower: float) -> float:
  """How far below the scipy radius the JAX one may lie at scipy's pA_lower.

  pA_lower is lower by at most `jax_float32_tolerance`, through PhiInv's
  slope at the lower of the two values, times sigma; plus the few ulps the
  radius is lowered by for float32 PhiInv (`certificate_from_counts_jax`).
  """
  tol = bounds.jax_float32_tolerance(smoothing.n)
  low = min(max(p_lower - tol, 0.5), 1.0 - 1e-12)
  slope = 1.0 / stats.norm.pdf(stats.norm.ppf(low))
  radius = smoothing.sigma * stats.norm.ppf(min(p_lower, 1.0 - 1e-12))
  return float(smoothing.sigma * slope * tol + 32 * 1.2e-7 * abs(radius)
               + 1e-6)


def certificate(counts: Counts, smoothing: SmoothingParams, *,
                margin: float = 0.0) -> JaxCertificate:
  """CERTIFY's last lines on counts of smoothing.n estimation draws.

  The JAX twin of `certificates.certificate_from_counts` (see
  `certificates.certify_counts_jax`); MVN-OVC passes its margin delta.
  """
  return certify_counts_jax(counts, smoothing, margin=margin)


def certify(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
            x: jax.Array, smoothing: SmoothingParams, *,
            num_classes: int | None = None, mesh=None) -> JaxCertificate:
  """Cohen et al.'s CERTIFY of one input, traceable: `standard.certify`'s
  counts (the same bits) and prediction, the JAX bound's radius."""
  counts = certification_counts(key, apply_fn, params, x, smoothing,
                                num_classes=num_classes, mesh=mesh)
  return certificate(counts, smoothing)


def certify_cached(cache: EmbeddingDraws, class_embeddings: jax.Array,
                   smoothing: SmoothingParams,
                   cached: CachedParams = CachedParams()) -> JaxCertificate:
  """Cached-OVC's certificate, traceable; smoothing's n0 and n must be the
  cache's row counts (checked: shapes are known when tracing)."""
  cached_ovc.check_draws(cache, smoothing)
  return certificate(cached_counts(cache, class_embeddings, cached), smoothing)


def certify_mvn(key: jax.Array, fit: GaussianFit, class_embeddings: jax.Array,
                smoothing: SmoothingParams,
                mvn: MVNParams = MVNParams()) -> JaxCertificate:
  """MVN-OVC's result, traceable: an estimate, NOT a certificate (see
  `ovc_jax.certifiers.mvn_ovc`)."""
  return certificate(mvn_counts(key, fit, class_embeddings, smoothing, mvn),
                     smoothing, margin=mvn.delta)
