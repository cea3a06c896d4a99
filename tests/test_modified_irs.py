"""Modified-IRS against an exact answer, and its fallback and selection rule.

Known and novel prompts are two linear classifiers on the same direction u
with shifted boundaries: known says class 0 when u.(x + e) > -m_known*sigma,
novel when u.(x + e) > -m_novel*sigma, m_novel < m_known. Their disagreement
is exactly P[f_known = 0] - P[f_novel = 0] = Phi(m_known) - Phi(m_novel), so
the IRS bound pA_lower_known - zeta is tight, and the novel classifier's true
robust radius is m_novel * sigma.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ovc_jax import certificates
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import modified_irs, standard
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D = 6


def prompt(margin, sigma):
  """Class matrix [2, 2] on embedding z = (u.x, 1): logits (u.x + m*sigma, 0)."""
  return jnp.asarray([[1.0, margin * sigma], [0.0, 0.0]], jnp.float32)


def setup(sigma):
  u = np.zeros(D)
  u[0] = 1.0
  a = np.stack([u, np.zeros(D)])  # z = (u.x, 0) + (0, 1)
  encoder = {"A": jnp.asarray(a, jnp.float32),
             "c": jnp.asarray([0.0, 1.0], jnp.float32)}
  x = np.random.default_rng(0).normal(size=D)
  x[0] = 0.0  # u.x = 0: the margin is set by the prompt alone
  return encoder, jnp.asarray(x, jnp.float32)


@pytest.mark.heavy
def test_irs_soundness_over_2000_keys():
  sigma, alpha, alpha_zeta, trials = 0.5, 0.01, 0.01, 2000
  m_known, m_novel = 1.3, 1.27
  encoder, x = setup(sigma)
  known_u = prompt(m_known, sigma)[None]
  novel_u = prompt(m_novel, sigma)
  true_radius = m_novel * sigma
  disagreement = stats.norm.cdf(m_known) - stats.norm.cdf(m_novel)
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=10_000, alpha=alpha,
                              batch_size=2000)
  irs = IRSParams(n_p=2000, gamma=0.02, alpha_zeta=alpha_zeta)
  wrong, applied, naive_wrong = [], [], []
  for seed in range(trials):
    key = jax.random.key(seed)
    _, known = modified_irs.certify_known(
        key, LINEAR, LINEAR.params(encoder, known_u), x, smoothing, irs,
        num_classes=2)
    result = modified_irs.certify_novel(
        key, LINEAR, LINEAR.params(encoder, novel_u), x, known, smoothing,
        irs, num_classes=2)
    cert = result.certificate
    applied.append(result.irs_applied)
    wrong.append(cert.prediction not in (0, certificates.ABSTAIN)
                 or cert.radius > true_radius)
    if result.irs_applied:
      assert result.confidence == pytest.approx(1 - alpha - alpha_zeta)
      # Reusing the known certificate while ignoring the disagreement (zeta
      # = 0) is unsound here; the test must be able to see that.
      naive_wrong.append(sigma * stats.norm.ppf(known.p_lower[0]) > true_radius)
  confidence_gap = alpha + alpha_zeta
  bound = confidence_gap + 3 * np.sqrt(confidence_gap * (1 - confidence_gap) / trials)
  assert np.mean(applied) > 0.9, np.mean(applied)
  assert np.mean(wrong) <= bound, np.mean(wrong)
  # The setting is tight enough for the test to have power.
  assert np.mean(naive_wrong) > 3 * bound, np.mean(naive_wrong)
  assert 0.004 < disagreement < 0.007


def test_fallback_equals_standard_rs():
  sigma = 0.5
  encoder, x = setup(sigma)
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=3000, alpha=0.001,
                              batch_size=256)
  key = jax.random.key(3)
  known_u = jnp.stack([prompt(2.0, sigma), prompt(-1.0, sigma)])
  _, known = modified_irs.certify_known(
      key, LINEAR, LINEAR.params(encoder, known_u), x, smoothing,
      IRSParams(n_p=300), num_classes=2)
  novel = LINEAR.params(encoder, prompt(0.8, sigma))
  # gamma = 0: zeta > 0 always, so IRS never applies.
  result = modified_irs.certify_novel(key, LINEAR, novel, x, known, smoothing,
                                      IRSParams(n_p=300, gamma=0.0),
                                      num_classes=2)
  assert not result.irs_applied
  assert result.confidence == pytest.approx(1 - smoothing.alpha)
  reference = standard.certify(
      key, LINEAR, novel, x,
      SmoothingParams(sigma=sigma, n0=100, n=3000, alpha=0.001,
                      batch_size=256), num_classes=2)
  assert result.certificate.prediction == reference.prediction
  assert result.certificate.radius == reference.radius
  np.testing.assert_array_equal(result.certificate.counts, reference.counts)


def test_known_certificates_equal_standard_rs():
  sigma = 0.25
  encoder, x = setup(sigma)
  smoothing = SmoothingParams(sigma=sigma, n0=50, n=800, alpha=0.001,
                              batch_size=100)
  known_u = jnp.stack([prompt(m, sigma) for m in (1.0, 0.5, -0.3)])
  certs, known = modified_irs.certify_known(
      jax.random.key(5), LINEAR, LINEAR.params(encoder, known_u), x,
      smoothing, IRSParams(n_p=80), num_classes=2)
  assert known.estimation_predictions.shape == (80, 3)
  assert known.selection_predictions.shape == (50, 3)
  for p, cert in enumerate(certs):
    ref = standard.certify(jax.random.key(5), LINEAR,
                           LINEAR.params(encoder, known_u[p]), x, smoothing, num_classes=2)
    assert (cert.prediction, cert.radius) == (ref.prediction, ref.radius)
    assert known.p_lower[p] == ref.pA_lower


def test_chooses_the_agreeing_known_prompt_on_selection_draws():
  sigma = 0.5
  encoder, x = setup(sigma)
  # n_p = 1000 draws with no disagreement bound zeta by 1 - 0.001^(1/1000) = 0.0069.
  smoothing = SmoothingParams(sigma=sigma, n0=100, n=2000, alpha=0.001,
                              batch_size=500)
  irs = IRSParams(n_p=1000)
  key = jax.random.key(11)
  # Known prompts: far from the novel one, identical to it, and flipped.
  known_u = jnp.stack([prompt(-2.0, sigma), prompt(0.9, sigma),
                       prompt(3.0, sigma)])
  _, known = modified_irs.certify_known(
      key, LINEAR, LINEAR.params(encoder, known_u), x, smoothing, irs,
      num_classes=2)
  result = modified_irs.certify_novel(
      key, LINEAR, LINEAR.params(encoder, prompt(0.9, sigma)), x, known,
      smoothing, irs, num_classes=2)
  assert result.known_index == 1
  assert result.disagreements == 0 and result.irs_applied
  assert result.forward_passes == smoothing.n0 + irs.n_p


def test_ties_go_to_the_most_similar_prompt():
  sel = np.zeros((10, 3), np.int32)  # all three known prompts agree with t*
  known = modified_irs.KnownPrompts(
      selection_predictions=sel, estimation_predictions=sel,
      predictions=np.zeros(3), p_lower=np.zeros(3),
      class_embeddings=np.array([[[1.0, 0.0]], [[0.6, 0.8]], [[0.0, 1.0]]]))
  novel = np.array([[0.5, 0.86]])
  assert modified_irs.choose_known_prompt(np.zeros(10, np.int32), known,
                                          novel) == 1


@pytest.mark.parametrize("bad, message", [
    (dict(gamma=1.0), r"irs\.gamma"), (dict(gamma=-0.1), r"irs\.gamma"),
    (dict(n_p=5000), "cannot exceed n"), (dict(n_p=0), r"irs\.n_p"),
    (dict(alpha_zeta=0.0), r"irs\.alpha_zeta"),
])
def test_bad_arguments(bad, message):
  sigma = 0.5
  encoder, x = setup(sigma)
  smoothing = SmoothingParams(sigma=sigma, n0=10, n=1000, alpha=0.01,
                              batch_size=100)
  _, known = modified_irs.certify_known(
      jax.random.key(0), LINEAR,
      LINEAR.params(encoder, prompt(1.0, sigma)[None]), x, smoothing,
      IRSParams(n_p=100), num_classes=2)
  irs_kw = dict(n_p=100)
  irs_kw.update(bad)
  with pytest.raises(ConfigError, match=message):
    modified_irs.certify_novel(
        jax.random.key(0), LINEAR,
        LINEAR.params(encoder, prompt(1.0, sigma)), x, known, smoothing,
        IRSParams(**irs_kw),
        num_classes=2)


def test_novel_prompt_with_another_class_count_is_refused():
  sigma = 0.5
  encoder, x = setup(sigma)
  smoothing = SmoothingParams(sigma=sigma, n0=10, n=100, alpha=0.01,
                              batch_size=100)
  _, known = modified_irs.certify_known(
      jax.random.key(0), LINEAR,
      LINEAR.params(encoder, prompt(1.0, sigma)[None]), x, smoothing,
      IRSParams(n_p=10), num_classes=2)
  three = jnp.concatenate([prompt(1.0, sigma), jnp.zeros((1, 2))])
  with pytest.raises(ConfigError, match="class count"):
    modified_irs.certify_novel(
        jax.random.key(0), LINEAR, LINEAR.params(encoder, three), x, known,
        smoothing, IRSParams(n_p=10), num_classes=3)
