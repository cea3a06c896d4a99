"""What a certificate is and how one is made from counts: shared by all four certifiers.

CERTIFY(f, sigma, x, n0, n, alpha) ends the same way whichever certifier drew
the counts:

  cA       = argmax counts0                               # selection draws
  pA_lower = LowerConfBound(counts[cA], n, 1 - alpha)     # estimation draws
  return (cA, sigma * PhiInv(pA_lower)) if pA_lower > 0.5 else ABSTAIN

`certificate_from_counts` is that rule (MVN-OVC passes its margin delta), and
`certificate_from_counts_jax` its jittable twin (`certify_counts_jax` takes
`Counts` and `SmoothingParams` and returns a `JaxCertificate`), so there is
one place where a certificate is made from counts. `SmoothingParams` bundles
the numbers every certifier is called with.

n is always passed explicitly: it is the number of estimation draws, not the
sum of the counts. A draw with no class (a non-finite embedding, see
`ovc_jax.classifiers`) is in no count, so the counts can sum to less than n,
and dividing by their sum would raise pA. With n the draws made, such a draw
counts as a miss, which only lowers pA_lower. If no selection draw has a
class, the certificate abstains.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ovc_jax import bounds
from ovc_jax import errors
from ovc_jax import tracing
from ovc_jax.errors import ConfigError

ABSTAIN = -1

DEFAULT_N0 = 100
DEFAULT_N = 100_000
DEFAULT_ALPHA = 0.001
DEFAULT_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class SmoothingParams:
  """The numbers of Cohen et al.'s CERTIFY, checked on construction.

  Attributes:
    sigma: the noise standard deviation (in the space noise is added in).
    n0: selection draws (which class to certify).
    n: estimation draws (the bound on pA).
    alpha: the certificate holds with probability >= 1 - alpha.
    batch_size: noise samples evaluated at once (memory, not semantics: every
      result is the same for every batch size).
  """

  sigma: float
  n0: int = DEFAULT_N0
  n: int = DEFAULT_N
  alpha: float = DEFAULT_ALPHA
  batch_size: int = DEFAULT_BATCH_SIZE

  def __post_init__(self):
    check_smoothing_args(sigma=self.sigma, n0=self.n0, n=self.n,
                         alpha=self.alpha, batch_size=self.batch_size)

  def replace(self, **changes) -> "SmoothingParams":
    return dataclasses.replace(self, **changes)


def _is_count(value, minimum: int) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and value >= minimum)


def check_smoothing_args(*, sigma: float, n0: int, n: int, alpha: float,
                         batch_size: int) -> None:
  """Raises ConfigError for CERTIFY arguments out of range."""
  if not _is_count(n0, 1):
    raise ConfigError(f"n0 (selection draws) must be an integer >= 1; got {n0}")
  if not _is_count(n, 1):
    raise ConfigError(f"n (estimation draws) must be an integer >= 1; got {n}")
  if not _is_count(batch_size, 1):
    raise ConfigError(f"batch size must be an integer >= 1; got {batch_size}")
  if not isinstance(alpha, (float, int, np.floating)) or not 0.0 < alpha < 1.0:
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")
  if (not isinstance(sigma, (float, int, np.floating)) or not np.isfinite(sigma)
      or sigma <= 0):
    raise ConfigError(f"sigma must be a finite number > 0; got {sigma}")


class Certificate(NamedTuple):
  """One certificate: (prediction, radius, pA_lower, counts, ambiguous,
  regenerated).

  Attributes:
    prediction: the certified class, or ABSTAIN (-1).
    radius: L2 radius within which the smoothed classifier's prediction is
      constant (0.0 when abstaining).
    pA_lower: the lower confidence bound on P[f(x + e) = cA] used for the
      radius (after any margin), in [0, 1].
    counts: int64 `[C]` histogram of the estimation draws.
    ambiguous: draws (selection and estimation) whose class a compressed
      cache left in doubt (0 for every other certifier and cache).
    regenerated: how many of those were recomputed with the encoder, so
      counted exactly (see `ovc_jax.certifiers.cached_ovc`).
  """

  prediction: int
  radius: float
  pA_lower: float
  counts: np.ndarray
  ambiguous: int = 0
  regenerated: int = 0


class Counts(NamedTuple):
  """CERTIFY's two histograms, int32 `[C]` (or `[P, C]`, or batched `[B, ...]`).

  Attributes:
    selection: the n0 selection draws' counts (which class to certify).
    estimation: the n estimation draws' counts (the bound on pA).
  """

  selection: jax.Array
  estimation: jax.Array


class JaxCertificate(NamedTuple):
  """A certificate as arrays, from traceable code (`certify_counts_jax`).

  Attributes:
    prediction: int32, the certified class or ABSTAIN (-1).
    radius: float, 0 when abstaining; at most the scipy radius of
      `certificate_from_counts` for the same counts (see there).
    pA_lower: float, the lower bound on pA after any margin, in [0, 1].
    counts: int32 `[..., C]`, the estimation counts.
  """

  prediction: jax.Array
  radius: jax.Array
  pA_lower: jax.Array
  counts: jax.Array


def radius_from_lower_bound(p_lower: float, sigma: float) -> float:
  """sigma * PhiInv(p_lower), the certified radius of Cohen et al.'s theorem."""
  return float(sigma * stats.norm.ppf(p_lower))


def certificate_from_lower_bound(prediction: int, p_lower: float,
                                 counts: np.ndarray, sigma: float) -> Certificate:
  """(prediction, sigma * PhiInv(p_lower)) if p_lower > 1/2, else ABSTAIN."""
  counts = np.asarray(counts, np.int64)
  if prediction != ABSTAIN and p_lower > 0.5:
    return Certificate(int(prediction), radius_from_lower_bound(p_lower, sigma),
                       float(p_lower), counts)
  return Certificate(ABSTAIN, 0.0, float(max(p_lower, 0.0)), counts)


def check_counts(counts: np.ndarray, n: int) -> None:
  """Raises ConfigError unless `counts` are >= 0 and sum to at most n draws
  (per histogram: the last axis). Traced counts are not checked."""
  if not _is_count(n, 1):
    raise ConfigError(f"n (the number of draws) must be an integer >= 1; got {n}")
  counts = tracing.host_value(counts)
  if counts is None:
    return
  if counts.size and (counts.min() < 0 or np.any(counts.sum(axis=-1) > n)):
    raise ConfigError(f"counts {counts.tolist()} do not fit n = {n} draws "
                      "(negative, or summing to more than n)")


def certificate_from_counts(counts0: np.ndarray, counts: np.ndarray, *,
                            n: int, sigma: float, alpha: float,
                            margin: float = 0.0) -> Certificate:
  """CERTIFY's last lines, given the selection and estimation histograms.

  Args:
    counts0: `[C]` selection counts (which class to certify).
    counts: `[C]` estimation counts.
    n: the number of estimation draws made; the counts may sum to less (draws
      with no class), and those draws count against pA.
    sigma: the noise level the counts were drawn at.
    alpha: the certificate holds with probability >= 1 - alpha.
    margin: subtracted from pA_lower before the radius (MVN-OVC's delta; 0 for
      the exact certifiers).

  Returns:
    The certificate. Ties in counts0 go to the lowest class index, as in Cohen
    et al.'s `counts.argmax()`; if counts0 is all zero, ABSTAIN.
  """
  counts0 = np.asarray(counts0, np.int64)
  counts = np.asarray(counts, np.int64)
  check_counts(counts, n)
  if not counts0.any():
    return certificate_from_lower_bound(ABSTAIN, 0.0, counts, sigma)
  c_a = int(np.argmax(counts0))
  p_lower = bounds.clopper_pearson_lower(int(counts[c_a]), int(n),
                                         alpha) - margin
  return certificate_from_lower_bound(c_a, p_lower, counts, sigma)


def certificates_from_counts(counts0: np.ndarray, counts: np.ndarray, *,
                             n: int, sigma: float, alpha: float,
                             margin: float = 0.0) -> list[Certificate]:
  """One certificate per classifier: counts `[C]` or `[P, C]`, from n draws."""
  counts0, counts = jax.device_get((counts0, counts))
  return [certificate_from_counts(c0, c, n=n, sigma=sigma, alpha=alpha,
                                  margin=margin)
          for c0, c in zip(np.atleast_2d(counts0), np.atleast_2d(counts))]


def certificate_from_counts_jax(counts0: jax.Array, counts: jax.Array,
                                sigma: jax.Array, alpha: jax.Array,
                                margin: jax.Array = 0.0, *, n: jax.Array):
  """Jittable `certificate_from_counts`: (prediction, radius, pA_lower).

  The same rule with the JAX bounds of `ovc_jax.bounds`, which round toward
  safety (see there): pA_lower is never above the scipy one, so the radius
  never exceeds `certificate_from_counts`' (it may be smaller by up to twice
  the bounds' stated precision). `n` is the number of estimation draws, as
  there; the arguments are not range-checked.
  """
  c_a = jnp.argmax(counts0, axis=-1)
  any_class = jnp.any(counts0 > 0, axis=-1)
  n_a = jnp.take_along_axis(counts, c_a[..., None], axis=-1)[..., 0]
  p_lower = bounds.clopper_pearson_lower_jax(n_a, n, alpha) - margin
  certified = any_class & (p_lower > 0.5)
  radius = sigma * jax.scipy.stats.norm.ppf(jnp.clip(p_lower, 0.5, 1.0))
  # PhiInv and sigma in float32 round too: take a few ulps off the radius.
  radius = radius * (1.0 - 8 * jnp.finfo(radius.dtype).eps)
  radius = jnp.where(certified, radius, 0.0)
  return (jnp.where(certified, c_a, ABSTAIN), radius,
          jnp.where(any_class, jnp.maximum(p_lower, 0.0), 0.0))


def certify_counts_jax(counts: Counts, smoothing: SmoothingParams, *,
                       margin: float = 0.0) -> JaxCertificate:
  """CERTIFY's last lines on `Counts` of smoothing.n estimation draws, traceable.

  `certificate_from_counts_jax` with smoothing's sigma, alpha and n: the
  prediction equals `certificate_from_counts`', the radius is at most its
  scipy radius (see there). Works on one histogram `[C]`, P of them `[P, C]`
  or a batch; concrete counts are checked on the host (`check_counts`), traced
  ones are not.
  """
  errors.check_bundle(smoothing, SmoothingParams, "smoothing")
  if not isinstance(counts, Counts):
    raise ConfigError(f"counts must be a Counts(selection, estimation); got "
                      f"{type(counts).__name__}")
  selection, estimation = (jnp.asarray(c) for c in counts)
  if selection.shape != estimation.shape or selection.ndim < 1:
    raise ConfigError(f"selection counts {selection.shape} and estimation "
                      f"counts {estimation.shape} must be [..., C] alike")
  check_counts(counts.estimation, smoothing.n)
  if not 0.0 <= margin < 1.0:
    raise ConfigError(f"the margin must lie in [0, 1); got {margin}")
  prediction, radius, p_lower = certificate_from_counts_jax(
      selection, estimation, jnp.float32(smoothing.sigma),
      jnp.float32(smoothing.alpha), jnp.float32(margin), n=smoothing.n)
  return JaxCertificate(prediction.astype(jnp.int32), radius, p_lower,
                        estimation)
