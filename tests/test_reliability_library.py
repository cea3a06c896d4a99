"""Guarantees against bad numbers (docs/METHOD.md, "Guarantees against bad
numbers"): each test here fails on the code before them.

  1. A class matrix or Gaussian fit with NaN or inf is refused (a NaN row
     used to win every argmax); so is one of another embedding size.
  2. A noisy sample whose embedding is not finite counts as a miss: the
     certificate is the one computed treating it so, never larger, and
     Cached-OVC still equals standard RS.
  3. Counts that sum to less than n are bounded with n draws.
  5. A corrupted weights file, or one with another sha256 than the user
     gives, is refused.
  6. CLIPure-Cos keeps a non-finite embedding non-finite (no class) and
     refuses a blank without direction; the Fourier heat map's library
     refuses a frequency off the half-plane, alpha outside (0, 1) and labels
     no class can match, and abstains on a tie.
(4, the cache checksum and regeneration check, is in tests/test_cached_ovc.py
and tests/test_ovc.py; the JAX bounds' direction in tests/test_bounds.py.)
"""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import bounds
from ovc_jax import certificates
from ovc_jax import classifiers
from ovc_jax import clipure
from ovc_jax import fourier
from ovc_jax import ovc
from ovc_jax import sampler
from ovc_jax.certificates import ABSTAIN, SmoothingParams
from ovc_jax.certifiers import cached_ovc, modified_irs, mvn_ovc, standard
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.certifiers.mvn_ovc import MVNParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import CheckpointError, ConfigError, InputError
from ovc_jax.models import load_clip, loading, weights_io

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D, E, C, P = 6, 3, 4, 2
RNG = np.random.default_rng(0)
ENCODER = {"A": jnp.asarray(RNG.normal(size=(E, D)), jnp.float32),
           "c": jnp.zeros(E, jnp.float32)}
U = jnp.asarray(RNG.normal(size=(C, E)), jnp.float32)
KNOWN_U = jnp.asarray(RNG.normal(size=(P, C, E)), jnp.float32)
X = jnp.asarray(RNG.normal(size=D), jnp.float32)
KEY = jax.random.key(3)
SMOOTHING = SmoothingParams(sigma=0.5, n0=20, n=200, alpha=0.01,
                            batch_size=64)
PARAMS = ovc.OVCParams(SMOOTHING, IRSParams(n_p=50),
                       MVNParams(delta=0.0, batch_size=128))
NON_FINITE = "class matrix contains NaN or infinite values"


def with_bad_entry(u, value):
  return u.at[..., 1, 2].set(value)


# ---------------------------------------------------------------------------
# 1. Class matrices and Gaussian fits with bad numbers


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_standard_rs_refuses_a_class_matrix_with_bad_numbers(value):
  bad = with_bad_entry(U, value)
  with pytest.raises(InputError, match=NON_FINITE):
    EmbeddingClassifier.params(ENCODER, bad)
  # A params dict built by hand is checked where the sampler takes it.
  by_hand = {"encoder": ENCODER, "class_embeddings": bad}
  with pytest.raises(InputError, match=NON_FINITE):
    standard.certify(KEY, LINEAR, by_hand, X, SMOOTHING)
  with pytest.raises(InputError, match=NON_FINITE):
    standard.predict(KEY, LINEAR, by_hand, X, SMOOTHING)
  with pytest.raises(InputError, match=NON_FINITE):
    standard.certify_many(KEY, LINEAR, {"encoder": ENCODER,
                                   "class_embeddings": with_bad_entry(
                                       KNOWN_U, value)}, X, SMOOTHING)


@pytest.fixture(scope="module")
def known():
  return ovc.certify_known_prompts(LINEAR, ENCODER, X, KEY, KNOWN_U, PARAMS)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_cached_and_mvn_refuse_a_class_matrix_with_bad_numbers(known, value):
  draws = known.caches.embedding_draws
  fit = known.caches.gaussian_fit
  bad = with_bad_entry(U, value)
  with pytest.raises(InputError, match=NON_FINITE):
    cached_ovc.certify_cached(draws, bad, SMOOTHING)
  with pytest.raises(InputError, match=NON_FINITE):
    cached_ovc.certify_cached_many(draws, with_bad_entry(KNOWN_U, value),
                                   SMOOTHING)
  with pytest.raises(InputError, match=NON_FINITE):
    cached_ovc.count_predictions(draws.estimation, bad)
  with pytest.raises(InputError, match=NON_FINITE):
    mvn_ovc.certify_mvn(KEY, fit, bad, SMOOTHING)
  with pytest.raises(InputError, match=NON_FINITE):
    mvn_ovc.certify_mvn_many(KEY, fit, with_bad_entry(KNOWN_U, value),
                             SMOOTHING)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_the_pipeline_refuses_a_class_matrix_with_bad_numbers(known, value):
  with pytest.raises(InputError, match=NON_FINITE):
    ovc.certify_known_prompts(LINEAR, ENCODER, X, KEY,
                              with_bad_entry(KNOWN_U, value), PARAMS)
  for method in ovc.METHODS:
    with pytest.raises(InputError, match=NON_FINITE):
      ovc.certify_novel_prompt(method, LINEAR, ENCODER, X, KEY, known.caches,
                               with_bad_entry(U, value), PARAMS)
  by_hand = {"encoder": ENCODER, "class_embeddings": with_bad_entry(U, value)}
  with pytest.raises(InputError, match=NON_FINITE):
    modified_irs.certify_novel(KEY, LINEAR, by_hand, X,
                               known.caches.known_prompts, SMOOTHING,
                               PARAMS.irs)


def test_the_clean_class_matrix_still_certifies(known):
  # The refusals above are not a refusal of everything.
  assert any(c.prediction != ABSTAIN for c in known.certificates)
  for method in ovc.METHODS:
    ovc.certify_novel_prompt(method, LINEAR, ENCODER, X, KEY, known.caches, U,
                             PARAMS)


def test_mvn_refuses_a_gaussian_fit_with_bad_numbers(known):
  embeddings = np.array(known.caches.embedding_draws.estimation)
  embeddings[7] = np.nan
  nan_fit = mvn_ovc.fit_gaussian(embeddings)
  inf_fit = mvn_ovc.GaussianFit(known.caches.gaussian_fit.mean.at[0].set(np.inf),
                                known.caches.gaussian_fit.factor)
  for fit in (nan_fit, inf_fit):
    with pytest.raises(InputError, match="Gaussian fit contains NaN or infinite"):
      mvn_ovc.certify_mvn(KEY, fit, U, SMOOTHING)
    with pytest.raises(InputError, match="Gaussian fit contains NaN or infinite"):
      mvn_ovc.certify_mvn_many(KEY, fit, KNOWN_U, SMOOTHING)


def test_a_class_matrix_of_another_embedding_size_is_an_input_error():
  wide = jnp.ones((C, E + 1), jnp.float32)
  message = r"embedding size 4 but the model's embeddings have size 3"
  with pytest.raises(InputError, match=message):
    standard.certify(KEY, LINEAR, LINEAR.params(ENCODER, wide), X, SMOOTHING)
  with pytest.raises(InputError, match=message):
    ovc.certify_known_prompts(LINEAR, ENCODER, X, KEY,
                              jnp.ones((P, C, E + 1), jnp.float32), PARAMS)
  with pytest.raises(InputError, match=message):
    modified_irs.certify_known(KEY, LINEAR, LINEAR.params(ENCODER, wide[None]),
                               X, SMOOTHING, modified_irs.IRSParams(n_p=50))
  assert LINEAR.embedding_size(ENCODER, X.shape) == E


@pytest.mark.parametrize("bad, message", [
    (np.array([["a", "b"]]), "real numbers"),
    (np.ones(4, np.float32), r"\[C, d\] or \[P, C, d\]"),
    (np.ones((2, 0), np.float32), "no classes"),
])
def test_class_matrices_of_bad_type_or_shape(bad, message):
  with pytest.raises(InputError, match=message):
    classifiers.check_class_embeddings(bad)


# ---------------------------------------------------------------------------
# 2. Embeddings that are not numbers


@dataclasses.dataclass(frozen=True)
class GlitchyEncoder:
  """z = (x_0, x_1), except that a noisy input with |x_1| > 1.5 embeds as
  `value` (NaN, inf, or a finite number whose norm overflows), as a bfloat16
  overflow in a real encoder would. x_1 does not decide the class, so the
  glitches hit samples of every class."""

  value: float = float("nan")

  def __call__(self, params, inputs):
    del params
    flat = inputs.reshape(inputs.shape[0], -1)
    z = flat[:, :2]
    return jnp.where(jnp.abs(flat[:, 1:2]) > 1.5, self.value, z)


GLITCH_U = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]], jnp.float32)  # class 0: z_0 > 0
GLITCH_X = jnp.asarray([0.8, 0.0, 0.0, 0.0], jnp.float32)
GLITCH_SMOOTHING = SmoothingParams(sigma=1.0, n0=100, n=4000, alpha=0.001,
                                   batch_size=512)


def _reference_counts(stream, num_samples):
  """Counts of the clean classifier over the samples that do not glitch, and
  the number of glitches: the same noise, regenerated from the key."""
  s = GLITCH_SMOOTHING
  noise = sampler.standard_normal_samples(
      sampler.stream_key(KEY, stream), jnp.arange(num_samples), (4,))
  noisy = np.asarray(GLITCH_X[None] + jnp.float32(s.sigma) * noise)
  predictions = np.where(noisy[:, 0] >= 0, 0, 1)
  glitch = np.abs(noisy[:, 1]) > 1.5
  return np.bincount(predictions[~glitch], minlength=2), int(glitch.sum())


@pytest.mark.parametrize("value, normalize", [
    (float("nan"), False), (float("nan"), True), (float("inf"), False),
    (float("inf"), True), (1e30, True)])
def test_a_non_finite_embedding_counts_as_a_miss(value, normalize):
  s = GLITCH_SMOOTHING
  classifier = EmbeddingClassifier(GlitchyEncoder(value), normalize=normalize)
  cert = standard.certify(KEY, classifier,
                          classifier.params({}, GLITCH_U), GLITCH_X, s)
  counts0, _ = _reference_counts("selection", s.n0)
  counts, glitches = _reference_counts("estimation", s.n)
  assert 100 < glitches < 1000  # about 2 Phi(-1.5) = 13% of the draws
  expected = certificates.certificate_from_counts(
      counts0, counts, n=s.n, sigma=s.sigma, alpha=s.alpha)
  assert cert.prediction == expected.prediction == 0
  np.testing.assert_array_equal(cert.counts, counts)
  assert cert.counts.sum() == s.n - glitches
  assert cert.pA_lower == expected.pA_lower
  assert cert.radius == expected.radius
  # Never larger than the clean classifier's certificate on the same noise.
  clean = standard.certify(KEY, LINEAR, LINEAR.params(
      {"A": jnp.eye(2, 4), "c": jnp.zeros(2)}, GLITCH_U), GLITCH_X, s)
  assert cert.radius < clean.radius
  # Bounding with counts.sum() draws instead of n would have raised pA.
  assert bounds.clopper_pearson_lower(int(counts[0]), int(counts.sum()),
                                      s.alpha) > cert.pA_lower


def test_cached_ovc_equals_standard_rs_with_non_finite_embeddings():
  s = GLITCH_SMOOTHING
  classifier = EmbeddingClassifier(GlitchyEncoder(), normalize=True)
  params = ovc.OVCParams(s, IRSParams(n_p=400), MVNParams(batch_size=1000))
  known_u = jnp.stack([GLITCH_U, GLITCH_U[::-1]])
  known = ovc.certify_known_prompts(classifier, {}, GLITCH_X, KEY, known_u,
                                    params)
  estimation = np.asarray(known.caches.embedding_draws.estimation)
  nan_rows = np.all(np.isnan(estimation), axis=1)
  assert nan_rows.sum() == _reference_counts("estimation", s.n)[1]
  assert np.all(np.isfinite(estimation[~nan_rows]))
  novel = jnp.asarray([[0.9, 0.1], [-1.0, 0.05]], jnp.float32)
  results = {m: ovc.certify_novel_prompt(m, classifier, {}, GLITCH_X, KEY,
                                         known.caches, novel, params)
             for m in ("standard", "cached", "irs")}
  a, b = results["standard"].certificate, results["cached"].certificate
  assert (a.prediction, a.radius, a.pA_lower) == (b.prediction, b.radius,
                                                  b.pA_lower)
  np.testing.assert_array_equal(a.counts, b.counts)
  assert a.prediction == 0 and a.counts.sum() < s.n
  # MVN-OVC cannot fit a Gaussian to NaN embeddings, and says so.
  with pytest.raises(InputError, match="Gaussian fit contains NaN"):
    ovc.certify_novel_prompt("mvn", classifier, {}, GLITCH_X, KEY,
                             known.caches, novel, params)


def test_predictions_of_non_finite_embeddings_are_no_class():
  z = jnp.asarray([[1.0, 0.0], [np.nan, 0.0], [np.inf, 0.0], [0.0, -1.0]])
  np.testing.assert_array_equal(
      classifiers.predict_from_embeddings(z, GLITCH_U), [0, -1, -1, 0])
  np.testing.assert_array_equal(
      classifiers.predict_from_embeddings(z, jnp.stack([GLITCH_U] * 3)),
      [[0] * 3, [-1] * 3, [-1] * 3, [0] * 3])
  embedded = EmbeddingClassifier(lambda p, x: x).embed(
      None, jnp.asarray([[3e20, 4e20], [3.0, 4.0]], jnp.float32))
  assert np.all(np.isnan(embedded[0]))  # its norm overflows float32
  np.testing.assert_allclose(embedded[1], [0.6, 0.8], rtol=1e-6)


# ---------------------------------------------------------------------------
# 3. n is the number of draws, not the sum of the counts


def test_counts_that_miss_draws_are_bounded_with_n():
  cert = certificates.certificate_from_counts([5, 0], [90, 0], n=100,
                                              sigma=1.0, alpha=0.001)
  assert cert.pA_lower == bounds.clopper_pearson_lower(90, 100, 0.001)
  assert cert.pA_lower < bounds.clopper_pearson_lower(90, 90, 0.001)
  pred, radius, p_lower = jax.jit(certificates.certificate_from_counts_jax)(
      jnp.asarray([5, 0]), jnp.asarray([90, 0]), 1.0, 0.001, n=100)
  assert int(pred) == 0 and float(radius) <= cert.radius
  assert float(p_lower) <= cert.pA_lower
  with pytest.raises(ConfigError, match="do not fit n = 80 draws"):
    certificates.certificate_from_counts([5, 0], [90, 0], n=80, sigma=1.0,
                                         alpha=0.001)
  # No selection draw had a class: abstain.
  none = certificates.certificate_from_counts([0, 0], [90, 0], n=100,
                                              sigma=1.0, alpha=0.001)
  assert none.prediction == ABSTAIN and none.radius == 0.0
  pred, radius, _ = certificates.certificate_from_counts_jax(
      jnp.asarray([0, 0]), jnp.asarray([90, 0]), 1.0, 0.001, n=100)
  assert int(pred) == ABSTAIN and float(radius) == 0.0


# ---------------------------------------------------------------------------
# 5. Weights whose bytes are not the ones meant


TOY = os.path.join(loading.checkpoints_dir(), "toy_clip")


def _toy_copy(tmp_path, keep_hash=True):
  target = tmp_path / "toy_clip"
  shutil.copytree(TOY, target)
  if not keep_hash:
    os.remove(target / "model.safetensors.sha256")
  return target


def _flip_bytes(path, count=64):
  data = bytearray(path.read_bytes())
  start = len(data) // 2  # inside the tensor data, past the header
  for i in range(start, start + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_the_committed_toy_checkpoint_has_its_sha256_beside_it(monkeypatch):
  monkeypatch.delenv("OVC_JAX_CHECKPOINTS", raising=False)
  recorded = weights_io.read_sha256_file(
      os.path.join(TOY, "model.safetensors.sha256"))
  assert recorded == weights_io.file_sha256(
      os.path.join(TOY, "model.safetensors"))
  loaded = load_clip("toy")
  assert loaded.weights_sha256 == recorded


def test_flipped_bytes_in_the_toy_checkpoint_are_refused(tmp_path,
                                                         monkeypatch):
  target = _toy_copy(tmp_path)
  expected = weights_io.read_sha256_file(
      str(target / "model.safetensors.sha256"))
  _flip_bytes(target / "model.safetensors")
  found = weights_io.file_sha256(str(target / "model.safetensors"))
  monkeypatch.setenv("OVC_JAX_CHECKPOINTS", str(tmp_path))
  with pytest.raises(CheckpointError) as error:
    load_clip("toy")
  message = str(error.value)
  assert "\n" not in message
  assert str(target / "model.safetensors") in message
  assert f"expected {expected}, found {found}" in message


def test_a_user_given_sha256_is_checked(tmp_path):
  target = _toy_copy(tmp_path, keep_hash=False)
  right = weights_io.file_sha256(str(target / "model.safetensors"))
  loaded = load_clip(str(target), sha256=right.upper())
  assert loaded.weights_sha256 == right
  with pytest.raises(CheckpointError, match=f"given as sha256=.*expected "
                     f"{'0' * 64}, found {right}"):
    load_clip(str(target), sha256="0" * 64)
  with pytest.raises(ConfigError, match="64-digit hex"):
    load_clip(str(target), sha256="not-a-digest")
  # Without a recorded hash, only the user's hash catches flipped bytes.
  _flip_bytes(target / "model.safetensors")
  with pytest.raises(CheckpointError, match="does not have the expected sha256"):
    load_clip(str(target), sha256=right)


def test_written_weights_record_their_sha256(tmp_path):
  path = str(tmp_path / "w.safetensors")
  weights_io.write_safetensors({"a": np.arange(6, dtype=np.float32)}, path)
  assert weights_io.read_sha256_file(path + ".sha256") == (
      weights_io.file_sha256(path))


# ---------------------------------------------------------------------------
# 6. CLIPure-Cos and the Fourier heat map: bad numbers and bad arguments


@dataclasses.dataclass(frozen=True)
class NaNEncoder:
  """Every input embeds as NaN (a bfloat16 overflow on every sample)."""

  def __call__(self, params, inputs):
    del params
    return jnp.full((inputs.shape[0], 2), jnp.nan, jnp.float32)


def test_purification_keeps_a_non_finite_embedding_non_finite():
  blank = jnp.asarray([0.0, 1.0], jnp.float32)
  z = jnp.asarray([[1.0, 0.2], [np.nan, 1.0], [np.inf, 0.0], [0.0, 0.0]])
  for purify in (clipure.purify,
                 jax.jit(functools.partial(clipure.purify, steps=10))):
    out = np.asarray(purify(z, blank))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:3]))
    np.testing.assert_array_equal(out[3], [0.0, 0.0])  # a zero row stays zero
    np.testing.assert_array_equal(
        classifiers.predict_from_embeddings(out, GLITCH_U), [0, -1, -1, 0])


def test_a_purified_classifier_abstains_where_every_sample_is_nan():
  """It used to purify NaN to a zero row, which voted for class 0, and to
  certify class 0 where plain CLIP abstains."""
  blank = jnp.asarray([1.0, 0.3], jnp.float32)
  plain = EmbeddingClassifier(NaNEncoder(), normalize=True)
  purified = EmbeddingClassifier(clipure.PurifiedEncoder(NaNEncoder()),
                                 normalize=True)
  s = SmoothingParams(sigma=0.5, n0=20, n=100, alpha=0.001, batch_size=64)
  for classifier, encoder_params in (
      (plain, {}), (purified, clipure.purified_encoder_params({}, blank))):
    cert = standard.certify(KEY, classifier,
                            classifier.params(encoder_params, GLITCH_U),
                            GLITCH_X, s)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    assert cert.counts.sum() == 0


@pytest.mark.parametrize("blank", [[np.nan, 1.0], [np.inf, 0.0], [0.0, 0.0]])
def test_purify_refuses_a_blank_without_direction(blank):
  z = jnp.asarray([[1.0, 0.2], [0.3, 1.0]], jnp.float32)
  blank = np.asarray(blank, np.float32)
  with pytest.raises(InputError, match="blank embedding"):
    clipure.purify(z, blank)
  with pytest.raises(InputError, match="blank embedding"):
    clipure.purified_encoder_params({}, blank)
  # Under jit the value cannot be checked on the host: every row comes out
  # NaN (no class), never unpurified.
  out = jax.jit(lambda zz, bb: clipure.purify(zz, bb, steps=3))(z, blank)
  assert np.all(np.isnan(np.asarray(out)))


def test_basis_image_refuses_a_frequency_outside_the_half_plane():
  with pytest.raises(ConfigError, match=r"frequency \(40, 3\) is outside the "
                     r"32x17 half-plane.*k must lie in \[0, 31\], l in "
                     r"\[0, 16\]"):
    fourier.basis_image(32, 32, 40, 3)
  with pytest.raises(ConfigError, match="outside"):
    fourier.basis_image(32, 32, 3, 17)
  with pytest.raises(ConfigError, match="outside"):
    fourier.basis_image(32, 32, -1, 0)
  image = np.asarray(fourier.basis_image(32, 32, 31, 16))
  assert np.all(np.isfinite(image))
  np.testing.assert_allclose(np.linalg.norm(image), 1.0, rtol=1e-5)


@pytest.mark.parametrize("alpha", [2.0, 1.0, 0.0, -0.1, float("nan"), None])
def test_predict_from_counts_refuses_alpha_outside_0_1(alpha):
  with pytest.raises(ConfigError, match=r"alpha must lie in \(0, 1\)"):
    fourier.predict_from_counts([[5, 5, 0]], alpha)


def test_predict_from_counts_abstains_on_a_tie():
  counts = [[5, 5, 0], [0, 7, 7], [0, 0, 0], [900, 2, 1], [3, 900, 900]]
  for alpha in (0.001, 0.5, 0.999):
    predictions = fourier.predict_from_counts(counts, alpha)
    np.testing.assert_array_equal(predictions[[0, 1, 2, 4]], [ABSTAIN] * 4)
    assert predictions[3] == 0
  with pytest.raises(InputError, match=">= 0"):
    fourier.predict_from_counts([[-1, 3]], 0.01)


def test_fourier_heatmap_refuses_labels_the_classifier_cannot_predict():
  base = EmbeddingClassifier(LinearEncoder(), normalize=False)
  params = base.params({"A": jnp.eye(2, 4 * 4 * 3), "c": jnp.zeros(2)},
                       GLITCH_U)
  images = np.full((3, 4, 4, 3), 0.5, np.float32)
  key = jax.random.key(0)
  for classifier in (fourier.PlainClassifier(base, num_classes=2),
                     fourier.SmoothedClassifier(base, num_classes=2, sigma=0.1,
                                                n=8, alpha=0.01,
                                                batch_size=8)):
    with pytest.raises(InputError, match=r"labels must lie in \[0, 1\] for a "
                       r"classifier of 2 classes; got 5"):
      fourier.fourier_heatmap(classifier, params, images, [0, 1, 5], key,
                              v=1.0, max_frequency=1)
    batches = fourier.image_batches(images, [0, 2, 1], 3)
    with pytest.raises(InputError, match="got 2"):
      fourier.evaluate(classifier, params, batches, key, (1, 1), 1.0)
  with pytest.raises(InputError, match="labels must be >= 0"):
    fourier.fourier_heatmap(fourier.PlainClassifier(base), params, images,
                            [0, -1, 1], key, v=1.0, max_frequency=1)


def test_each_certifier_names_a_parameter_bundle_of_the_wrong_type():
  """Key first, then what is certified, then the bundles: a bundle passed in
  the wrong place (or a dict) is refused by name, before any draw."""
  params = LINEAR.params(ENCODER, U)
  draws = cached_ovc.EmbeddingDraws(jnp.zeros((20, E)), jnp.zeros((200, E)))
  fit = mvn_ovc.fit_gaussian(jnp.asarray(RNG.normal(size=(64, E)),
                                         jnp.float32))
  smoothing_as_dict = dataclasses.asdict(SMOOTHING)
  cases = [
      (lambda: standard.certify(KEY, LINEAR, params, X, smoothing_as_dict),
       "smoothing must be a SmoothingParams; got dict"),
      (lambda: cached_ovc.certify_cached(draws, U, SMOOTHING, MVNParams()),
       "cached must be a CachedParams; got MVNParams"),
      (lambda: mvn_ovc.certify_mvn(KEY, fit, U, SMOOTHING, IRSParams(n_p=5)),
       "mvn must be an MVNParams; got IRSParams"),
      (lambda: modified_irs.certify_known(KEY, LINEAR, LINEAR.params(
          ENCODER, KNOWN_U), X, SMOOTHING, MVNParams()),
       "irs must be an IRSParams; got MVNParams"),
  ]
  for call, message in cases:
    with pytest.raises(ConfigError, match=message):
      call()
