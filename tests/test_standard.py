"""Standard RS (CERTIFY, PREDICT) against exact answers for linear classifiers.

A linear classifier f(x) = argmax(A x + c) under Gaussian noise N(0, sigma^2 I)
has closed forms: with two classes, P[f(x + e) = cA] = Phi(m / sigma) for the
signed distance m = |w.x + b| / ||w|| to the decision boundary, which is also
the smoothed classifier's true robust radius. A certificate is wrong when it
names the wrong class or a radius above the true radius; Cohen et al.'s theorem
says that happens with probability at most alpha.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import standard
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError, InputError

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D = 8


def linear_problem(margins, sigma):
  """Classes 0..K with x at distance margins[j] * sigma from boundary 0|j+1.

  Class 0's logit is 0; class j+1's logit is -u_j.(x + e) + c_j with
  orthonormal u_j, so the K events "class 0 beats class j+1" are independent
  and P[f(x + e) = 0] = prod_j Phi(margins[j]) exactly.
  """
  k = len(margins)
  u = np.eye(D)[:k]
  rng = np.random.default_rng(0)
  x = rng.normal(size=D)
  x -= u.T @ (u @ x)                # x orthogonal to every u_j ...
  c = -np.asarray(margins) * sigma  # ... so u_j.x - c_j = margins[j] * sigma
  a = np.concatenate([np.zeros((1, D)), -u])
  params = {"encoder": {"A": jnp.asarray(a, jnp.float32),
                        "c": jnp.asarray(np.concatenate([[0.0], c]), jnp.float32)},
            "class_embeddings": jnp.eye(k + 1, dtype=jnp.float32)}
  p_a = float(np.prod(stats.norm.cdf(margins)))
  return params, jnp.asarray(x, jnp.float32), p_a


def _failure_bound(alpha, trials):
  return alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def _certify_many_keys(params, x, sigma, num_classes, trials, n, alpha):
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=n, alpha=alpha,
                              batch_size=n)
  return [standard.certify(jax.random.key(seed), LINEAR, params, x, smoothing,
                           num_classes=num_classes)
          for seed in range(trials)]


def test_two_class_soundness_over_2000_keys():
  sigma, alpha, trials = 0.5, 0.01, 2000
  params, x, p_a = linear_problem([1.2], sigma)
  true_radius = 1.2 * sigma
  certs = _certify_many_keys(params, x, sigma, 2, trials, n=1000, alpha=alpha)
  wrong = [c.prediction not in (0, certificates.ABSTAIN) or c.radius > true_radius
           for c in certs]
  rate = np.mean(wrong)
  assert rate <= _failure_bound(alpha, trials), rate
  # The test has power: the point estimate k/n in place of the lower bound
  # overshoots the true radius about half the time.
  naive = [sigma * stats.norm.ppf(min(c.counts[0] / 1000, 1 - 1e-9)) > true_radius
           for c in certs]
  assert 0.35 < np.mean(naive) < 0.65
  # And the certificates are not vacuous.
  assert np.mean([c.prediction == 0 for c in certs]) > 0.99
  assert np.mean([c.radius for c in certs]) > 0.8 * true_radius


def test_multiclass_soundness_over_2000_keys():
  sigma, alpha, trials = 0.25, 0.01, 2000
  params, x, p_a = linear_problem([1.5, 2.0, 1.8], sigma)
  # Cohen's radius at the exact pA: a lower bound on the true robust radius.
  exact_radius = sigma * stats.norm.ppf(p_a)
  certs = _certify_many_keys(params, x, sigma, 4, trials, n=1000, alpha=alpha)
  wrong = [c.prediction not in (0, certificates.ABSTAIN) or c.radius > exact_radius
           for c in certs]
  assert np.mean(wrong) <= _failure_bound(alpha, trials), np.mean(wrong)
  mean_freq = np.mean([c.counts[0] / 1000 for c in certs])
  assert abs(mean_freq - p_a) < 4 * np.sqrt(p_a * (1 - p_a) / (1000 * trials))


def test_large_n_radius_within_one_percent_of_true_radius():
  sigma = 0.5
  params, x, _ = linear_problem([1.5], sigma)
  cert = standard.certify(
      jax.random.key(7), LINEAR, params, x,
      SmoothingParams(sigma=sigma, n0=100, n=1_000_000, alpha=0.001,
                      batch_size=100_000), num_classes=2)
  true_radius = 1.5 * sigma
  assert cert.prediction == 0
  assert cert.radius <= true_radius
  assert cert.radius >= 0.99 * true_radius, cert.radius / true_radius


def test_abstains_when_no_class_dominates():
  sigma = 1.0
  params, x, _ = linear_problem([0.0], sigma)  # x on the boundary: pA = 0.5
  cert = standard.certify(
      jax.random.key(0), LINEAR, params, x,
      SmoothingParams(sigma=sigma, n0=100, n=2000, alpha=0.001,
                      batch_size=500), num_classes=2)
  assert cert.prediction == certificates.ABSTAIN and cert.radius == 0.0


def test_predict_errs_at_most_alpha():
  sigma, alpha, trials = 0.5, 0.01, 1000
  params, x, _ = linear_problem([0.1], sigma)  # pA = 0.54: often abstains
  smoothing = SmoothingParams(sigma=sigma, n=500, alpha=alpha, batch_size=500)
  wrong = []
  for seed in range(trials):
    p = standard.predict(jax.random.key(seed), LINEAR, params, x, smoothing,
                         num_classes=2)
    wrong.append(p == 1)
  assert np.mean(wrong) <= _failure_bound(alpha, trials)
  params, x, _ = linear_problem([2.0], sigma)
  assert standard.predict(jax.random.key(0), LINEAR, params, x, smoothing,
                          num_classes=2) == 0


def test_certify_many_equals_certify_alone():
  rng = np.random.default_rng(3)
  enc = {"A": jnp.asarray(rng.normal(size=(5, D)), jnp.float32),
         "c": jnp.zeros(5, jnp.float32)}
  prompts = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=D), jnp.float32)
  smoothing = SmoothingParams(sigma=0.3, n0=50, n=300, alpha=0.01,
                              batch_size=64)
  many = standard.certify_many(
      jax.random.key(1), LINEAR, EmbeddingClassifier.params(enc, prompts),
      x, smoothing, num_classes=4)
  for p, cert in enumerate(many):
    alone = standard.certify(
        jax.random.key(1), LINEAR, EmbeddingClassifier.params(enc, prompts[p]),
        x, smoothing, num_classes=4)
    assert alone.prediction == cert.prediction
    assert alone.radius == cert.radius
    np.testing.assert_array_equal(alone.counts, cert.counts)


def test_selection_and_estimation_streams_are_disjoint():
  key = jax.random.key(0)
  sel = sampler.standard_normal_samples(sampler.selection_key(key),
                                        jnp.arange(100), (D,))
  est = sampler.standard_normal_samples(sampler.estimation_key(key),
                                        jnp.arange(100), (D,))
  assert not np.any(np.all(np.isclose(sel[:, None], est[None]), axis=-1))


def test_jax_certificate_matches_scipy():
  counts0 = np.array([[90, 10, 0], [40, 30, 30], [0, 100, 0]])
  counts = np.array([[950, 50, 0], [400, 300, 300], [0, 990, 10]])
  pred, radius, p_lower = jax.jit(certificates.certificate_from_counts_jax)(
      counts0, counts, 0.25, 0.001, n=1000)
  for i in range(3):
    ref = certificates.certificate_from_counts(counts0[i], counts[i], n=1000,
                                               sigma=0.25, alpha=0.001)
    assert int(pred[i]) == ref.prediction
    np.testing.assert_allclose(float(radius[i]), ref.radius, atol=1e-4)
    np.testing.assert_allclose(float(p_lower[i]), ref.pA_lower, atol=1e-5)


@pytest.mark.parametrize("bad, error, message", [
    (dict(sigma=0.0), ConfigError, "sigma"),
    (dict(sigma=-0.5), ConfigError, "sigma"),
    (dict(n0=0), ConfigError, "n0"),
    (dict(n=0), ConfigError, "n "),
    (dict(alpha=0.0), ConfigError, "alpha"),
    (dict(alpha=1.0), ConfigError, "alpha"),
    (dict(batch_size=0), ConfigError, "batch size"),
])
def test_bad_arguments(bad, error, message):
  params, x, _ = linear_problem([1.0], 0.5)
  kw = dict(sigma=0.5, n0=10, n=10, alpha=0.01, batch_size=5)
  kw.update(bad)
  with pytest.raises(error, match=message):
    standard.certify(jax.random.key(0), LINEAR, params, x,
                     SmoothingParams(**kw), num_classes=2)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_input(value):
  params, x, _ = linear_problem([1.0], 0.5)
  x = x.at[3].set(value)
  with pytest.raises(InputError, match="NaN or infinite"):
    standard.certify(jax.random.key(0), LINEAR, params, x,
                     SmoothingParams(sigma=0.5, n0=10, n=10), num_classes=2)


def test_num_classes_that_disagrees_with_the_class_matrix():
  params, x, _ = linear_problem([1.0], 0.5)
  with pytest.raises(ConfigError, match="the class counts differ"):
    standard.certify(jax.random.key(0), LINEAR, params, x,
                     SmoothingParams(sigma=0.5, n0=10, n=10), num_classes=3)
  # By default the count is the classifier's own.
  default = standard.certify(jax.random.key(0), LINEAR, params, x,
                             SmoothingParams(sigma=0.5, n0=10, n=10))
  assert default.counts.shape == (2,)
