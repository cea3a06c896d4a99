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
  exact = cached_ovc.certify_cached_many(
      cache, prompts, SmoothingParams(sigma=sigma, n0=100, n=100_000))
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=10_000)
  approx = mvn_ovc.certify_mvn_many(key, fit, prompts, smoothing,
                                    MVNParams(delta=0.0))
  for e, a in zip(exact, approx):
    assert counts_agree(e.counts, a.counts), (e.counts, a.counts)
  # The test can fail: a covariance twice too wide is caught.
  wrong = mvn_ovc.GaussianFit(fit.mean, fit.factor * 2.0)
  wide = mvn_ovc.certify_mvn_many(key, wrong, prompts, smoothing,
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
  base = mvn_ovc.certify_mvn(key, fit, prompts[1], smoothing,
                             MVNParams(delta=0.0))
  lowered = mvn_ovc.certify_mvn(key, fit, prompts[1], smoothing,
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
    mvn_ovc.certify_mvn(jax.random.key(0), fit, prompts[0],
                        SmoothingParams(sigma=0.5, n0=10, n=10),
                        MVNParams(delta=delta))


def test_prompt_of_another_embedding_size():
  fit = mvn_ovc.GaussianFit(jnp.zeros(E), jnp.eye(E))
  with pytest.raises(InputError, match="embedding size"):
    mvn_ovc.certify_mvn(jax.random.key(0), fit, jnp.ones((C, E + 2)),
                        SmoothingParams(sigma=0.5, n0=10, n=10),
                        MVNParams(delta=0.0))


def test_counts_agree_with_cached_ovc_with_more_classes_than_dimensions():
  """C > d: the logit factor is U F itself (rank d), not a QR's R."""
  encoder, _, x = problem(5)
  prompts = jnp.asarray(np.random.default_rng(5).normal(size=(2, 2 * E, E)),
                        jnp.float32)
  key, sigma = jax.random.key(5), 0.5
  draws = sampler.sample_certification_draws(
      LINEAR, LINEAR.params(encoder, prompts[0]), x, key, sigma=sigma,
      num_classes=2 * E, n0=100, n=100_000, batch_size=10_000,
      outputs=("embeddings",))
  cache = cached_ovc.embeddings_from_draws(draws)
  fit = mvn_ovc.fit_gaussian(cache.estimation)
  exact = cached_ovc.certify_cached_many(
      cache, prompts, SmoothingParams(sigma=sigma, n0=100, n=100_000))
  approx = mvn_ovc.certify_mvn_many(
      key, fit, prompts, SmoothingParams(sigma=sigma, n0=100, n=10_000),
      MVNParams(delta=0.0))
  for e, a in zip(exact, approx):
    assert counts_agree(e.counts, a.counts), (e.counts, a.counts)


@pytest.mark.parametrize("classes", [3, E, 2 * E])
def test_logit_factor_reproduces_the_logit_covariance(classes):
  rng = np.random.default_rng(classes)
  factor = rng.normal(size=(E, E)) / 3
  fit = mvn_ovc.GaussianFit(jnp.asarray(rng.normal(size=E), jnp.float32),
                            jnp.asarray(factor, jnp.float32))
  u = rng.normal(size=(2, classes, E))
  mean, b = mvn_ovc.logit_gaussian(fit, jnp.asarray(u, jnp.float32))
  assert b.shape == (2, classes, min(classes, E))
  want_cov = u @ factor @ factor.T @ np.swapaxes(u, -1, -2)
  b = np.asarray(b, np.float64)
  np.testing.assert_allclose(b @ np.swapaxes(b, -1, -2), want_cov,
                             atol=1e-5 * np.abs(want_cov).max())
  np.testing.assert_allclose(mean, u @ np.asarray(fit.mean), rtol=1e-5,
                             atol=1e-6)


def _fit_and_prompts(seed=0):
  encoder, prompts, x = problem(seed)
  cache = cache_for(encoder, prompts, x, jax.random.key(seed), 0.5, 5000)
  return mvn_ovc.fit_gaussian(cache.estimation), prompts


def test_draws_do_not_depend_on_the_batch_size():
  fit, prompts = _fit_and_prompts()
  key = jax.random.key(3)
  smoothing = SmoothingParams(sigma=0.5, n0=100,
                              n=3 * mvn_ovc.LATENT_BLOCK + 17)
  results = [mvn_ovc.certify_mvn_many(key, fit, prompts, smoothing,
                                      MVNParams(delta=0.0, batch_size=b))
             for b in (1, mvn_ovc.LATENT_BLOCK, 2500, 100_000)]
  for other in results[1:]:
    for a, b in zip(results[0], other):
      np.testing.assert_array_equal(a.counts, b.counts)
      assert (a.prediction, a.pA_lower) == (b.prediction, b.pA_lower)
  assert all(int(c.counts.sum()) == smoothing.n for c in results[0])
  # Another key gives other draws; the same key the same ones.
  again = mvn_ovc.certify_mvn_many(key, fit, prompts, smoothing,
                                   MVNParams(delta=0.0))
  other = mvn_ovc.certify_mvn_many(jax.random.key(4), fit, prompts, smoothing,
                                   MVNParams(delta=0.0))
  assert all(np.array_equal(a.counts, b.counts)
             for a, b in zip(results[0], again))
  assert not all(np.array_equal(a.counts, b.counts)
                 for a, b in zip(results[0], other))


def test_latent_blocks_are_keyed_standard_normals():
  """Block b of a stream: Threefry-2x32 of fold_in(stream, b) on counters
  0.., each word through the inverse normal CDF (never infinite)."""
  from jax.extend.random import threefry_2x32
  from scipy.special import erfinv
  stream = jax.random.key(11)
  r = 7
  got = np.asarray(mvn_ovc.latent_normals(stream, 5, r), np.float64)
  assert got.shape == (mvn_ovc.LATENT_BLOCK, r)
  bits = np.asarray(threefry_2x32(  # r rounded up to even: 8 rows of words
      jax.random.key_data(jax.random.fold_in(stream, 5)),
      jnp.arange(mvn_ovc.LATENT_BLOCK * (r + 1), dtype=jnp.uint32)))
  magnitude = ((bits & 0x7FFFFF).astype(np.float64) + 0.5) / 2.0 ** 23
  x = np.where(bits >> 31 == 1, -magnitude, magnitude)  # 2u - 1
  want = (np.sqrt(2.0) * erfinv(x)).reshape(r + 1, -1)[:r].T  # latent-major

  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
  # Many blocks together: standard normal, independent coordinates.
  many = np.concatenate([np.asarray(mvn_ovc.latent_normals(stream, b, 64))
                         for b in range(16)]).astype(np.float64)
  assert stats.kstest(many.reshape(-1), "norm").pvalue > LEVEL
  assert abs(many.mean()) < 5 / np.sqrt(many.size)
  assert abs(many.var() - 1) < 5 * np.sqrt(2 / many.size)
  corr = np.corrcoef(many.T)
  off = corr[~np.eye(64, dtype=bool)]
  assert np.abs(off).max() < 5 / np.sqrt(many.shape[0])
  assert not np.array_equal(
      mvn_ovc.latent_normals(stream, 0, r), mvn_ovc.latent_normals(stream, 1, r))
  # The extreme words map to finite normals, symmetric about 0.
  extreme = np.asarray(mvn_ovc.bits_to_normal(jnp.asarray(
      [0, 0x7FFFFF, 0x80000000, 0xFFFFFFFF], jnp.uint32)))
  assert np.all(np.isfinite(extreme))
  np.testing.assert_array_equal(extreme[:2], -extreme[2:])
  assert 5.3 < extreme[1] < 5.5


def test_selection_and_estimation_draws_use_disjoint_streams():
  """The counts are those of the latent blocks of the input's "gaussian"
  stream split like CERTIFY's (selection, estimation), block by block, and
  the two streams differ from each other and from the image noise's."""
  fit, prompts = _fit_and_prompts(1)
  key = jax.random.key(21)
  n0, n = 37, mvn_ovc.LATENT_BLOCK + 100
  certs = mvn_ovc.certify_mvn_many(key, fit, prompts,
                                   SmoothingParams(sigma=0.5, n0=n0, n=n),
                                   MVNParams(delta=0.0, batch_size=1))
  mean, factor = (np.asarray(a, np.float64)
                  for a in mvn_ovc.logit_gaussian(fit, prompts))
  latent = sampler.stream_key(key, "gaussian")
  streams = {s: sampler.stream_key(latent, s)
             for s in ("selection", "estimation")}

  def counts(stream, num):
    h = np.concatenate([
        np.asarray(mvn_ovc.latent_normals(stream, b, factor.shape[-1]))
        for b in range(-(-num // mvn_ovc.LATENT_BLOCK))])[:num]
    logits = mean[:, None, :] + np.einsum("br,pcr->pbc", h, factor)
    return np.stack([np.bincount(p, minlength=C)
                     for p in logits.argmax(-1)])

  est = counts(streams["estimation"], n)
  for p, cert in enumerate(certs):
    # float64 here against float32 there: a near-tie may fall either way.
    assert np.abs(cert.counts - est[p]).sum() <= 2
  sel = counts(streams["selection"], n0)
  counts0, _ = mvn_ovc._mvn_counts(fit, prompts, key, n0=n0, n=n,
                                   step_blocks=1)
  assert np.abs(np.asarray(counts0) - sel).sum() <= 2
  assert np.abs(sel - counts(streams["estimation"], n0)).sum() > 2
  image = [sampler.stream_key(key, s)
           for s in ("selection", "estimation", "prediction")]
  data = lambda k: tuple(np.asarray(jax.random.key_data(k)))
  assert len({data(k) for k in list(streams.values()) + image}) == 5


@pytest.mark.parametrize("r", [1, 4, 7])
def test_a_partial_block_is_the_first_samples_of_the_block(r):
  key = jax.random.fold_in(jax.random.key(12), 3)
  full = np.asarray(jax.jit(mvn_ovc._latent_block_t, static_argnums=1)(key, r))
  for samples in (1, 37, mvn_ovc.LATENT_BLOCK - 1):
    part = np.asarray(jax.jit(mvn_ovc._latent_block_t, static_argnums=(1, 2))(
        key, r, samples))
    np.testing.assert_array_equal(part, full[:, :samples])
