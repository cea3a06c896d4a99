"""Sequential CERTIFY: valid at its stopping time, stops early, same draws everywhere.

Validity is tested two ways over the same code path (`sequential_certify_many`):
thousands of keys through a Bernoulli counts function with known pA (fast),
and a few hundred through the keyed sampler on linear classifiers, whose pA
and robust radius are exact. A certificate fails when it names a class whose
probability is <= 1/2 or a radius above sigma * PhiInv(pA). A variant that
reads Clopper-Pearson at the full alpha at every checkpoint must fail the same
assertion: the test has the power to see an uncorrected repeated look.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax import sequential_exact
from ovc_jax.certificates import ABSTAIN, SmoothingParams
from ovc_jax.certifiers import sequential as sq
from ovc_jax.certifiers import standard
from ovc_jax.certifiers.cached_ovc import EmbeddingDraws, embeddings_from_draws
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError, InputError

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D = 8

ALPHA = 0.1          # large, so that failure rates are measurable
SIGMA = 0.25
MAX_RADIUS = 0.25    # stop once lower >= P_STAR
P_STAR = float(stats.norm.cdf(MAX_RADIUS / SIGMA))
N0 = 100
TRIALS = 2500


def seq_params(split="uniform", cls=sq.SequentialParams, precision=None):
  return cls(max_radius=MAX_RADIUS, n_max=3200, first_block=100,
             alpha_split=split, precision=precision)
  # checkpoints 100, 200, ..., 3200 (J = 6)


# Binds for pA in the middle band: at 0.75 the bounds' radius gap falls below
# it around 800-1600 draws.
PRECISION = 0.04


class Uncorrected(sq.SequentialParams):
  """Deliberately broken: CP at the full alpha at every checkpoint."""

  def checkpoint_alphas(self, alpha):
    return np.full(len(self.checkpoints()), alpha)


def failure_limit(trials, alpha=ALPHA):
  """The 1 - 1e-3 quantile of Binomial(trials, alpha)."""
  return stats.binom.ppf(1 - 1e-3, trials, alpha)


def is_failure(cert, p_class0):
  """Two classes, P[f = 0] = p_class0: wrong class or radius above the truth."""
  if cert.prediction == ABSTAIN:
    return False
  p = p_class0 if cert.prediction == 0 else 1.0 - p_class0
  return p <= 0.5 or cert.radius > SIGMA * stats.norm.ppf(p)


def bernoulli_runs(p_a, params, trials=TRIALS, seed=0):
  """`sequential_certify` on keyed Bernoulli(p_a) streams: its results."""
  k_est, k_sel = jax.random.split(jax.random.key(seed))
  hits = np.asarray(jax.random.bernoulli(k_est, p_a, (trials, params.n_max)))
  cum = np.concatenate([np.zeros((trials, 1), np.int64),
                        np.cumsum(hits, axis=1)], axis=1)
  sel = np.asarray(jax.random.bernoulli(k_sel, p_a, (trials, N0)).sum(1))
  out = []
  for t in range(trials):
    def draw(first, num, t=t):
      k = cum[t, first + num] - cum[t, first]
      return np.array([k, num - k])
    out.append(sq.sequential_certify(draw, np.array([sel[t], N0 - sel[t]]),
                                     sigma=SIGMA, alpha=ALPHA, params=params))
  return out


def bernoulli_failures(p_a, params, trials=TRIALS, seed=0):
  """Failures of `sequential_certify` on keyed Bernoulli(p_a) streams."""
  runs = bernoulli_runs(p_a, params, trials, seed)
  failures = sum(is_failure(r.certificate, p_a) for r in runs)
  return failures, float(np.mean([r.draws for r in runs]))


# pA just above 1/2 (the certify-or-abstain threshold) and just below
# Phi(max_radius / sigma) (the early-stop threshold: every early stop fails).
@pytest.mark.parametrize("split", ["uniform", "basel"])
@pytest.mark.parametrize("p_a", [0.505, P_STAR - 0.002])
def test_valid_over_2500_bernoulli_keys(split, p_a):
  failures, _ = bernoulli_failures(p_a, seq_params(split))
  assert failures <= failure_limit(TRIALS), failures / TRIALS


def test_uncorrected_repeated_look_fails_the_same_assertion():
  failures, _ = bernoulli_failures(P_STAR - 0.002, seq_params(cls=Uncorrected))
  assert failures > failure_limit(TRIALS), failures / TRIALS


# --- the precision stop --------------------------------------------------------

# Just inside both band edges, and in the band where the precision stop binds.
# 0.85: where the full-alpha rule below fails most (exact calculator: 0.20).
@pytest.mark.parametrize("p_a", [0.505, 0.75, 0.85, P_STAR - 0.002])
def test_precision_stop_valid_over_2500_bernoulli_keys(p_a):
  runs = bernoulli_runs(p_a, seq_params(precision=PRECISION))
  failures = sum(is_failure(r.certificate, p_a) for r in runs)
  assert failures <= failure_limit(TRIALS), failures / TRIALS
  if p_a == 0.75:  # the setting is one where the precision stop binds
    assert np.mean([r.reason == "precision" for r in runs]) > 0.9


def test_precision_stop_uncorrected_fails_the_same_assertion():
  """With CP at the full alpha at every checkpoint the failure rate is above
  the limit, precision stop or not: the test can see a broken rule."""
  failures, _ = bernoulli_failures(
      0.85, seq_params(cls=Uncorrected, precision=PRECISION))
  assert failures > failure_limit(TRIALS), failures / TRIALS


def test_precision_side_costs_no_soundness():
  """The union bound covers the lower bounds at every checkpoint at once, so a
  stopping time chosen by any rule, even an aggressive precision stop, keeps
  the certificate valid; only the precision claim rests on the upper bound."""
  params = seq_params(precision=0.2)  # stops almost always at the first look
  runs = bernoulli_runs(P_STAR - 0.002, params)
  assert np.mean([r.draws == 100 for r in runs]) > 0.9
  failures = sum(is_failure(r.certificate, P_STAR - 0.002) for r in runs)
  assert failures <= failure_limit(TRIALS), failures / TRIALS


def test_precision_stop_keeps_its_promise():
  """At a precision stop, min(upper, Phi((max_radius + precision) / sigma))
  leaves at most `precision` of radius above the one reported."""
  params = seq_params(precision=PRECISION)
  cap = stats.norm.cdf((MAX_RADIUS + PRECISION) / SIGMA)
  alphas = params.checkpoint_alphas(ALPHA)
  stops = 0
  for r in bernoulli_runs(0.75, params, trials=200):
    if r.reason != "precision":
      continue
    stops += 1
    upper = min(r.pA_upper, cap)
    reachable = SIGMA * stats.norm.ppf(upper) if upper > 0.5 else 0.0
    assert reachable - r.certificate.radius <= PRECISION + 1e-12
    k = r.certificate.counts[0]
    assert r.pA_upper == pytest.approx(
        stats.beta.isf(alphas[r.checkpoint], k + 1, r.draws - k), rel=1e-12)
  assert stops > 150


# --- the exact calculator -------------------------------------------------------

@pytest.mark.parametrize("p_a, precision", [(0.75, PRECISION),
                                            (P_STAR - 0.002, None),
                                            (0.505, PRECISION)])
def test_exact_calculator_agrees_with_simulation(p_a, precision):
  """The simulation also picks cA on N0 selection draws; the calculator takes
  cA as given, so its prediction is the mixture over the selected class."""
  params = seq_params(precision=precision)
  exact = {p: sequential_exact.stopping_distribution(
      p, sigma=SIGMA, alpha=ALPHA, params=params) for p in (p_a, 1 - p_a)}
  for d in exact.values():
    assert d.stop_probability.sum() == pytest.approx(1.0, abs=1e-10)
  w0 = stats.binom.sf(N0 // 2 - 1, N0, p_a)  # class 0 selected (ties to 0)
  mix = lambda f: w0 * f(exact[p_a]) + (1 - w0) * f(exact[1 - p_a])
  cells = mix(lambda d: d.stop_probability)
  runs = bernoulli_runs(p_a, params, seed=1)
  seen = np.zeros_like(cells)
  for r in runs:
    seen[r.checkpoint, sq.STOP_REASONS.index(r.reason)] += 1.0 / TRIALS
  # Every cell within 4.5 standard deviations of its binomial frequency.
  sd = np.sqrt(cells * (1 - cells) / TRIALS)
  assert np.all(np.abs(seen - cells) <= 4.5 * sd + 1e-3), (seen, cells)
  draws = np.array([r.draws for r in runs], np.float64)
  n_j = np.asarray(params.checkpoints(), np.float64)
  mean = mix(lambda d: d.mean_draws)
  sd = np.sqrt(cells.sum(axis=1) @ (n_j - mean) ** 2)  # the exact one
  assert abs(draws.mean() - mean) <= 4.5 * sd / np.sqrt(TRIALS) + 1e-6
  wrong_exact = mix(lambda d: d.wrong_probability)
  wrong = np.mean([is_failure(r.certificate, p_a) for r in runs])
  assert abs(wrong - wrong_exact) <= 4.5 * np.sqrt(
      wrong_exact * (1 - wrong_exact) / TRIALS) + 1e-3
  radius = np.mean([min(r.certificate.radius, MAX_RADIUS) for r in runs])
  assert radius == pytest.approx(mix(lambda d: d.expected_radius), abs=0.01)


def test_exact_wrong_probability_at_most_alpha_and_sees_a_broken_rule():
  grid = np.concatenate([np.linspace(0.45, 0.99, 28), [P_STAR - 0.002]])
  for precision in (None, PRECISION):
    for p_a in grid:
      d = sequential_exact.stopping_distribution(
          p_a, sigma=SIGMA, alpha=ALPHA, params=seq_params(precision=precision))
      assert d.wrong_probability <= ALPHA, (p_a, precision)
  broken = max(sequential_exact.stopping_distribution(
      p_a, sigma=SIGMA, alpha=ALPHA,
      params=seq_params(cls=Uncorrected, precision=PRECISION)).wrong_probability
               for p_a in grid)
  assert broken > ALPHA


def test_precision_stop_does_not_stop_just_below_max_radius():
  """Well above Phi(max_radius / sigma) the rule goes on to certify
  max_radius; capped at max_radius it would stop up to `precision` short."""
  p_a = 0.97  # radius 0.47 against max_radius 0.25
  d = sequential_exact.stopping_distribution(
      p_a, sigma=SIGMA, alpha=ALPHA, params=seq_params(precision=PRECISION))
  assert d.reason_probability()["radius"] > 0.99
  assert d.expected_radius > MAX_RADIUS - 1e-3


def test_exact_one_checkpoint_is_cohens_certify():
  """One look at n: the stopping distribution is CERTIFY's binomial, and the
  expected radius is the binomial average of CERTIFY's radius."""
  n, p_a = 500, 0.8
  k = np.arange(n + 1)
  lower = stats.beta.ppf(ALPHA, k, n - k + 1)
  radius = np.where(lower > 0.5, SIGMA * stats.norm.ppf(np.clip(lower, 0.5, 1)),
                    0.0)
  want = float((stats.binom.pmf(k, n, p_a) * np.minimum(radius, 10.0)).sum())
  got = sequential_exact.fixed_n_expected_radius(p_a, sigma=SIGMA, alpha=ALPHA,
                                                 n=n, max_radius=10.0)
  assert got == pytest.approx(want, rel=1e-9)


def test_exact_bad_inputs():
  with pytest.raises(ConfigError, match="p_a must lie"):
    sequential_exact.stopping_distribution(1.5, sigma=SIGMA, alpha=ALPHA,
                                           params=seq_params())
  with pytest.raises(ConfigError, match="alpha must lie"):
    sequential_exact.stopping_distribution(0.5, sigma=SIGMA, alpha=0.0,
                                           params=seq_params())


def test_no_selection_class_abstains_as_certify_does():
  """All selection counts zero: ABSTAIN at the first checkpoint (not class 0),
  and with one checkpoint the certificate is CERTIFY's, counts included."""
  block = np.array([90, 10])
  r = sq.sequential_certify(lambda first, num: block * num // 100,
                            np.zeros(2, np.int64), sigma=SIGMA, alpha=ALPHA,
                            params=seq_params())
  assert r.certificate.prediction == ABSTAIN and r.reason == "abstain"
  assert r.draws == 100 and r.certificate.pA_lower == 0.0
  one = sq.SequentialParams(max_radius=MAX_RADIUS, n_max=100, schedule=(100,))
  r = sq.sequential_certify(lambda first, num: block, np.zeros(2, np.int64),
                            sigma=SIGMA, alpha=ALPHA, params=one)
  ref = certificates.certificate_from_counts(np.zeros(2), block, n=100,
                                             sigma=SIGMA, alpha=ALPHA)
  assert (r.certificate.prediction, r.certificate.radius,
          r.certificate.pA_lower) == (ref.prediction, ref.radius, ref.pA_lower)
  np.testing.assert_array_equal(r.certificate.counts, ref.counts)


def linear_problem(margins, sigma):
  """Classes 0..K, x at distance margins[j] * sigma from boundary 0|j+1.

  P[f(x + e) = 0] = prod_j Phi(margins[j]) exactly (see test_standard.py).
  """
  k = len(margins)
  u = np.eye(D)[:k]
  rng = np.random.default_rng(0)
  x = rng.normal(size=D)
  x -= u.T @ (u @ x)
  c = -np.asarray(margins) * sigma
  a = np.concatenate([np.zeros((1, D)), -u])
  params = {"encoder": {"A": jnp.asarray(a, jnp.float32),
                        "c": jnp.asarray(np.concatenate([[0.0], c]),
                                         jnp.float32)},
            "class_embeddings": jnp.eye(k + 1, dtype=jnp.float32)}
  return params, jnp.asarray(x, jnp.float32), float(np.prod(
      stats.norm.cdf(margins)))


def test_valid_over_300_encoder_keys():
  trials = 300
  margin = MAX_RADIUS / SIGMA - 0.006     # pA = P_STAR - 0.002
  params, x, p_a = linear_problem([margin], SIGMA)
  smoothing = SmoothingParams(sigma=SIGMA, n0=N0, alpha=ALPHA, batch_size=400)
  failures = sum(
      is_failure(sq.certify_sequential(LINEAR, params, x, jax.random.key(s),
                                       smoothing, seq_params()).certificate,
                 p_a)
      for s in range(trials))
  assert failures <= failure_limit(trials), failures / trials


def test_stops_early_when_pA_is_near_one():
  params, x, p_a = linear_problem([3.0], SIGMA)  # pA = 0.9987
  smoothing = SmoothingParams(sigma=SIGMA, n0=N0, alpha=0.001, batch_size=1000)
  seq = sq.SequentialParams(max_radius=0.4, n_max=100_000, first_block=100)
  for seed in range(5):
    r = sq.certify_sequential(LINEAR, params, x, jax.random.key(seed),
                              smoothing, seq)
    assert r.reason == "radius" and r.certificate.prediction == 0
    assert r.draws <= 400 and r.certificate.radius >= 0.4
    assert r.certificate.counts.sum() == r.draws
    assert r.draws == seq.checkpoints()[r.checkpoint]


def four_symmetric_classes():
  """x = 0 with logits (e_1, -e_1, e_2, -e_2): each class has P = 1/4."""
  a = np.zeros((4, D))
  a[0, 0], a[1, 0], a[2, 1], a[3, 1] = 1, -1, 1, -1
  params = {"encoder": {"A": jnp.asarray(a, jnp.float32),
                        "c": jnp.zeros(4, jnp.float32)},
            "class_embeddings": jnp.eye(4, dtype=jnp.float32)}
  return params, jnp.zeros(D, jnp.float32)


def test_abstains_early_when_pA_is_low():
  params, x = four_symmetric_classes()
  smoothing = SmoothingParams(sigma=SIGMA, n0=N0, alpha=0.001, batch_size=1000)
  seq = sq.SequentialParams(max_radius=0.4, n_max=100_000, first_block=100)
  for seed in range(5):
    r = sq.certify_sequential(LINEAR, params, x, jax.random.key(seed),
                              smoothing, seq)
    assert r.reason == "abstain" and r.certificate.prediction == ABSTAIN
    assert r.certificate.radius == 0.0 and r.pA_upper <= 0.5
    assert r.draws <= 400


def test_one_checkpoint_is_cohens_certify():
  params, x, _ = linear_problem([1.0], 0.5)
  smoothing = SmoothingParams(sigma=0.5, n0=N0, n=1000, alpha=0.001,
                              batch_size=250)
  seq = sq.SequentialParams(max_radius=math.inf, n_max=1000, schedule=(1000,))
  for seed in range(3):
    r = sq.certify_sequential(LINEAR, params, x, jax.random.key(seed),
                              smoothing, seq)
    ref = standard.certify(jax.random.key(seed), LINEAR, params, x, smoothing)
    assert r.draws == 1000 and r.reason == "n_max"
    assert r.certificate.prediction == ref.prediction
    assert r.certificate.radius == ref.radius
    np.testing.assert_array_equal(r.certificate.counts, ref.counts)


# --- the same draws through every front end ---------------------------------

E, C = 6, 5


def mlp_encoder(params, inputs):
  h = jnp.tanh(inputs.reshape(inputs.shape[0], -1) @ params["w1"])
  return h @ params["w2"]


MLP = EmbeddingClassifier(mlp_encoder, normalize=True)


def mlp_setup(num_prompts=4):
  rng = np.random.default_rng(0)
  enc = {"w1": jnp.asarray(rng.normal(size=(D, 16)) / 2, jnp.float32),
         "w2": jnp.asarray(rng.normal(size=(16, E)), jnp.float32)}
  u = rng.normal(size=(num_prompts, C, E))
  prompts = jnp.asarray(u / np.linalg.norm(u, axis=-1, keepdims=True),
                        jnp.float32)
  return enc, prompts


MLP_SMOOTHING = SmoothingParams(sigma=0.5, n0=64, n=1600, alpha=0.01,
                                batch_size=200)
MLP_SEQ = sq.SequentialParams(max_radius=0.15, n_max=1600, first_block=50)


def full_cache(enc, prompts, x, key):
  draws = sampler.sample_certification_draws(
      MLP, MLP.params(enc, prompts), x, key, sigma=MLP_SMOOTHING.sigma,
      num_classes=C, n0=MLP_SMOOTHING.n0, n=MLP_SEQ.n_max,
      batch_size=MLP_SMOOTHING.batch_size, outputs=("counts", "embeddings"))
  return embeddings_from_draws(draws)


def assert_same(a, b):
  assert (a.draws, a.checkpoint, a.reason) == (b.draws, b.checkpoint, b.reason)
  assert a.certificate.prediction == b.certificate.prediction
  assert a.certificate.radius == b.certificate.radius
  assert a.certificate.pA_lower == b.certificate.pA_lower
  np.testing.assert_array_equal(a.certificate.counts, b.certificate.counts)


def test_many_equals_alone_and_cached_equals_encoder():
  enc, prompts = mlp_setup()
  reasons = set()
  for i in range(3):
    x = jnp.asarray(np.random.default_rng(10 + i).normal(size=D), jnp.float32)
    key = jax.random.key(i)
    run = sq.certify_sequential_many(MLP, MLP.params(enc, prompts), x, key,
                                     MLP_SMOOTHING, MLP_SEQ)
    cache = full_cache(enc, prompts, x, key)
    cached = sq.certify_sequential_cached_many(cache, prompts, MLP_SMOOTHING,
                                               MLP_SEQ)
    for p in range(len(prompts)):
      alone = sq.certify_sequential(MLP, MLP.params(enc, prompts[p]), x, key,
                                    MLP_SMOOTHING, MLP_SEQ)
      assert_same(run.results[p], alone)
      assert_same(cached[p], alone)
      assert_same(sq.certify_sequential_cached(cache, prompts[p],
                                               MLP_SMOOTHING, MLP_SEQ), alone)
      reasons.add(alone.reason)
    # The embeddings of exactly the draws made: a prefix of the full stream.
    used = max(r.draws for r in run.results)
    assert run.embeddings.estimation.shape[0] == used
    np.testing.assert_array_equal(run.embeddings.selection, cache.selection)
    np.testing.assert_array_equal(run.embeddings.estimation,
                                  cache.estimation[:used])
  assert reasons == {"abstain", "radius", "n_max"}, reasons  # every stop


def test_short_cache_runs_out_then_extends_to_the_same_answer():
  enc, prompts = mlp_setup()
  for i in range(3):
    x = jnp.asarray(np.random.default_rng(10 + i).normal(size=D), jnp.float32)
    key = jax.random.key(i)
    full = full_cache(enc, prompts, x, key)
    short = EmbeddingDraws(full.selection, full.estimation[:120])
    for p in range(len(prompts)):
      scratch = sq.certify_sequential(MLP, MLP.params(enc, prompts[p]), x,
                                      key, MLP_SMOOTHING, MLP_SEQ)
      res = sq.certify_sequential_cached(short, prompts[p], MLP_SMOOTHING,
                                         MLP_SEQ)
      if scratch.draws <= 100:
        assert_same(res, scratch)
      else:
        assert isinstance(res, sq.OutOfDraws)
        assert res.draws_used == 100 and res.draws_needed == 200
        assert res.checkpoint == 1
      got, cache = sq.certify_sequential_extending(
          MLP, MLP.params(enc, prompts), x, key, short, prompts[p],
          MLP_SMOOTHING, MLP_SEQ)
      assert_same(got, scratch)
      n = cache.estimation.shape[0]
      assert n == max(120, scratch.draws)
      np.testing.assert_array_equal(cache.estimation[:120], short.estimation)
      np.testing.assert_array_equal(cache.estimation, full.estimation[:n])


def test_extend_embeddings_prefix_is_bit_identical():
  enc, prompts = mlp_setup(1)
  x = jnp.asarray(np.random.default_rng(3).normal(size=D), jnp.float32)
  key = jax.random.key(3)
  full = full_cache(enc, prompts, x, key)
  short = EmbeddingDraws(np.asarray(full.selection),
                         np.asarray(full.estimation[:333]))
  longer = sq.extend_embeddings(MLP, MLP.params(enc, prompts), x, key, short,
                                1001, MLP_SMOOTHING)
  assert isinstance(longer.estimation, np.ndarray)
  assert longer.estimation.shape == (1001, E)
  assert longer.estimation[:333].tobytes() == short.estimation.tobytes()
  np.testing.assert_array_equal(longer.estimation, full.estimation[:1001])
  same = sq.extend_embeddings(MLP, MLP.params(enc, prompts), x, key, short,
                              333, MLP_SMOOTHING)
  assert same is short
  with pytest.raises(ConfigError, match="new_total must be"):
    sq.extend_embeddings(MLP, MLP.params(enc, prompts), x, key, short, 100,
                         MLP_SMOOTHING)


# --- the schedule and bad inputs ---------------------------------------------

def test_schedules_and_alpha_splits():
  p = sq.SequentialParams(max_radius=0.5, n_max=100_000, first_block=1000)
  assert p.checkpoints() == (1000, 2000, 4000, 8000, 16000, 32000, 64000,
                             100_000)
  q = sq.SequentialParams(max_radius=0.5, n_max=5000, first_block=100,
                          growth=1.5)
  assert q.checkpoints() == (100, 200, 300, 500, 800, 1200, 1800, 2700, 4100,
                             5000)
  for s in (p, q, q.replace(alpha_split="basel")):
    cps = s.checkpoints()
    assert all(b > a for a, b in zip(cps, cps[1:])) and cps[-1] == s.n_max
    alphas = s.checkpoint_alphas(0.01)
    assert alphas.shape == (len(cps),) and alphas.sum() <= 0.01 * (1 + 1e-12)
  r = sq.SequentialParams(max_radius=1.0, n_max=900, schedule=[100, 300, 900])
  assert r.checkpoints() == (100, 300, 900)


def test_one_sampler_program_per_run():
  """The estimation stream is drawn in chunks of one shape: one program."""
  params, x, _ = linear_problem([0.3], SIGMA)  # runs to n_max
  smoothing = SmoothingParams(sigma=SIGMA, n0=37, alpha=0.001, batch_size=37)
  seq = sq.SequentialParams(max_radius=1.0, n_max=1000, first_block=30)
  before = sampler._sample._cache_size()
  r = sq.certify_sequential(LINEAR, params, x, jax.random.key(0), smoothing,
                            seq)
  assert r.draws == 1000 and r.checkpoint == len(seq.checkpoints()) - 1
  # the selection draws (counts) and the estimation chunks (predictions)
  assert sampler._sample._cache_size() - before == 2


@pytest.mark.parametrize("kw, message", [
    (dict(max_radius=0.0), "max_radius must be"),
    (dict(max_radius=-1.0), "max_radius must be"),
    (dict(max_radius=float("nan")), "max_radius must be"),
    (dict(n_max=0), "n_max must be"),
    (dict(first_block=0), "the first block must be"),
    (dict(n_max=50, first_block=100), r"n_max \(50\) must be >= the first "
                                      r"block \(100\)"),
    (dict(growth=1.0), "growth must be"),
    (dict(schedule=(100, 100, 1000)), "strictly increasing"),
    (dict(schedule=(500, 200, 1000)), "strictly increasing"),
    (dict(schedule=(0, 1000)), "a block size must be >= 1"),
    (dict(schedule=(100, 500)), "must end at n_max"),
    (dict(schedule=()), "schedule is empty"),
    (dict(alpha_split="bonferroni"), "unknown alpha split"),
    (dict(precision=0.0), "precision must be"),
    (dict(precision=-0.1), "precision must be"),
    (dict(precision=float("nan")), "precision must be"),
    (dict(precision=True), "precision must be"),
])
def test_bad_sequential_params(kw, message):
  args = dict(max_radius=0.5, n_max=1000, first_block=100)
  args.update(kw)
  with pytest.raises(ConfigError, match=message):
    sq.SequentialParams(**args)


def test_bad_calls():
  enc, prompts = mlp_setup(2)
  x = jnp.zeros(D, jnp.float32)
  key = jax.random.key(0)
  with pytest.raises(ConfigError, match="takes one classifier"):
    sq.certify_sequential(MLP, MLP.params(enc, prompts), x, key,
                          MLP_SMOOTHING, MLP_SEQ)
  cache = full_cache(enc, prompts, x, key)
  with pytest.raises(InputError, match="64 selection draws but smoothing.n0"):
    sq.certify_sequential_cached(cache, prompts[0],
                                 MLP_SMOOTHING.replace(n0=10), MLP_SEQ)
  with pytest.raises(InputError, match=r"\[C, d\] class matrix"):
    sq.certify_sequential_cached(cache, prompts, MLP_SMOOTHING, MLP_SEQ)
  with pytest.raises(InputError, match="do not fit"):
    sq.sequential_certify(lambda a, m: np.array([m + 1, 0]), np.array([5, 1]),
                          sigma=0.5, alpha=0.01, params=MLP_SEQ)
  with pytest.raises(ConfigError, match="alpha must"):
    sq.sequential_certify(lambda a, m: np.array([m, 0]), np.array([5, 1]),
                          sigma=0.5, alpha=0.0, params=MLP_SEQ)
