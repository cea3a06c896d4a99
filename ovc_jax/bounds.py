"""One-sided Clopper-Pearson bounds, the one set of bounds every certifier uses.

For k successes out of n Bernoulli draws, with confidence 1 - alpha:

  lower(k, n, alpha) = the alpha-quantile of Beta(k, n - k + 1)      (0 when k = 0)
  upper(k, n, alpha) = the (1 - alpha)-quantile of Beta(k + 1, n - k) (1 when k = n)

Closed forms at the other edges: lower(n, n) = alpha^(1/n) and
upper(0, n) = 1 - alpha^(1/n).

Two implementations with one meaning: `clopper_pearson_lower/upper` in scipy
(the reference, used by the certifiers on the host) and
`clopper_pearson_lower_jax/upper_jax`, jittable, so that a whole certify step can
run inside other JAX code. The JAX version inverts the regularised incomplete
beta function by bisection; under x64 it agrees with scipy to 1e-9, and in
float32 to `jax_float32_tolerance(n)`, which grows like sqrt(n) because JAX's
float32 `betainc` loses digits for large shape parameters. Enable x64 where a
certificate is computed inside JAX with n in the tens of thousands or more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ovc_jax.errors import ConfigError

_BISECTION_STEPS_F64 = 64
_BISECTION_STEPS_F32 = 32


def jax_float32_tolerance(n) -> float:
  """Absolute agreement of the float32 JAX bounds with scipy for n draws.

  Measured over n <= 10^6, every k and alpha in [1e-6, 0.1]: the largest error
  was 5.2e-4 at n = 10^6, 3.2e-5 at n = 10^4 and 1.8e-6 at n = 100; this bound
  is about twice that (tests/test_bounds.py checks it).
  """
  return 1e-6 + 1e-6 * float(np.sqrt(n))


def _check_counts(k: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> None:
  if np.any(n < 1):
    raise ConfigError(f"the number of draws n must be >= 1; got {n}")
  if np.any(k < 0) or np.any(k > n):
    raise ConfigError(f"counts must lie in [0, n]; got k={k}, n={n}")
  if np.any(~(alpha > 0)) or np.any(~(alpha < 1)):
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")


def clopper_pearson_lower(k, n, alpha):
  """One-sided lower confidence bound on a binomial proportion (scipy).

  Args:
    k: successes, integer scalar or array.
    n: draws, integer scalar or array (broadcast with k).
    alpha: the bound holds with probability >= 1 - alpha.

  Returns:
    float (or float64 array): P[success] >= the bound with confidence 1 - alpha.
  """
  k, n, alpha = np.asarray(k), np.asarray(n), np.asarray(alpha, np.float64)
  _check_counts(k, n, alpha)
  with np.errstate(invalid="ignore", divide="ignore"):
    bound = stats.beta.ppf(alpha, k, n - k + 1)
    bound = np.where(k == n, np.exp(np.log(alpha) / n), bound)
  bound = np.where(k == 0, 0.0, bound)
  return float(bound) if bound.ndim == 0 else bound


def clopper_pearson_upper(k, n, alpha):
  """One-sided upper confidence bound on a binomial proportion (scipy)."""
  k, n, alpha = np.asarray(k), np.asarray(n), np.asarray(alpha, np.float64)
  _check_counts(k, n, alpha)
  # isf(alpha) rather than ppf(1 - alpha): 1 - alpha loses digits for tiny alpha.
  with np.errstate(invalid="ignore", divide="ignore"):
    bound = stats.beta.isf(alpha, k + 1, n - k)
    bound = np.where(k == 0, -np.expm1(np.log(alpha) / n), bound)
  bound = np.where(k == n, 1.0, bound)
  return float(bound) if bound.ndim == 0 else bound


def _beta_quantile(q: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """The q-quantile of Beta(a, b) by bisection on the incomplete beta function.

  Bisection rather than Newton: betainc is monotone in x, so bisection can
  neither diverge nor leave [0, 1], and its step count fixes the accuracy.
  """
  steps = (_BISECTION_STEPS_F64
           if q.dtype == jnp.float64 else _BISECTION_STEPS_F32)
  # Guard the parameters the edge cases mask out anyway (a = 0 or b = 0).
  a = jnp.maximum(a, 1.0)
  b = jnp.maximum(b, 1.0)

  def step(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    below = jax.scipy.special.betainc(a, b, mid) < q
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(
      0, steps, step, (jnp.zeros_like(q), jnp.ones_like(q)))
  return 0.5 * (lo + hi)


def _as_float(k, n, alpha):
  dtype = jnp.result_type(float)  # float64 under x64, else float32.
  k, n, alpha = (jnp.asarray(v, dtype) for v in (k, n, alpha))
  return jnp.broadcast_arrays(k, n, alpha)


def clopper_pearson_lower_jax(k, n, alpha) -> jax.Array:
  """Jittable `clopper_pearson_lower`; arguments are not range-checked."""
  k, n, alpha = _as_float(k, n, alpha)
  bound = _beta_quantile(alpha, k, n - k + 1)
  return jnp.where(k == 0, 0.0, bound)


def clopper_pearson_upper_jax(k, n, alpha) -> jax.Array:
  """Jittable `clopper_pearson_upper`; arguments are not range-checked."""
  k, n, alpha = _as_float(k, n, alpha)
  # By the symmetry of the beta distribution the (1 - alpha)-quantile of
  # Beta(k + 1, n - k) is 1 - the alpha-quantile of Beta(n - k, k + 1); the
  # latter keeps its digits when alpha is tiny.
  bound = 1.0 - _beta_quantile(alpha, n - k, k + 1)
  return jnp.where(k == n, 1.0, bound)
