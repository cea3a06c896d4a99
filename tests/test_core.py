"""The traceable core as a JAX user calls it: jit, vmap, jit(vmap), sharding.

Each batched, compiled result is compared with the host certifier called one
input at a time: the same counts, the same prediction, a radius at most the
scipy one and within `core.radius_tolerance` of it. Small n (toy classifier,
n = 150) so that the whole file takes seconds.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import bounds
from ovc_jax import certificates
from ovc_jax import classifiers
from ovc_jax import clipure
from ovc_jax import fourier
from ovc_jax import sampler
from ovc_jax.certificates import ABSTAIN, Counts, SmoothingParams
from ovc_jax.certifiers import cached_ovc, core, mvn_ovc, standard
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError, InputError

D, E, C, B = 12, 6, 5, 6  # input size, embedding size, classes, batch
CLASSIFIER = EmbeddingClassifier(LinearEncoder(), normalize=True)
SMOOTHING = SmoothingParams(sigma=0.5, n0=20, n=150, alpha=0.01,
                            batch_size=64)
MVN = mvn_ovc.MVNParams(delta=0.0, batch_size=2048)
_RNG = np.random.default_rng(0)
ENCODER = {"A": jnp.asarray(_RNG.normal(size=(E, D)), jnp.float32),
           "c": jnp.asarray(_RNG.normal(size=E) * 0.1, jnp.float32)}
U = jnp.asarray(_RNG.normal(size=(C, E)), jnp.float32)
PARAMS = CLASSIFIER.params(ENCODER, U)
XS = jnp.asarray(_RNG.normal(size=(B, D)) * 0.7, jnp.float32)
KEYS = jax.vmap(lambda i: sampler.input_key(3, i))(jnp.arange(B))


def certify_one(x, key):
  return core.certify(key, CLASSIFIER, PARAMS, x, SMOOTHING)


TRACES = []


def _certify_one_counted(x, key):
  TRACES.append(x.shape)  # runs once per trace, not once per call
  return certify_one(x, key)


# One compiled program per batch shape, shared by the tests below.
CERTIFY_BATCH = jax.jit(jax.vmap(_certify_one_counted))


@pytest.fixture(scope="module")
def host():
  """standard.certify of each input alone, with its key."""
  return [standard.certify(KEYS[i], CLASSIFIER, PARAMS, XS[i], SMOOTHING)
          for i in range(B)]


def assert_matches_host(out, host_certs, smoothing=SMOOTHING):
  """A batched JaxCertificate against host certificates, input by input."""
  out = jax.device_get(out)
  for i, ref in enumerate(host_certs):
    np.testing.assert_array_equal(out.counts[i], ref.counts)
    assert int(out.prediction[i]) == ref.prediction
    radius = float(out.radius[i])
    assert radius <= ref.radius
    assert ref.radius - radius <= core.radius_tolerance(smoothing,
                                                        ref.pA_lower)
    assert float(out.pA_lower[i]) <= ref.pA_lower + 1e-7


def test_the_toy_batch_has_certificates_and_abstentions(host):
  predictions = [c.prediction for c in host]
  assert ABSTAIN in predictions
  assert sum(p != ABSTAIN for p in predictions) >= 2


@pytest.mark.parametrize("mode", ["jit", "vmap", "jit_vmap"])
def test_core_certify_agrees_with_host(mode, host):
  if mode == "jit":
    one = jax.jit(certify_one)
    out = jax.tree.map(lambda *a: jnp.stack(a),
                       *[one(XS[i], KEYS[i]) for i in range(B)])
  elif mode == "vmap":
    out = jax.vmap(certify_one)(XS, KEYS)
  else:
    out = CERTIFY_BATCH(XS, KEYS)
  assert out.prediction.shape == (B,) and out.counts.shape == (B, C)
  assert_matches_host(out, host)


def test_counts_are_the_host_draws():
  counts = jax.jit(jax.vmap(lambda x, k: standard.certification_counts(
      k, CLASSIFIER, PARAMS, x, SMOOTHING)))(XS, KEYS)
  for i in range(B):
    draws = sampler.sample_certification_draws(
        CLASSIFIER, PARAMS, XS[i], KEYS[i], sigma=SMOOTHING.sigma,
        num_classes=C, n0=SMOOTHING.n0, n=SMOOTHING.n,
        batch_size=SMOOTHING.batch_size)
    np.testing.assert_array_equal(counts.selection[i],
                                  draws.selection["counts"])
    np.testing.assert_array_equal(counts.estimation[i],
                                  draws.estimation["counts"])
    assert counts.selection[i].sum() == SMOOTHING.n0


def test_class_matrix_as_a_traced_argument(host):
  @jax.jit
  def certify_batch(u, xs, keys):
    params = CLASSIFIER.params(ENCODER, u)  # u is traced here
    return jax.vmap(lambda x, k: core.certify(k, CLASSIFIER, params, x,
                                              SMOOTHING))(xs, keys)

  assert_matches_host(certify_batch(U, XS, KEYS), host)
  # A traced matrix's values are unknown while tracing: not checked, and the
  # program's own safety holds (a NaN row makes every logit NaN: no class,
  # so every count is 0 and the certificate abstains).
  out = certify_batch(U.at[0, 0].set(jnp.nan), XS, KEYS)
  assert np.all(np.asarray(out.prediction) == ABSTAIN)
  assert np.all(np.asarray(out.counts) == 0)
  # A concrete one is checked on the host, also when closed over inside jit.
  bad = CLASSIFIER.params(ENCODER, U)
  bad["class_embeddings"] = U.at[0, 0].set(jnp.inf)
  with pytest.raises(InputError, match="NaN or infinite"):
    jax.jit(lambda x, k: core.certify(k, CLASSIFIER, bad, x, SMOOTHING))(
        XS[0], KEYS[0])
  with pytest.raises(InputError, match=r"class matrix must be \[C, d\]"):
    certify_batch(U[0], XS, KEYS)  # shapes are checked while tracing


def test_one_compilation_per_batch_shape():
  first = CERTIFY_BATCH(XS, KEYS)
  other_keys = jax.vmap(lambda i: sampler.input_key(4, i))(jnp.arange(B))
  second = CERTIFY_BATCH(XS[::-1], other_keys)  # same shapes, other values
  jax.block_until_ready((first, second))
  assert CERTIFY_BATCH._cache_size() == 1  # pylint: disable=protected-access
  assert TRACES == [(D,)]
  assert not np.array_equal(first.counts, second.counts)
  CERTIFY_BATCH(XS[:2], KEYS[:2])  # another batch shape: one more program
  assert CERTIFY_BATCH._cache_size() == 2  # pylint: disable=protected-access
  assert TRACES == [(D,), (D,)]


@pytest.fixture(scope="module")
def caches():
  """Each input's embedding cache and Gaussian fit, made on the host."""
  out = []
  for i in range(B):
    draws = standard.certification_draws(
        KEYS[i], CLASSIFIER, PARAMS, XS[i], SMOOTHING,
        outputs=("counts", "embeddings"))
    cache = cached_ovc.embeddings_from_draws(draws)
    out.append((cache, mvn_ovc.fit_gaussian(cache.estimation)))
  return out


NOVEL_U = jnp.asarray(np.random.default_rng(1).normal(size=(C, E)),
                      jnp.float32)


def test_cached_ovc_core_agrees_with_host(caches, host):
  stacked = jax.tree.map(lambda *a: jnp.stack(a),
                         *[cache for cache, _ in caches])
  certify_batch = jax.jit(jax.vmap(
      lambda cache, u: core.certify_cached(cache, u, SMOOTHING),
      in_axes=(0, None)))
  # The known prompt: Cached-OVC is standard RS, bit for bit.
  assert_matches_host(certify_batch(stacked, U), host)
  refs = [cached_ovc.certify_cached(cache, NOVEL_U, SMOOTHING)
          for cache, _ in caches]
  assert_matches_host(certify_batch(stacked, NOVEL_U), refs)
  counts = jax.vmap(lambda cache: core.cached_counts(
      cache, NOVEL_U, cached_ovc.CachedParams(batch_size=32)))(stacked)
  np.testing.assert_array_equal(counts.estimation,
                                np.stack([r.counts for r in refs]))
  # vmap over prompts with one cache closed over.
  both = jax.vmap(lambda u: core.cached_counts(caches[0][0], u))(
      jnp.stack([U, NOVEL_U]))
  np.testing.assert_array_equal(both.estimation,
                                np.stack([host[0].counts, refs[0].counts]))


def test_mvn_ovc_core_agrees_with_host(caches):
  fits = jax.tree.map(lambda *a: jnp.stack(a), *[fit for _, fit in caches])
  certify_batch = jax.jit(jax.vmap(
      lambda key, fit: core.certify_mvn(key, fit, NOVEL_U, SMOOTHING, MVN)))
  refs = [mvn_ovc.certify_mvn(KEYS[i], caches[i][1], NOVEL_U, SMOOTHING, MVN)
          for i in range(B)]
  assert_matches_host(certify_batch(KEYS, fits), refs)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import test_core as t
    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    xs, keys = jax.device_put((t.XS, t.KEYS), batch)
    out = jax.jit(jax.vmap(t.certify_one), out_shardings=batch)(xs, keys)
    print(json.dumps({{
        "devices": sorted(d.id for d in out.counts.sharding.device_set),
        "shards": [list(s.data.shape) for s in out.counts.addressable_shards],
        "counts": np.asarray(out.counts).tolist(),
        "prediction": np.asarray(out.prediction).tolist(),
        "radius": np.asarray(out.radius).tolist(),
        "pA_lower": np.asarray(out.pA_lower).tolist()}}))
""")


def test_batch_sharded_over_two_devices(host):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c",
       SHARDED_SCRIPT.format(tests=os.path.dirname(__file__))],
      env=env, capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["devices"] == [0, 1]
  assert got["shards"] == [[B // 2, C], [B // 2, C]]
  out = certificates.JaxCertificate(
      np.asarray(got["prediction"]), np.asarray(got["radius"], np.float32),
      np.asarray(got["pA_lower"], np.float32), np.asarray(got["counts"]))
  assert_matches_host(out, host)


def test_certificate_from_counts_checks_concrete_counts_only():
  counts = Counts(jnp.array([0, 20, 0, 0, 0]), jnp.array([0, 151, 0, 0, 0]))
  with pytest.raises(ConfigError, match="do not fit n = 150"):
    core.certificate(counts, SMOOTHING)
  # Traced, the same counts pass the checks (their values are unknown).
  out = jax.jit(lambda c: core.certificate(c, SMOOTHING))(counts)
  assert out.prediction.shape == () and out.prediction.dtype == jnp.int32
  with pytest.raises(ConfigError, match="must be \\[..., C\\] alike"):
    core.certificate(Counts(counts.selection, counts.estimation[:3]),
                     SMOOTHING)


# Every public function a JAX user would call inside jit, each called with
# its arrays closed over (concrete inside the trace: where value checks used
# to raise TracerBoolConversionError) and once more with them traced.
def _embeddings():
  return jnp.asarray(np.random.default_rng(2).normal(size=(40, E)),
                     jnp.float32)


def _fit():
  return mvn_ovc.fit_gaussian(_embeddings())


def _cache():
  e = _embeddings()
  return cached_ovc.EmbeddingDraws(e[:SMOOTHING.n0], jnp.tile(e, (4, 1))[:150])


def _sample(params, x, key):
  return sampler.sample_under_noise(
      CLASSIFIER, params, x, key, num_samples=50, sigma=0.5, batch_size=16,
      num_classes=C, outputs=("counts", "predictions", "embeddings"))


TRACEABLE = {
    "sampler.sample_under_noise": (_sample, lambda: (PARAMS, XS[0], KEYS[0])),
    "sampler.sample_certification_draws": (
        lambda p, x, k: sampler.sample_certification_draws(
            CLASSIFIER, p, x, k, sigma=0.5, num_classes=C, n0=10, n=30,
            batch_size=16), lambda: (PARAMS, XS[0], KEYS[0])),
    "sampler.stream_key": (lambda k: sampler.stream_key(k, "estimation"),
                           lambda: (KEYS[0],)),
    "sampler.check_input": (sampler.check_input, lambda: (XS[0],)),
    "EmbeddingClassifier.params": (
        lambda enc, u: CLASSIFIER.params(enc, u), lambda: (ENCODER, U)),
    "EmbeddingClassifier.__call__": (CLASSIFIER, lambda: (PARAMS, XS[:3])),
    "classifiers.check_class_embeddings": (classifiers.check_class_embeddings,
                                           lambda: (U,)),
    "classifiers.predict_from_embeddings": (
        classifiers.predict_from_embeddings, lambda: (_embeddings(), U)),
    "standard.certification_draws": (
        lambda k, p, x: standard.certification_draws(
            k, CLASSIFIER, p, x, SMOOTHING, outputs=("counts", "embeddings")),
        lambda: (KEYS[0], PARAMS, XS[0])),
    "standard.certification_counts": (
        lambda k, p, x: standard.certification_counts(k, CLASSIFIER, p, x,
                                                      SMOOTHING),
        lambda: (KEYS[0], PARAMS, XS[0])),
    "core.certify": (lambda k, p, x: core.certify(k, CLASSIFIER, p, x,
                                                  SMOOTHING),
                     lambda: (KEYS[0], PARAMS, XS[0])),
    "core.certificate": (lambda c: core.certificate(c, SMOOTHING),
                         lambda: (Counts(jnp.array([1, 19, 0, 0, 0]),
                                         jnp.array([3, 140, 7, 0, 0])),)),
    "core.cached_counts": (lambda cache, u: core.cached_counts(cache, u),
                           lambda: (_cache(), U)),
    "core.certify_cached": (
        lambda cache, u: core.certify_cached(cache, u, SMOOTHING),
        lambda: (_cache(), U)),
    "core.mvn_counts": (
        lambda k, fit, u: core.mvn_counts(k, fit, u, SMOOTHING, MVN),
        lambda: (KEYS[0], _fit(), U)),
    "core.certify_mvn": (
        lambda k, fit, u: core.certify_mvn(k, fit, u, SMOOTHING, MVN),
        lambda: (KEYS[0], _fit(), U)),
    "cached_ovc.count_predictions": (cached_ovc.count_predictions,
                                     lambda: (_embeddings(), U)),
    "mvn_ovc.fit_gaussian": (mvn_ovc.fit_gaussian, lambda: (_embeddings(),)),
    "mvn_ovc.check_fit": (mvn_ovc.check_fit, lambda: (_fit(),)),
    "mvn_ovc.logit_gaussian": (mvn_ovc.logit_gaussian, lambda: (_fit(), U)),
    "mvn_ovc.latent_normals": (lambda k: mvn_ovc.latent_normals(k, 0, 4),
                               lambda: (KEYS[0],)),
    "certificates.certificate_from_counts_jax": (
        lambda c0, c: certificates.certificate_from_counts_jax(
            c0, c, 0.5, 0.01, n=150),
        lambda: (jnp.array([1, 19, 0]), jnp.array([3, 140, 7]))),
    "certificates.certify_counts_jax": (
        lambda c: certificates.certify_counts_jax(c, SMOOTHING),
        lambda: (Counts(jnp.array([1, 19, 0]), jnp.array([3, 140, 7])),)),
    "bounds.clopper_pearson_lower_jax": (
        lambda k: bounds.clopper_pearson_lower_jax(k, 150, 0.01),
        lambda: (jnp.array(140),)),
    "bounds.clopper_pearson_upper_jax": (
        lambda k: bounds.clopper_pearson_upper_jax(k, 150, 0.01),
        lambda: (jnp.array(3),)),
    "clipure.purify": (lambda z, b: clipure.purify(z, b),
                       lambda: (_embeddings(), U[0])),
    "clipure.PurifiedEncoder.__call__": (
        lambda p, x: clipure.PurifiedEncoder(LinearEncoder())(p, x),
        lambda: (clipure.purified_encoder_params(ENCODER, U[0]), XS[:3])),
    "fourier.basis_image": (lambda k, l: fourier.basis_image(8, 8, k, l),
                            lambda: (jnp.int32(1), jnp.int32(2))),
    "fourier.perturb": (
        fourier.perturb,
        lambda: (jnp.full((2, 8, 8, 3), 0.5), fourier.basis_image(8, 8, 1, 2),
                 jnp.ones((2, 3)), jnp.float32(4.0))),
}


def test_every_core_function_is_listed():
  listed = {name.split(".", 1)[1] for name in TRACEABLE
            if name.startswith("core.")}
  functions = {n for n in core.__all__ if callable(getattr(core, n))
               and not isinstance(getattr(core, n), type)
               and n not in ("radius_tolerance", "certification_draws",
                             "certification_counts")}
  assert functions <= listed, functions - listed


@pytest.mark.parametrize("name", sorted(TRACEABLE))
def test_public_function_under_jit(name):
  fn, make_args = TRACEABLE[name]
  args = make_args()
  closed = jax.jit(lambda: fn(*args))()  # concrete arrays inside the trace
  traced = jax.jit(fn)(*args)
  for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(traced)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(jax.random.key_data(a),
                                    jax.random.key_data(b))
    elif jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(a, b)
    else:  # constants folded into one program, not the other: rounding
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
