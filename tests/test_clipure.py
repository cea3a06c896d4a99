"""CLIPure-Cos: the purification update, its per-image normalisation, and the
purified classifier inside the smoothing framework and OVC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import clipure
from ovc_jax import ovc
from ovc_jax import sampler
from ovc_jax import zeroshot
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import standard
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder, l2_normalize
from ovc_jax.errors import ConfigError, InputError

D, E, C = 6, 8, 5  # input size, embedding size, classes


def reference_purify(z, blank, steps, step_size, per_image=True,
                     with_min_sin=False):
  """The official update, written from its formula in NumPy (float64).

  grad of -cos(z, b) w.r.t. z is -(b / (|z||b|) - (z.b) z / (|z|^3 |b|)).
  per_image=False normalises g over the whole batch, as the official code.
  with_min_sin: also return, per row, the smallest ||g|| = sin(angle(u, b))
  met on the way (rounding is amplified by 1 / sin there).
  """
  z = np.asarray(z, np.float64)
  b = np.asarray(blank, np.float64)
  r = np.linalg.norm(z, axis=1, keepdims=True)
  u = z / r
  min_sin = np.full(len(z), np.inf)
  for _ in range(steps):
    x = r * u
    n = np.linalg.norm(x, axis=1, keepdims=True)
    nb = np.linalg.norm(b)
    grad = -(b / (n * nb) - (x @ b)[:, None] * x / (n**3 * nb))
    g = r * grad
    min_sin = np.minimum(min_sin, np.linalg.norm(g, axis=1))
    g_norm = (np.linalg.norm(g, axis=1, keepdims=True) if per_image
              else np.linalg.norm(g))
    u = u - step_size * g / g_norm
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
  return (r * u, min_sin) if with_min_sin else r * u


def random_z_blank(seed, batch=9, dim=E):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(batch, dim)) * rng.uniform(0.5, 3.0, size=(batch, 1))
  return z.astype(np.float32), rng.normal(size=dim).astype(np.float32)


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("step_size", [30.0, 0.3])
def test_purify_equals_numpy_reference(steps, step_size):
  z, blank = random_z_blank(steps, batch=16)
  want, min_sin = reference_purify(z, blank, steps, step_size,
                                   with_min_sin=True)
  got = np.asarray(clipure.purify(z, blank, steps=steps, step_size=step_size))
  # float32, to 1e-5, on every row whose path keeps away from the blank (a
  # step next to it turns float32 rounding into a change of direction).
  ok = min_sin > 0.05
  assert ok.sum() >= 12
  np.testing.assert_allclose(got[ok], want[ok], atol=1e-5, rtol=0)
  # The norm is kept.
  np.testing.assert_allclose(np.linalg.norm(got, axis=1),
                             np.linalg.norm(z, axis=1), rtol=1e-6)
  # In float64, every row agrees.
  with jax.enable_x64(True):
    got64 = np.asarray(clipure.purify(z.astype(np.float64),
                                      blank.astype(np.float64), steps=steps,
                                      step_size=step_size))
  assert got64.dtype == np.float64
  np.testing.assert_allclose(got64, want, atol=1e-9, rtol=0)


def test_per_image_normalisation_is_the_official_update_at_batch_size_1():
  z, blank = random_z_blank(3, batch=4)
  batched = reference_purify(z, blank, 3, 30.0, per_image=False)
  for i in range(4):
    one = reference_purify(z[i:i + 1], blank, 3, 30.0, per_image=False)
    np.testing.assert_allclose(
        np.asarray(clipure.purify(z[i:i + 1], blank, steps=3)), one, atol=1e-5)
  # Normalised over the batch, an image's result depends on its batch; ours not.
  assert not np.allclose(batched, reference_purify(z, blank, 3, 30.0), atol=1e-3)
  alone = np.concatenate([np.asarray(clipure.purify(z[i:i + 1], blank, steps=3))
                          for i in range(4)])
  np.testing.assert_allclose(np.asarray(clipure.purify(z, blank, steps=3)),
                             alone, atol=1e-6)


def test_step_size_30_turns_by_atan_30_so_two_steps_come_back():
  # Embeddings less than atan(30) = 88.1 degrees from the blank overshoot it
  # and are turned back exactly: an even number of steps is (nearly) identity.
  z, blank = random_z_blank(5, batch=32)
  cos = (z @ blank) / (np.linalg.norm(z, axis=1) * np.linalg.norm(blank))
  near = cos > np.cos(np.arctan(30.0)) + 0.02
  assert near.sum() >= 5
  two = np.asarray(clipure.purify(z, blank, steps=2))
  np.testing.assert_allclose(two[near], z[near], atol=1e-4)
  # A small step moves towards the blank: cosine grows.
  small = np.asarray(clipure.purify(z, blank, steps=5, step_size=0.1))
  cos_small = (small @ blank) / (np.linalg.norm(small, axis=1)
                                 * np.linalg.norm(blank))
  assert np.all(cos_small > cos - 1e-6)


def test_zero_gradient_and_zero_rows_are_guarded():
  blank = np.random.default_rng(0).normal(size=E).astype(np.float32)
  z = np.stack([2.0 * blank, -0.5 * blank, np.zeros(E, np.float32)])
  out = np.asarray(clipure.purify(z, blank))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, z, atol=1e-5)
  grad = jax.grad(lambda v: jnp.sum(clipure.purify(v, blank) ** 2))(z)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(clipure.purify(z, blank, steps=0)), z)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "3"])
def test_bad_steps(steps):
  with pytest.raises(ConfigError, match="steps"):
    clipure.purify(np.ones((1, E)), np.ones(E), steps=steps)
  with pytest.raises(ConfigError, match="steps"):
    clipure.PurifiedEncoder(LinearEncoder(), steps=steps)


@pytest.mark.parametrize("step_size", [0.0, -1.0, float("nan"), float("inf"), None])
def test_bad_step_size(step_size):
  with pytest.raises(ConfigError, match="step_size"):
    clipure.purify(np.ones((1, E)), np.ones(E), step_size=step_size)
  with pytest.raises(ConfigError, match="step_size"):
    clipure.PurifiedEncoder(LinearEncoder(), step_size=step_size)


def test_bad_shapes():
  with pytest.raises(InputError):
    clipure.purify(np.ones((2, E)), np.ones(E + 1))


# ---------------------------------------------------------------------------
# The purified classifier in the smoothing framework.


def linear_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"A": jnp.asarray(rng.normal(size=(E, D)), jnp.float32),
          "c": jnp.asarray(rng.normal(size=E), jnp.float32)}


def unit_rows(seed, *shape):
  u = np.random.default_rng(seed).normal(size=shape + (E,))
  return jnp.asarray(u / np.linalg.norm(u, axis=-1, keepdims=True), jnp.float32)


# Odd steps of size 30 move every embedding: purification is not a no-op here.
PURIFIED = EmbeddingClassifier(
    clipure.PurifiedEncoder(LinearEncoder(), steps=3, step_size=30.0),
    normalize=True)


def purified_params(seed=0):
  blank = np.random.default_rng(50 + seed).normal(size=E).astype(np.float32)
  return clipure.purified_encoder_params(linear_params(seed), blank)


def test_purified_encoder_is_hashable_and_wraps_purify():
  enc = clipure.PurifiedEncoder(LinearEncoder(), steps=3)
  assert enc == clipure.PurifiedEncoder(LinearEncoder(), steps=3)
  assert hash(enc) == hash(clipure.PurifiedEncoder(LinearEncoder(), steps=3))
  params = purified_params()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, D)), jnp.float32)
  z = LinearEncoder()(params["encoder"], x)
  np.testing.assert_array_equal(
      np.asarray(enc(params, x)),
      np.asarray(clipure.purify(z, params["blank"], steps=3)))
  # The classifier's embeddings are the normalised purified embeddings.
  out = PURIFIED(PURIFIED.params(params, unit_rows(2, C)), x)
  np.testing.assert_allclose(np.asarray(out["embeddings"]),
                             np.asarray(l2_normalize(enc(params, x))), atol=1e-6)
  assert not np.allclose(np.asarray(out["embeddings"]),
                         np.asarray(l2_normalize(z)), atol=1e-2)


def test_counts_do_not_depend_on_the_batch_size():
  params = PURIFIED.params(purified_params(), unit_rows(3, C))
  x = jnp.asarray(np.random.default_rng(4).normal(size=D), jnp.float32)
  key = jax.random.key(7)
  n = 150
  outs = [sampler.sample_under_noise(
      PURIFIED, params, x, key, num_samples=n, sigma=0.7, batch_size=b,
      num_classes=C, outputs=("counts", "predictions", "embeddings"))
      for b in (1, 7, n)]
  counts = [np.asarray(o["counts"]) for o in outs]
  assert counts[0].sum() == n and np.count_nonzero(counts[0]) > 1
  for o, cnt in zip(outs[1:], counts[1:]):
    np.testing.assert_array_equal(cnt, counts[0])
    np.testing.assert_array_equal(np.asarray(o["predictions"]),
                                  np.asarray(outs[0]["predictions"]))
    # Embeddings agree to rounding only: XLA's programs for other batch shapes
    # differ in the last bit even without purification, and a size-30 step
    # next to the blank amplifies that (see test_purify_equals_numpy_reference).
    np.testing.assert_allclose(np.asarray(o["embeddings"]),
                               np.asarray(outs[0]["embeddings"]), atol=1e-3)


def test_purified_classifier_certifies_with_every_ovc_method():
  encoder_params = purified_params(1)
  known = unit_rows(10, 3, C)
  novel = unit_rows(11, C)
  x = jnp.asarray(np.random.default_rng(14).normal(size=D), jnp.float32)
  key = jax.random.key(13)
  params = ovc.OVCParams(SmoothingParams(sigma=0.5, n0=50, n=600, batch_size=200),
                         IRSParams(n_p=300, gamma=0.05))
  result = ovc.certify_known_prompts(PURIFIED, encoder_params, x, key, known,
                                     params)
  assert len(result.certificates) == 3
  for p in range(3):
    alone = standard.certify(key, PURIFIED,
                             PURIFIED.params(encoder_params, known[p]), x, params.smoothing)
    assert result.certificates[p].prediction == alone.prediction
    np.testing.assert_array_equal(result.certificates[p].counts, alone.counts)
  # The cache holds the purified (normalised) embeddings of the estimation draws.
  cached = np.asarray(result.caches.embedding_draws.estimation)
  again = sampler.sample_under_noise(
      PURIFIED, PURIFIED.params(encoder_params, novel), x,
      sampler.estimation_key(key), num_samples=600, sigma=0.5, batch_size=200,
      outputs=("embeddings",))["embeddings"]
  np.testing.assert_array_equal(cached, np.asarray(again))
  np.testing.assert_allclose(np.linalg.norm(cached, axis=1), 1.0, atol=1e-5)

  novel_results = {
      m: ovc.certify_novel_prompt(m, PURIFIED, encoder_params, x, key,
                                  result.caches, novel, params)
      for m in ovc.METHODS}
  assert set(novel_results) == {"standard", "irs", "cached", "mvn"}
  for m, r in novel_results.items():
    assert r.method == m
    cert = r.certificate
    assert cert.prediction == -1 or 0 <= cert.prediction < C
    assert np.isfinite(cert.radius) and cert.radius >= 0
  assert novel_results["mvn"].approximate
  std, cac = novel_results["standard"].certificate, novel_results["cached"].certificate
  assert std.prediction != -1  # a real certificate is compared, not two abstentions
  assert cac.prediction == std.prediction
  assert cac.radius == std.radius
  assert cac.pA_lower == std.pA_lower
  np.testing.assert_array_equal(cac.counts, std.counts)


# ---------------------------------------------------------------------------
# The blank embedding, with the toy CLIP's text tower.


@pytest.fixture(scope="module")
def toy():
  from ovc_jax.models import load_clip  # pylint: disable=g-import-not-at-top
  return load_clip("toy")


def test_blank_embedding_is_the_mean_of_normalised_blank_prompts(toy):
  templates = ["a photo of a {}.", "a bad photo of a {}.", "a sketch of a {}."]
  got = np.asarray(clipure.blank_embedding(toy, templates))
  texts = ["a photo of a .", "a bad photo of a .", "a sketch of a ."]
  want = np.asarray(zeroshot.embed_prompts(toy, texts)).mean(axis=0)
  np.testing.assert_allclose(got, want, atol=1e-6)
  single = np.asarray(clipure.blank_embedding(toy))
  np.testing.assert_allclose(
      single, np.asarray(zeroshot.embed_prompts(toy, [clipure.SINGLE_BLANK_TEMPLATE]))[0],
      atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(clipure.blank_embedding(toy, "a photo of a {}.")), single,
      atol=1e-6)


def test_blank_embedding_errors(toy):
  with pytest.raises(ConfigError, match="needs a text tower"):
    clipure.blank_embedding(toy._replace(tokenizer=None))
  with pytest.raises(ConfigError, match="needs a text tower"):
    clipure.blank_embedding(toy._replace(params={"vision": toy.params["vision"]}))
  with pytest.raises(ConfigError, match="cannot be formatted"):
    clipure.blank_embedding(toy, ["a photo of a {c}."])
  with pytest.raises(ConfigError):
    clipure.blank_embedding(toy, [])


# ---------------------------------------------------------------------------
# How an attack differentiates through the purification: full, official, bpda.


def plane_basis(z, blank):
  """u0, the unit tangent t0 at u0 towards the blank's side in the plane of
  (z, blank), and the projector Q onto that plane's complement (float64)."""
  u0 = z / np.linalg.norm(z)
  b = blank / np.linalg.norm(blank)
  t0 = b - (u0 @ b) * u0
  t0 /= np.linalg.norm(t0)
  q = np.eye(len(z)) - np.outer(u0, u0) - np.outer(t0, t0)
  return u0, t0, q


def angle_to(u, blank):
  return np.arccos(np.clip(u @ blank / (np.linalg.norm(u) * np.linalg.norm(blank)),
                           -1.0, 1.0))


@pytest.mark.parametrize("steps,step_size", [(10, 30.0), (3, 30.0), (4, 0.7)])
def test_official_jacobian_follows_the_closed_form_in_float64(steps, step_size):
  # With each step's direction d detached, a step is u -> (u - s d) / sqrt(1 +
  # s^2) (d is a unit tangent): the tangent across the plane of (z, blank)
  # shrinks by (1 + s^2)^(-1/2) per step, the in-plane tangent by (1 + s^2)^-1
  # (also projected onto the next tangent, turned by atan(s)); the radial part
  # (the norm) passes whole. The exact Jacobian keeps the in-plane tangent
  # whole and scales the cross-plane one by sin(theta_out) / sin(theta_in).
  z, blank = random_z_blank(21, batch=1, dim=6)
  with jax.enable_x64(True):
    z64, b64 = z.astype(np.float64), blank.astype(np.float64)
    jac = {g: np.asarray(jax.jacrev(lambda v: clipure.purify(
        v[None], b64, steps=steps, step_size=step_size, gradient=g)[0])(z64[0]))
           for g in ("full", "official")}
    out = np.asarray(clipure.purify(z64, b64, steps=steps, step_size=step_size))[0]
  u0, t0, q = plane_basis(z64[0], b64)
  shrink = 1.0 + step_size**2
  # Radial: the norm passes whole in both.
  for g in jac:
    np.testing.assert_allclose(jac[g] @ u0, out / np.linalg.norm(out), atol=1e-9)
  # Official, across the plane: (1 + s^2)^(-steps/2) times the projector Q
  # (1.7e-15 for 10 steps of 30, where float64 rounding, ~1e-16 absolute,
  # leaves it 1% accurate).
  across = shrink**(-steps / 2)
  np.testing.assert_allclose(np.linalg.norm(jac["official"] @ q) / np.linalg.norm(q),
                             across, rtol=2e-2 if across < 1e-12 else 1e-9)
  np.testing.assert_allclose(jac["official"] @ q, across * q,
                             atol=max(1e-16, 1e-8 * across))
  # Official, within the plane: (1 + s^2)^-steps, or below float64 rounding.
  within = shrink**(-steps)
  if within > 1e-12:
    np.testing.assert_allclose(np.linalg.norm(jac["official"] @ t0), within,
                               rtol=1e-7)
  else:
    assert np.linalg.norm(jac["official"] @ t0) < 1e-15
  # Full: within the plane an isometry, across it sin(theta_out) / sin(theta_in)
  # (the sign: which side of the blank the output ends on).
  np.testing.assert_allclose(np.linalg.norm(jac["full"] @ t0), 1.0, rtol=1e-9)
  ratio = np.sin(angle_to(out, b64)) / np.sin(angle_to(z64[0], b64))
  np.testing.assert_allclose(np.abs(jac["full"] @ q), ratio * np.abs(q),
                             atol=1e-9)


def test_full_gradient_matches_central_finite_differences():
  z, blank = random_z_blank(22, batch=2, dim=6)
  w = np.random.default_rng(23).normal(size=(2, 6))
  with jax.enable_x64(True):
    z64, b64 = z.astype(np.float64), blank.astype(np.float64)
    loss = jax.jit(lambda v: jnp.sum(w * jnp.tanh(clipure.purify(v, b64,
                                                                steps=10))))
    grad = np.asarray(jax.grad(loss)(z64))
    eps = 1e-6
    fd = np.zeros_like(z64)
    for i in range(z64.shape[0]):
      for j in range(z64.shape[1]):
        e = np.zeros_like(z64)
        e[i, j] = eps
        fd[i, j] = (float(loss(z64 + e)) - float(loss(z64 - e))) / (2 * eps)
  # Central differences at 1e-6 are good to ~1e-7 here (10 steps of 30).
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)
  assert np.abs(grad).max() > 1e-2  # not a trivially zero gradient


def test_bpda_gradient_is_the_unpurified_gradient_at_the_purified_point():
  params = purified_params(2)
  x = jnp.asarray(np.random.default_rng(24).normal(size=(3, D)), jnp.float32)
  u = unit_rows(25, C)
  bpda = clipure.with_attack_gradient(PURIFIED, "bpda")
  plain = EmbeddingClassifier(LinearEncoder(), normalize=True)

  def head(z):  # the classifier's head on an embedding, as an attack sees it
    return jnp.sum(jax.nn.log_softmax(10.0 * l2_normalize(z) @ u.T)[:, 0])

  grad = jax.grad(lambda v: head(bpda.embed(params, v)))(x)
  z = LinearEncoder()(params["encoder"], x)
  purified = clipure.purify(z, params["blank"], steps=3)
  # Through the encoder, the cotangent of the purified point, unchanged.
  _, encoder_vjp = jax.vjp(lambda v: LinearEncoder()(params["encoder"], v), x)
  want, = encoder_vjp(jax.grad(head)(purified))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5,
                             atol=1e-6)
  # ... which is neither the full gradient nor the plain classifier's at z.
  full = jax.grad(lambda v: head(PURIFIED.embed(params, v)))(x)
  at_z = jax.grad(lambda v: head(plain.embed(params["encoder"], v)))(x)
  assert not np.allclose(np.asarray(grad), np.asarray(full), atol=1e-3)
  assert not np.allclose(np.asarray(grad), np.asarray(at_z), atol=1e-3)
  # The values are the same whatever the gradient.
  for g in clipure.ATTACK_GRADIENTS:
    np.testing.assert_array_equal(
        np.asarray(clipure.with_attack_gradient(PURIFIED, g).embed(params, x)),
        np.asarray(PURIFIED.embed(params, x)))


def test_official_gradient_in_float32_is_rounding_noise():
  # In float32 the detached path's true size, (1 + 900)^-5 ~ 1e-15 of the
  # full gradient, is below rounding: what is left is a few 1e-8 of it and
  # points nowhere in particular.
  z, blank = random_z_blank(26, batch=16, dim=E)
  w = np.random.default_rng(27).normal(size=(16, E)).astype(np.float32)
  grads = {g: np.asarray(jax.grad(lambda v: jnp.sum(
      w * l2_normalize(clipure.purify(v, blank, steps=10, gradient=g))))(z))
           for g in ("full", "official")}
  ratio = (np.linalg.norm(grads["official"], axis=1)
           / np.linalg.norm(grads["full"], axis=1))
  cos = np.sum(grads["official"] * grads["full"], axis=1) / (
      np.linalg.norm(grads["official"], axis=1)
      * np.linalg.norm(grads["full"], axis=1))
  assert np.all(ratio < 1e-5), ratio
  assert np.median(np.abs(cos)) < 0.5, cos


@pytest.mark.parametrize("gradient", ["exact", "", None, "BPDA"])
def test_unknown_attack_gradient_is_refused(gradient):
  with pytest.raises(ConfigError, match="attack gradient must be one of"):
    clipure.purify(np.ones((1, E)), np.ones(E), gradient=gradient)
  with pytest.raises(ConfigError, match="attack gradient must be one of"):
    clipure.PurifiedEncoder(LinearEncoder(), attack_gradient=gradient)
  with pytest.raises(ConfigError, match="attack gradient must be one of"):
    clipure.with_attack_gradient(PURIFIED, gradient)


@pytest.mark.parametrize("gradient", ["bpda", "official"])
def test_a_gradient_other_than_full_needs_purification(gradient):
  plain = EmbeddingClassifier(LinearEncoder(), normalize=True)
  with pytest.raises(ConfigError, match="needs a purified classifier"):
    clipure.with_attack_gradient(plain, gradient)
  with pytest.raises(ConfigError, match="needs a purified classifier"):
    clipure.PurifiedEncoder(LinearEncoder(), steps=0, attack_gradient=gradient)
  assert clipure.with_attack_gradient(plain, "full") is plain
