"""Standard randomized smoothing (Cohen et al. 2019): CERTIFY and PREDICT.

CERTIFY(f, sigma, x, n0, n, alpha):
  counts0  = SampleUnderNoise(f, x, n0, sigma)   # selection draws
  cA       = argmax counts0
  counts   = SampleUnderNoise(f, x, n, sigma)    # estimation draws (disjoint keys)
  pA_lower = LowerConfBound(counts[cA], n, 1 - alpha)
  return (cA, sigma * PhiInv(pA_lower)) if pA_lower > 0.5 else ABSTAIN

The draws come from `ovc_jax.sampler`, the last lines from
`ovc_jax.certificates`; both are shared with the other three certifiers.
`certification_counts` (the draws' counts, traceable) is this certifier's
part of the traceable core (`ovc_jax.certifiers.core`); `certify` is it
followed by scipy's bounds on the host.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from scipy import stats

from ovc_jax import certificates
from ovc_jax import errors
from ovc_jax import sampler
from ovc_jax.certificates import ABSTAIN, Certificate, Counts, SmoothingParams
from ovc_jax.errors import ConfigError


def _check_smoothing(smoothing: Any) -> None:
  errors.check_bundle(smoothing, SmoothingParams, "smoothing")


def certification_draws(key: jax.Array, apply_fn: sampler.ApplyFn,
                        params: Any, x: jax.Array, smoothing: SmoothingParams,
                        *, outputs: Sequence[str] = ("counts",),
                        num_classes: int | None = None,
                        mesh=None) -> sampler.Draws:
  """CERTIFY's n0 selection and n estimation draws of one input (traceable).

  The sampler's outputs (see `ovc_jax.sampler.sample_under_noise`) on the
  input's "selection" and "estimation" key streams. Pure in the key and the
  params: it can be jit-ed, vmap-ed over inputs and keys, and sharded over a
  batch axis (docs/JAX.md); x is validated on the host when concrete.
  """
  _check_smoothing(smoothing)
  x = sampler.check_input(x)
  return sampler.sample_certification_draws(
      apply_fn, params, x, key, sigma=smoothing.sigma,
      num_classes=sampler.num_classes_of(apply_fn, params, num_classes),
      n0=smoothing.n0, n=smoothing.n, batch_size=smoothing.batch_size,
      outputs=tuple(outputs), mesh=mesh)


def certification_counts(key: jax.Array, apply_fn: sampler.ApplyFn,
                         params: Any, x: jax.Array, smoothing: SmoothingParams,
                         *, num_classes: int | None = None,
                         mesh=None) -> Counts:
  """CERTIFY's selection and estimation counts of one input (traceable):
  int32 `[C]` each (`[P, C]` for P classifiers on the same noise)."""
  draws = certification_draws(key, apply_fn, params, x, smoothing,
                              num_classes=num_classes, mesh=mesh)
  return Counts(draws.selection["counts"], draws.estimation["counts"])


def certify_many(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
                 x: jax.Array, smoothing: SmoothingParams, *,
                 num_classes: int | None = None,
                 mesh=None) -> list[Certificate]:
  """CERTIFY for P classifiers evaluated on the same noise (predictions [B, P]).

  Each certificate equals what `certify` gives for that classifier alone with
  the same key; the encoder runs once per noise sample for all P.
  """
  counts = certification_counts(key, apply_fn, params, x, smoothing,
                                num_classes=num_classes, mesh=mesh)
  return certificates.certificates_from_counts(
      counts.selection, counts.estimation, n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha)


def certify(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
            x: jax.Array, smoothing: SmoothingParams, *,
            num_classes: int | None = None, mesh=None) -> Certificate:
  """Cohen et al.'s CERTIFY for one base classifier.

  Args:
    key: the input's noise key.
    apply_fn: the base classifier (see `ovc_jax.sampler.ApplyFn`), whose
      predictions are `[B]`.
    params: its parameters.
    x: the input; noise of its shape is added.
    smoothing: sigma, n0, n, alpha and the batch size.
    num_classes: C; by default the classifier's own count (see
      `ovc_jax.sampler.num_classes_of`).
    mesh: optional device mesh over the sample axis.

  Returns:
    `Certificate(prediction or ABSTAIN, radius, pA_lower, counts)`, with
    scipy's bounds, on the host. Its traceable twin is
    `ovc_jax.certifiers.core.certify`.
  """
  certs = certify_many(key, apply_fn, params, x, smoothing,
                       num_classes=num_classes, mesh=mesh)
  if len(certs) != 1 or np.ndim(certs[0].counts) != 1:
    raise ConfigError("certify takes one classifier; use certify_many for "
                      "class matrices [P, C, d]")
  return certs[0]


def predict(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
            x: jax.Array, smoothing: SmoothingParams, *,
            num_classes: int | None = None, mesh=None) -> int:
  """Cohen et al.'s PREDICT with smoothing.n draws: the top class, or ABSTAIN.

  The top two counts nA, nB are compared with a two-sided binomial test at
  p = 0.5; the top class is returned when its p-value is <= alpha. The
  probability of returning a class other than g(x) is at most alpha.
  (smoothing.n0 is not used.)
  """
  _check_smoothing(smoothing)
  x = sampler.check_input(x)
  counts = np.asarray(jax.device_get(sampler.sample_under_noise(
      apply_fn, params, x, sampler.stream_key(key, "prediction"),
      num_samples=smoothing.n, sigma=smoothing.sigma,
      batch_size=smoothing.batch_size,
      num_classes=sampler.num_classes_of(apply_fn, params, num_classes),
      mesh=mesh)["counts"]))
  if counts.ndim != 1:
    raise ConfigError("predict takes one classifier")
  top2 = np.argsort(-counts, kind="stable")[:2]
  n_a = int(counts[top2[0]])
  n_b = int(counts[top2[1]]) if counts.size > 1 else 0
  if n_a + n_b == 0:
    return ABSTAIN
  p_value = stats.binomtest(n_a, n_a + n_b, 0.5).pvalue
  return int(top2[0]) if p_value <= smoothing.alpha else ABSTAIN
