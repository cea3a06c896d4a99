"""MVN-OVC: agrees with Cached-OVC when the embeddings are exactly Gaussian.

With a linear encoder z = A x + c (not normalised), the noisy embeddings are
N(A x + c, sigma^2 A A^T) exactly, so MVN-OVC's logit model is the truth up to
the error of the fitted mean and covariance. Its class counts must then agree
with Cached-OVC's counts within sampling error: a Fisher exact test per class,
Bonferroni-corrected to a total level of 0.001.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import cached_ovc, mvn_ovc
from ovc_jax.certifiers.mvn_ovc import MVNParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError, InputError

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D, E, C = 10, 5, 4
LEVEL = 1e-3


def problem(seed):
  rng = np.random.default_rng(seed)
  encoder = {"A": jnp.asarray(rng.normal(size=(E, D)) / 3, jnp.float32),
             "c": jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32)}
  prompts = jnp.asarray(rng.normal(size=(3, C, E)), jnp.float32)
  x = jnp.asarray(rng.normal(size=D) * 0.3, jnp.float32)
  return encoder, prompts, x


def cache_for(encoder, prompts, x, key, sigma, n):
  draws = sampler.sample_certification_draws(
      LINEAR, LINEAR.params(encoder, prompts[0]), x, key,
      sigma=sigma, num_classes=C, n0=100, n=n, batch_size=10_000,
      outputs=("counts", "embeddings"))
  return cached_ovc.embeddings_from_draws(draws)


def counts_agree(a, b):
  """No class's counts differ beyond sampling error (Fisher, Bonferroni)."""
  na, nb = a.sum(), b.sum()
  p_values = [stats.fisher_exact([[a[c], na - a[c]], [b[c], nb - b[c]]])[1]
              for c in range(len(a))]
  return min(p_values) > LEVEL / len(a)


@pytest.mark.parametrize("seed, sigma", [(0, 0.25), (1, 0.5), (2, 1.0)])
def test_counts_agree_with_cached_ovc_for_gaussian_embeddings(seed, sigma):
  encoder, prompts, x = problem(seed)
  key = jax.random.key(seed)
  cache = cache_for(encoder, prompts, x, key, sigma, n=100_000)
  fit = mvn_ovc.fit_gaussian(cache.estimation)
  exact = cached_ovc.certify_cached_many(cache, prompts, sigma=sigma)
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=10_000)
  approx = mvn_ovc.certify_mvn_many(fit, prompts, key, smoothing,
                                    MVNParams(delta=0.0))
  for e, a in zip(exact, approx):
    assert counts_agree(e.counts, a.counts), (e.counts, a.counts)
  # The test can fail: a covariance twice too wide is caught.
  wrong = mvn_ovc.GaussianFit(fit.mean, fit.factor * 2.0)
  wide = mvn_ovc.certify_mvn_many(wrong, prompts, key, smoothing,
                                  MVNParams(delta=0.0))
  assert not all(counts_agree(e.counts, w.counts) for e, w in zip(exact, wide))


def test_fit_recovers_the_true_gaussian():
  encoder, prompts, x = problem(3)
  sigma = 0.5
  cache = cache_for(encoder, prompts, x, jax.random.key(0), sigma, n=100_000)
  fit = mvn_ovc.fit_gaussian(cache.estimation)
  a = np.asarray(encoder["A"], np.float64)
  true_mean = a @ np.asarray(x) + np.asarray(encoder["c"])
  true_cov = sigma ** 2 * a @ a.T
  cov = np.asarray(fit.factor) @ np.asarray(fit.factor).T
  np.testing.assert_allclose(fit.mean, true_mean, atol=5 * sigma / np.sqrt(1e5))
  np.testing.assert_allclose(cov, true_cov, atol=0.02 * np.abs(true_cov).max())


def test_margin_lowers_p_lower_by_delta():
  encoder, prompts, x = problem(4)
  key = jax.random.key(0)
  fit = mvn_ovc.fit_gaussian(cache_for(encoder, prompts, x, key, 0.25, 5000).estimation)
  smoothing = SmoothingParams(sigma=0.25, n0=100, n=5000)
  base = mvn_ovc.certify_mvn(fit, prompts[1], key, smoothing,
                             MVNParams(delta=0.0))
  lowered = mvn_ovc.certify_mvn(fit, prompts[1], key, smoothing,
                                MVNParams(delta=0.02))
  np.testing.assert_array_equal(base.counts, lowered.counts)
  if lowered.prediction != certificates.ABSTAIN:
    assert lowered.pA_lower == pytest.approx(base.pA_lower - 0.02)
    assert lowered.radius < base.radius
  # with_margin turns the no-margin result into the margin result.
  shifted = mvn_ovc.with_margin(base, 0.02, 0.25)
  assert shifted.prediction == lowered.prediction
  assert shifted.radius == pytest.approx(lowered.radius, abs=1e-12)
  assert shifted.pA_lower == pytest.approx(lowered.pA_lower, abs=1e-12)
  np.testing.assert_array_equal(shifted.counts, lowered.counts)


def test_required_margin_and_calibration():
  cert = lambda c, p, r: certificates.Certificate(c, r, p, np.zeros(2))
  exact = [cert(0, 0.80, 0.2), cert(certificates.ABSTAIN, 0.4, 0.0),
           cert(1, 0.9, 0.3), cert(0, 0.95, 0.4)]
  mvn = [cert(0, 0.83, 0.25), cert(0, 0.56, 0.03), cert(0, 0.7, 0.1),
         cert(0, 0.94, 0.39)]
  assert mvn_ovc.required_margin(mvn[0], exact[0]) == pytest.approx(0.03)
  assert mvn_ovc.required_margin(mvn[1], exact[1]) == pytest.approx(0.06)
  assert mvn_ovc.required_margin(mvn[2], exact[2]) == pytest.approx(0.2)
  assert mvn_ovc.required_margin(mvn[3], exact[3]) == 0.0
  cal = mvn_ovc.calibrate_margin(mvn, exact)
  assert cal.delta == pytest.approx(0.2)
  assert cal.overshoot_rate == 0.75 and cal.pairs == 4
  assert cal.max_overshoot == pytest.approx(0.1)


@pytest.mark.parametrize("delta", [-0.01, 1.0])
def test_bad_margin(delta):
  encoder, prompts, x = problem(0)
  fit = mvn_ovc.GaussianFit(jnp.zeros(E), jnp.eye(E))
  with pytest.raises(ConfigError, match="margin"):
    mvn_ovc.certify_mvn(fit, prompts[0], jax.random.key(0),
                        SmoothingParams(sigma=0.5, n0=10, n=10),
                        MVNParams(delta=delta))


def test_prompt_of_another_embedding_size():
  fit = mvn_ovc.GaussianFit(jnp.zeros(E), jnp.eye(E))
  with pytest.raises(InputError, match="embedding size"):
    mvn_ovc.certify_mvn(fit, jnp.ones((C, E + 2)), jax.random.key(0),
                        SmoothingParams(sigma=0.5, n0=10, n=10),
                        MVNParams(delta=0.0))
