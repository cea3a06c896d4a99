"""Standard randomized smoothing (Cohen et al. 2019): CERTIFY and PREDICT.

CERTIFY(f, sigma, x, n0, n, alpha):
  counts0  = SampleUnderNoise(f, x, n0, sigma)   # selection draws
  cA       = argmax counts0
  counts   = SampleUnderNoise(f, x, n, sigma)    # estimation draws (disjoint keys)
  pA_lower = LowerConfBound(counts[cA], n, 1 - alpha)
  return (cA, sigma * PhiInv(pA_lower)) if pA_lower > 0.5 else ABSTAIN

`certificate_from_counts` is CERTIFY's last lines; every certifier finishes
with it (MVN-OVC passes its margin delta), so there is one place where a
certificate is made from counts.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ovc_jax import bounds
from ovc_jax import sampler
from ovc_jax.errors import ConfigError

ABSTAIN = -1

DEFAULT_N0 = 100
DEFAULT_N = 100_000
DEFAULT_ALPHA = 0.001


class Certificate(NamedTuple):
  """One certificate; unpacks as (prediction, radius, pA_lower, counts).

  Attributes:
    prediction: the certified class, or ABSTAIN (-1).
    radius: L2 radius within which the smoothed classifier's prediction is
      constant (0.0 when abstaining).
    pA_lower: the lower confidence bound on P[f(x + e) = cA] used for the
      radius (after any margin), in [0, 1].
    counts: int64 `[C]` histogram of the estimation draws.
  """

  prediction: int
  radius: float
  pA_lower: float
  counts: np.ndarray


def check_certify_args(*, sigma: float, n0: int, n: int, alpha: float,
                       batch_size: int) -> None:
  """Raises ConfigError for CERTIFY arguments out of range."""
  if not isinstance(n0, (int, np.integer)) or n0 < 1:
    raise ConfigError(f"n0 (selection draws) must be an integer >= 1; got {n0}")
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ConfigError(f"n (estimation draws) must be an integer >= 1; got {n}")
  if not 0.0 < alpha < 1.0:
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")
  sampler.check_sampler_args(num_samples=n, sigma=sigma, batch_size=batch_size)


def radius_from_lower_bound(p_lower: float, sigma: float) -> float:
  """sigma * PhiInv(p_lower), the certified radius of Cohen et al.'s theorem."""
  return float(sigma * stats.norm.ppf(p_lower))


def certificate_from_counts(counts0: np.ndarray, counts: np.ndarray, *,
                            sigma: float, alpha: float,
                            margin: float = 0.0) -> Certificate:
  """CERTIFY's last lines, given the selection and estimation histograms.

  Args:
    counts0: `[C]` selection counts (which class to certify).
    counts: `[C]` estimation counts; n = counts.sum().
    sigma: the noise level the counts were drawn at.
    alpha: the certificate holds with probability >= 1 - alpha.
    margin: subtracted from pA_lower before the radius (MVN-OVC's delta; 0 for
      the exact certifiers).

  Returns:
    The certificate. Ties in counts0 go to the lowest class index, as in Cohen
    et al.'s `counts.argmax()`.
  """
  counts0 = np.asarray(counts0, np.int64)
  counts = np.asarray(counts, np.int64)
  c_a = int(np.argmax(counts0))
  n = int(counts.sum())
  p_lower = bounds.clopper_pearson_lower(int(counts[c_a]), n, alpha) - margin
  if p_lower > 0.5:
    return Certificate(c_a, radius_from_lower_bound(p_lower, sigma),
                       float(p_lower), counts)
  return Certificate(ABSTAIN, 0.0, float(max(p_lower, 0.0)), counts)


def certificate_from_counts_jax(counts0: jax.Array, counts: jax.Array,
                                sigma: jax.Array, alpha: jax.Array,
                                margin: jax.Array = 0.0):
  """Jittable `certificate_from_counts`: (prediction, radius, pA_lower).

  The same rule with the JAX bounds of `ovc_jax.bounds` (see their stated
  precision), for a certify step that runs inside other JAX code.
  """
  c_a = jnp.argmax(counts0, axis=-1)
  n_a = jnp.take_along_axis(counts, c_a[..., None], axis=-1)[..., 0]
  p_lower = bounds.clopper_pearson_lower_jax(
      n_a, jnp.sum(counts, axis=-1), alpha) - margin
  certified = p_lower > 0.5
  radius = jnp.where(
      certified, sigma * jax.scipy.stats.norm.ppf(jnp.clip(p_lower, 0.5, 1.0)),
      0.0)
  return (jnp.where(certified, c_a, ABSTAIN), radius,
          jnp.maximum(p_lower, 0.0))


class Draws(NamedTuple):
  """The sampler outputs of CERTIFY's two draws (each a dict, see sampler)."""

  selection: dict[str, jax.Array]
  estimation: dict[str, jax.Array]


def sample_certification_draws(
    apply_fn: sampler.ApplyFn, params: Any, x: jax.Array, key: jax.Array, *,
    sigma: float, num_classes: int, n0: int, n: int, batch_size: int,
    outputs: Sequence[str] = ("counts",), mesh=None) -> Draws:
  """The n0 selection and n estimation draws, from their disjoint key streams."""
  common = dict(sigma=sigma, batch_size=batch_size, num_classes=num_classes,
                outputs=tuple(outputs), mesh=mesh)
  selection = sampler.sample_under_noise(
      apply_fn, params, x, sampler.selection_key(key), num_samples=n0, **common)
  estimation = sampler.sample_under_noise(
      apply_fn, params, x, sampler.estimation_key(key), num_samples=n, **common)
  return Draws(selection, estimation)


def certificates_from_draws(draws: Draws, *, sigma: float,
                            alpha: float) -> list[Certificate]:
  """One certificate per classifier in the draws' counts (`[C]` or `[P, C]`)."""
  counts0, counts = jax.device_get(
      (draws.selection["counts"], draws.estimation["counts"]))
  counts0 = np.atleast_2d(counts0)
  counts = np.atleast_2d(counts)
  return [certificate_from_counts(c0, c, sigma=sigma, alpha=alpha)
          for c0, c in zip(counts0, counts)]


def certify(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
            key: jax.Array, *, sigma: float, num_classes: int,
            n0: int = DEFAULT_N0, n: int = DEFAULT_N,
            alpha: float = DEFAULT_ALPHA, batch_size: int = 1000,
            mesh=None) -> Certificate:
  """Cohen et al.'s CERTIFY for one base classifier.

  Args:
    apply_fn: the base classifier (see `ovc_jax.sampler.ApplyFn`), whose
      predictions are `[B]`.
    params: its parameters.
    x: the input; noise of its shape is added.
    key: the input's noise key.
    sigma, num_classes, n0, n, alpha, batch_size, mesh: as named.

  Returns:
    `Certificate(prediction or ABSTAIN, radius, pA_lower, counts)`.
  """
  check_certify_args(sigma=sigma, n0=n0, n=n, alpha=alpha,
                     batch_size=batch_size)
  x = sampler.check_input(x)
  draws = sample_certification_draws(
      apply_fn, params, x, key, sigma=sigma, num_classes=num_classes, n0=n0,
      n=n, batch_size=batch_size, mesh=mesh)
  if draws.estimation["counts"].ndim != 1:
    raise ConfigError("certify takes one classifier; use certify_many for "
                      "class matrices [P, C, d]")
  return certificates_from_draws(draws, sigma=sigma, alpha=alpha)[0]


def certify_many(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
                 key: jax.Array, *, sigma: float, num_classes: int,
                 n0: int = DEFAULT_N0, n: int = DEFAULT_N,
                 alpha: float = DEFAULT_ALPHA, batch_size: int = 1000,
                 mesh=None) -> list[Certificate]:
  """CERTIFY for P classifiers evaluated on the same noise (predictions [B, P]).

  Each certificate equals what `certify` gives for that classifier alone with
  the same key; the encoder runs once per noise sample for all P.
  """
  check_certify_args(sigma=sigma, n0=n0, n=n, alpha=alpha,
                     batch_size=batch_size)
  x = sampler.check_input(x)
  draws = sample_certification_draws(
      apply_fn, params, x, key, sigma=sigma, num_classes=num_classes, n0=n0,
      n=n, batch_size=batch_size, mesh=mesh)
  return certificates_from_draws(draws, sigma=sigma, alpha=alpha)


def prediction_key(key: jax.Array) -> jax.Array:
  """Key of PREDICT's draws; disjoint from CERTIFY's two streams."""
  return jax.random.fold_in(key, 2)


def predict(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
            key: jax.Array, *, sigma: float, num_classes: int,
            n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA,
            batch_size: int = 1000, mesh=None) -> int:
  """Cohen et al.'s PREDICT: the top class, or ABSTAIN.

  The top two counts nA, nB are compared with a two-sided binomial test at
  p = 0.5; the top class is returned when its p-value is <= alpha. The
  probability of returning a class other than g(x) is at most alpha.
  """
  check_certify_args(sigma=sigma, n0=1, n=n, alpha=alpha,
                     batch_size=batch_size)
  x = sampler.check_input(x)
  counts = np.asarray(jax.device_get(sampler.sample_under_noise(
      apply_fn, params, x, prediction_key(key), num_samples=n, sigma=sigma,
      batch_size=batch_size, num_classes=num_classes, mesh=mesh)["counts"]))
  if counts.ndim != 1:
    raise ConfigError("predict takes one classifier")
  top2 = np.argsort(-counts, kind="stable")[:2]
  n_a = int(counts[top2[0]])
  n_b = int(counts[top2[1]]) if counts.size > 1 else 0
  if n_a + n_b == 0:
    return ABSTAIN
  p_value = stats.binomtest(n_a, n_a + n_b, 0.5).pvalue
  return int(top2[0]) if p_value <= alpha else ABSTAIN
