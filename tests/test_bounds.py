"""Clopper-Pearson bounds: closed forms, statsmodels, and the JAX version."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from ovc_jax import bounds
from ovc_jax import certificates
from ovc_jax.errors import ConfigError

NS = [1, 2, 3, 10, 100, 1000, 10**4, 10**5, 10**6]
ALPHAS = [0.1, 0.05, 1e-3, 1e-4, 1e-6]


def _grid():
  for n in NS:
    ks = sorted({0, 1, 2, n // 10, n // 3, n // 2, n - 2, n - 1, n} & set(range(n + 1)))
    for k in ks:
      for a in ALPHAS:
        yield k, n, a


def test_closed_forms_at_the_edges():
  for n in NS:
    for a in ALPHAS:
      assert bounds.clopper_pearson_lower(0, n, a) == 0.0
      assert bounds.clopper_pearson_upper(n, n, a) == 1.0
      np.testing.assert_allclose(bounds.clopper_pearson_lower(n, n, a),
                                 a ** (1 / n), rtol=1e-12)
      np.testing.assert_allclose(bounds.clopper_pearson_upper(0, n, a),
                                 1 - a ** (1 / n), rtol=1e-9)


def _solves(tail, p, a):
  """tail(p) = a to 1e-6 relative, or its root lies within 4 ulps of p.

  The second clause is for roots within 1e-9 of 1, where float64 cannot hold
  p closely enough for tail(p) to be within 1e-6 of a.
  """
  if abs(tail(p) - a) <= 1e-6 * a:
    return True
  lo, hi = p - 4 * np.spacing(p), p + 4 * np.spacing(p)
  return (tail(lo) - a) * (tail(hi) - a) <= 0


def test_exact_coverage_definition():
  """The bounds solve the binomial tail equations that define them."""
  for k, n, a in _grid():
    lo = bounds.clopper_pearson_lower(k, n, a)
    up = bounds.clopper_pearson_upper(k, n, a)
    assert 0.0 <= lo <= k / n <= up <= 1.0
    if 0 < k:  # P[Bin(n, lo) >= k] = a
      assert _solves(lambda p: stats.binom.sf(k - 1, n, p), lo, a), (k, n, a)
    if k < n:  # P[Bin(n, up) <= k] = a
      assert _solves(lambda p: stats.binom.cdf(k, n, p), up, a), (k, n, a)


def test_against_statsmodels_where_it_is_right():
  # statsmodels' two-sided interval at level 2a has our one-sided bounds as its
  # ends. Its k = 0 and k = n ends are its known edge-case bugs (nan or
  # inexact at tiny alpha); the closed-form test above covers those.
  for k, n, a in _grid():
    if k in (0, n):
      continue
    lo, up = proportion_confint(k, n, alpha=2 * a, method="beta")
    np.testing.assert_allclose(bounds.clopper_pearson_lower(k, n, a), lo,
                               rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(bounds.clopper_pearson_upper(k, n, a), up,
                               rtol=1e-9, atol=1e-15)


def test_vectorised_matches_scalar():
  k = np.array([0, 3, 50, 100])
  lo = bounds.clopper_pearson_lower(k, 100, 0.01)
  up = bounds.clopper_pearson_upper(k, 100, 0.01)
  for i, kk in enumerate(k):
    assert lo[i] == bounds.clopper_pearson_lower(int(kk), 100, 0.01)
    assert up[i] == bounds.clopper_pearson_upper(int(kk), 100, 0.01)


@pytest.mark.parametrize("args, message", [
    ((-1, 10, 0.01), "counts"), ((11, 10, 0.01), "counts"),
    ((1, 0, 0.01), "n must be"), ((1, 10, 0.0), "alpha"),
    ((1, 10, 1.0), "alpha"), ((1, 10, float("nan")), "alpha"),
])
def test_bad_arguments(args, message):
  with pytest.raises(ConfigError, match=message):
    bounds.clopper_pearson_lower(*args)
  with pytest.raises(ConfigError, match=message):
    bounds.clopper_pearson_upper(*args)


JAX_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    if sys.argv[1] == "x64":
      jax.config.update("jax_enable_x64", True)
    import numpy as np
    from ovc_jax import bounds
    k, n, a = (np.array(v) for v in zip(*eval(sys.stdin.read())))
    lo = jax.jit(bounds.clopper_pearson_lower_jax)(k, n, a)
    up = jax.jit(bounds.clopper_pearson_upper_jax)(k, n, a)
    print(repr((np.asarray(lo, np.float64).tolist(), np.asarray(up, np.float64).tolist())))
""")


def _dense_grid():
  """Evenly spaced k at large n, where JAX's own float32 betainc (200
  continued-fraction terms) put the lower bound up to 2.5e-3 too high."""
  for n in (10**4, 10**6):
    for k in np.unique(np.linspace(0, n, 1001).astype(int)):
      for a in (0.1, 1e-3, 1e-6):
        yield int(k), n, a


@pytest.fixture(scope="module", params=["x64", "float32"])
def jax_bounds(request):
  # A subprocess, because x64 is a process-wide switch.
  mode = request.param
  grid = list(_grid()) + list(_dense_grid())
  proc = subprocess.run(
      [sys.executable, "-c", JAX_SCRIPT, mode], input=repr(grid),
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lo_jax, up_jax = (np.array(v) for v in eval(proc.stdout.strip().splitlines()[-1]))
  k, n, a = (np.array(v) for v in zip(*grid))
  return mode, k, n, a, lo_jax, up_jax


def test_jax_bounds_agree_with_scipy(jax_bounds):
  mode, k, n, a, lo_jax, up_jax = jax_bounds
  sparse = len(list(_grid()))  # the grid this test has always checked
  k, n, a, lo_jax, up_jax = (v[:sparse] for v in (k, n, a, lo_jax, up_jax))
  lo, up = bounds.clopper_pearson_lower(k, n, a), bounds.clopper_pearson_upper(k, n, a)
  if mode == "x64":
    tol = np.full(len(k), 1e-9)
  else:
    tol = np.array([bounds.jax_float32_tolerance(nn) for nn in n])
  assert np.all(np.abs(lo_jax - lo) <= tol), np.max(np.abs(lo_jax - lo) - tol)
  assert np.all(np.abs(up_jax - up) <= tol), np.max(np.abs(up_jax - up) - tol)


def test_jax_bounds_round_toward_safety(jax_bounds):
  """Lower bounds never above scipy's, upper bounds never below, and each
  within the stated tolerance (twice the safety margin) of it, also on a
  dense grid of k at n = 10^4 and 10^6."""
  mode, k, n, a, lo_jax, up_jax = jax_bounds
  lo, up = bounds.clopper_pearson_lower(k, n, a), bounds.clopper_pearson_upper(k, n, a)
  if mode == "x64":
    tol = np.full(len(k), bounds.JAX_FLOAT64_TOLERANCE)
  else:
    tol = np.array([bounds.jax_float32_tolerance(nn) for nn in n])
  assert np.all(lo_jax <= lo), (np.max(lo_jax - lo), k[np.argmax(lo_jax - lo)])
  assert np.all(up_jax >= up), (np.max(up - up_jax), k[np.argmax(up - up_jax)])
  assert np.all(lo - lo_jax <= tol), np.max(lo - lo_jax - tol)
  assert np.all(up_jax - up <= tol), np.max(up_jax - up - tol)
  assert np.all((0 <= lo_jax) & (lo_jax <= up_jax) & (up_jax <= 1))
  # The exact edges stay exact.
  assert np.all(lo_jax[k == 0] == 0.0) and np.all(up_jax[k == n] == 1.0)


def test_jax_certificate_radius_never_exceeds_scipy():
  """certificate_from_counts_jax (float32 here) never certifies a larger
  radius than certificate_from_counts, nor another class."""
  rows = []
  for n in (100, 1000, 10**4, 10**5, 10**6):
    for k in np.unique(np.linspace(n // 2, n, 41).astype(int)):
      for a in (1e-3, 1e-6):
        for sigma in (0.12, 0.25, 0.5, 1.0):
          rows.append((k, n, a, sigma))
  k, n, a, sigma = (np.array(v) for v in zip(*rows))
  counts = np.stack([k, n - k], axis=1)
  counts0 = np.tile([10, 1], (len(rows), 1))
  pred, radius, p_lower = jax.jit(certificates.certificate_from_counts_jax)(
      counts0, counts, sigma, a, n=n)
  pred, radius, p_lower = (np.asarray(v, np.float64) for v in (pred, radius, p_lower))
  certified = 0
  for i, row in enumerate(rows):
    ref = certificates.certificate_from_counts(counts0[i], counts[i], n=int(n[i]),
                                               sigma=float(sigma[i]),
                                               alpha=float(a[i]))
    assert radius[i] <= ref.radius, (row, radius[i], ref.radius)
    assert p_lower[i] <= ref.pA_lower, (row, p_lower[i], ref.pA_lower)
    assert pred[i] in (ref.prediction, certificates.ABSTAIN), row
    if ref.prediction != certificates.ABSTAIN:
      certified += 1
      assert ref.pA_lower - p_lower[i] <= bounds.jax_float32_tolerance(n[i])
  assert certified > len(rows) // 2
