"""Compressed Cached-OVC caches: regenerate mode is standard RS bit for bit,
conservative mode never certifies more, and both stay right on near ties.

The small tanh-MLP encoder of test_cached_ovc.py (d = 8) and the toy CLIP
(d = 128, C = 10, three prompts). The near-tie case puts two classes'
vectors so close that many rows sit on their decision boundary; it makes
the identity test fail when the bound or the rounding allowance is removed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_cached_ovc import (C, CLASSIFIER, KW, assert_identical,
                             first_prompt_run, make_input, make_params,
                             make_prompts, smoothing)

from ovc_jax import cache_codec
from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certifiers import cached_ovc, core, standard
from ovc_jax.certifiers.cached_ovc import CachedParams, EmbeddingDraws
from ovc_jax.errors import ConfigError, InputError

CONSERVATIVE = CachedParams(ambiguous="conservative")


def certify_both_ways(compressed, prompts, smoothing_params, regenerate):
  """The prompts' certificates from a compressed cache in regenerate mode
  and in conservative mode."""
  return (cached_ovc.certify_cached_many(compressed, prompts, smoothing_params,
                                         regenerate=regenerate),
          cached_ovc.certify_cached_many(compressed, prompts, smoothing_params,
                                         CONSERVATIVE))


def from_rows(cache):
  """A Regenerate that hands back the exact rows (no encoder needed)."""
  rows = {"selection": np.asarray(cache.selection),
          "estimation": np.asarray(cache.estimation)}
  return lambda stream, indices: rows[stream][indices]


def standard_run(encoder, prompts, x, key, sigma):
  """Standard RS of P prompts on one set of draws (`standard.certify_many`'s
  counts), keeping the embeddings: each prompt's certificate, and the cache."""
  draws = sampler.sample_certification_draws(
      CLASSIFIER, CLASSIFIER.params(encoder, prompts), x, key, sigma=sigma,
      num_classes=C, n0=KW["n0"], n=KW["n"], batch_size=KW["batch_size"],
      outputs=("counts", "embeddings"))
  certs = certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"], n=KW["n"],
      sigma=sigma, alpha=KW["alpha"])
  return certs, cached_ovc.embeddings_from_draws(draws)


def assert_no_more_than(conservative, exact):
  """A conservative certificate: the exact class or abstain, and no larger
  radius or pA_lower."""
  assert conservative.prediction in (exact.prediction, certificates.ABSTAIN)
  assert conservative.radius <= exact.radius
  if conservative.prediction != certificates.ABSTAIN:
    assert conservative.pA_lower <= exact.pA_lower
  assert np.all(conservative.counts <= exact.counts)
  assert conservative.regenerated == 0


def test_regenerated_samples_have_the_standard_runs_bits():
  """sample_at_indices in the standard run's batch shapes gives its bits,
  for the selection stream (n0 = 64 < batch 128) and the estimation one."""
  encoder, prompts = make_params(), make_prompts(0, 1)
  x, key = make_input(0), jax.random.key(0)
  _, cache = first_prompt_run(encoder, prompts[0], x, key, 0.25)
  regenerate = cached_ovc.encoder_regenerator(
      CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]), x, key,
      smoothing(0.25))
  for stream, rows in (("selection", cache.selection),
                       ("estimation", cache.estimation)):
    indices = np.array([len(rows) - 1, 0, 5, 5, 7, 63, 130])
    indices = indices[indices < len(rows)]
    np.testing.assert_array_equal(np.asarray(regenerate(stream, indices)),
                                  np.asarray(rows)[indices])
  assert regenerate("estimation", np.zeros(0, np.int64)).shape == (0, 8)
  with pytest.raises(ConfigError, match=r"lie in \[0, 64\)"):
    regenerate("selection", np.array([64]))


@pytest.mark.parametrize("fmt", ["int8", "int16"])
def test_regenerate_is_standard_rs_and_conservative_never_more(fmt):
  """Over inputs, keys, sigmas and prompts (the one that filled the cache
  and three others), all at once ([P, C, d]) and one at a time. The
  references are standard RS of all four prompts on the same draws (the
  standard.certify of each alone, test_cached_ovc.py checks)."""
  encoder, prompts = make_params(), make_prompts(0, 4)
  ambiguous = certified = 0
  for sigma in (0.12, 0.25, 0.5, 1.0):
    for i in range(2):
      x, key = make_input(i), jax.random.key(10 + i)
      references, cache = standard_run(encoder, prompts, x, key, sigma)
      compressed = cached_ovc.compress_draws(cache, fmt)
      regenerate = cached_ovc.encoder_regenerator(
          CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]), x, key,
          smoothing(sigma))
      many, conservative = certify_both_ways(compressed, prompts,
                                             smoothing(sigma), regenerate)
      for p, reference in enumerate(references):
        assert_identical(many[p], reference)
        assert many[p].regenerated == many[p].ambiguous
        assert conservative[p].ambiguous == many[p].ambiguous
        assert_no_more_than(conservative[p], reference)
        ambiguous += many[p].ambiguous
        certified += reference.prediction != certificates.ABSTAIN
      one = cached_ovc.certify_cached(compressed, prompts[3], smoothing(sigma),
                                      CachedParams(batch_size=100),
                                      regenerate)
      assert_identical(one, many[3])
      assert one.ambiguous == many[3].ambiguous
    # One check against standard.certify of a prompt alone, per sigma.
    assert_identical(many[2], standard.certify(
        key, CLASSIFIER, CLASSIFIER.params(encoder, prompts[2]), x,
        smoothing(sigma), num_classes=C))
  assert 0 < certified < 4 * 2 * 4
  if fmt == "int8":
    assert ambiguous > 0  # the regenerate path ran


@pytest.fixture(scope="module")
def toy_clip():
  from ovc_jax import datasets, models, preprocessing, zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  clip = models.load_clip("toy")
  test = datasets.load_dataset("toy")
  prompts = jnp.stack([zeroshot.class_embeddings(clip, t, test.class_names)
                       for t in ("a photo of a {}.", "a drawing of a {}.",
                                 "a blurry photo of the {}.")])
  xs = [preprocessing.preprocess(jnp.asarray(test.images[i], jnp.float32)
                                 / 255, clip.preprocess) for i in (0,)]
  return EmbeddingClassifier(clip.model.embed_images), clip.params, prompts, xs


def test_toy_clip_regenerate_is_standard_rs(toy_clip):
  """Three prompts (the cache's and two unseen ones) on one input, from
  one standard run of all three (each prompt's standard RS certificate)."""
  classifier, encoder, prompts, xs = toy_clip
  # n0 = n = batch_size: one compiled sampler program for both streams (the
  # toy CLIP's compilations are most of this test's time).
  s = certificates.SmoothingParams(sigma=0.25, n0=100, n=100, alpha=0.001,
                                   batch_size=100)
  for i, x in enumerate(xs[:1]):
    key = sampler.input_key(0, i)
    draws = sampler.sample_certification_draws(
        classifier, classifier.params(encoder, prompts), x, key,
        sigma=s.sigma, num_classes=10, n0=s.n0, n=s.n,
        batch_size=s.batch_size, outputs=("counts", "embeddings"))
    cache = cached_ovc.embeddings_from_draws(draws)
    references = certificates.certificates_from_counts(
        draws.selection["counts"], draws.estimation["counts"], n=s.n,
        sigma=s.sigma, alpha=s.alpha)
    regenerate = cached_ovc.encoder_regenerator(
        classifier, classifier.params(encoder, prompts[0]), x, key, s)
    for fmt in ("int8", "int16"):
      compressed = cached_ovc.compress_draws(cache, fmt)
      many, conservative = certify_both_ways(compressed, prompts, s,
                                             regenerate)
      for p, reference in enumerate(references):
        assert_identical(many[p], reference)
        assert_no_more_than(conservative[p], reference)


def near_tie_prompts(cache):
  """Two prompts [2, C, E] whose classes 0 and 1 nearly tie on these rows.

  u_0 is the rows' mean direction m, u_1 = u_0 + eps (v - k m) with v a
  unit vector orthogonal to m, so the logit gap eps (e.v - k e.m) puts
  about 80% of the rows on class 0's side and many near the boundary. The
  other classes point away and never win.

  Prompt 0, eps = 0.1: k puts the boundary between one row e_j and its
  int8 decoding ê_j, so that their classes differ by a margin far above the
  float32 rounding: the bound b_j ||u_1 - u_0|| alone keeps ê_j ambiguous.
  Prompt 1, eps = 1e-6: the gaps are about the logits' float32 rounding, so
  the rounding allowance decides.
  """
  e = np.asarray(cache.estimation, np.float64)
  decoded = cache_codec.decode_rows(
      cache_codec.encode_rows(np.asarray(cache.estimation), "int8"))
  m = e.mean(axis=0)
  m /= np.linalg.norm(m)
  rng = np.random.default_rng(0)
  v = rng.normal(size=m.shape)
  v -= (v @ m) * m
  v /= np.linalg.norm(v)
  k_exact = (e @ v) / (e @ m)                 # the k that puts a row on the
  k_decoded = (decoded @ v) / (decoded @ m)   # boundary
  band = np.abs(k_exact - np.quantile(k_exact, 0.8)) < 0.05
  j = np.argmax(np.where(band, np.abs(k_exact - k_decoded), -1))
  k_bound = (k_exact[j] + k_decoded[j]) / 2
  rest = -m + 0.3 * rng.normal(size=(C - 2, m.size))
  prompts = [np.concatenate([[m, m + eps * (v - k * m)], rest])
             for eps, k in ((0.1, k_bound),
                            (1e-6, np.quantile(k_exact, 0.8)))]
  return jnp.asarray(np.stack(prompts), jnp.float32)


@pytest.fixture(scope="module")
def near_tie():
  encoder = make_params()
  x, key, sigma = make_input(1), jax.random.key(1), 0.25
  _, cache = first_prompt_run(encoder, make_prompts(0, 1)[0], x, key, sigma)
  prompts = near_tie_prompts(cache)
  references = [standard.certify(
      key, CLASSIFIER, CLASSIFIER.params(encoder, u), x, smoothing(sigma),
      num_classes=C) for u in prompts]
  regenerate = cached_ovc.encoder_regenerator(
      CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]), x, key,
      smoothing(sigma))
  return cache, prompts, references, regenerate, smoothing(sigma)


@pytest.mark.parametrize("fmt", ["int8", "int16"])
def test_near_tie_forces_ambiguous_rows_and_both_modes_stay_right(near_tie,
                                                                  fmt):
  cache, prompts, references, regenerate, s = near_tie
  assert all(r.prediction == 0 for r in references)  # a certificate to keep
  compressed = cached_ovc.compress_draws(cache, fmt)
  many, conservative = certify_both_ways(compressed, prompts, s, regenerate)
  for p, reference in enumerate(references):
    assert_identical(many[p], reference)
    assert many[p].ambiguous > 0
    assert many[p].regenerated == many[p].ambiguous
    assert_no_more_than(conservative[p], reference)
    if fmt == "int8":
      assert conservative[p].pA_lower < reference.pA_lower
  # Rows ambiguous for both prompts are regenerated once.
  est = cached_ovc.count_stream(compressed.estimation, prompts,
                                stream="estimation", regenerate=regenerate)
  both = cached_ovc.count_predictions_bounded(compressed.estimation, prompts)
  assert est.encoder_rows == int(both.ambiguous.any(axis=1).sum())
  assert est.encoder_rows < int(est.ambiguous.sum())


def test_identity_fails_when_the_bound_is_broken(near_tie, monkeypatch):
  """The check can fail: without the bound (b_i = 0), or without the
  rounding allowance, rows certified from their decoded logits get another
  class than standard RS gave them, and the counts differ."""
  cache, prompts, references, regenerate, s = near_tie

  def counts_for(compressed):
    return [c.counts for c in cached_ovc.certify_cached_many(
        compressed, prompts, s, regenerate=regenerate)]

  compressed = cached_ovc.compress_draws(cache, "int8")
  for p, counts in enumerate(counts_for(compressed)):
    np.testing.assert_array_equal(counts, references[p].counts)
  no_bound = EmbeddingDraws(*(r._replace(bound=np.zeros_like(r.bound))
                              for r in compressed))
  wrong = counts_for(no_bound)
  assert not np.array_equal(wrong[0], references[0].counts)
  monkeypatch.setattr(cached_ovc, "rounding_allowance",
                      lambda d: cached_ovc.RoundingAllowance(0., 1., 1., 0.))
  wrong = counts_for(cached_ovc.compress_draws(cache, "int16"))
  assert not np.array_equal(wrong[1], references[1].counts)


def _rows(seed, m=3001, d=64):
  """Unit rows around a centre, and two prompts [2, 7, d]: random class
  vectors, and vectors near the centre (classes that compete)."""
  rng = np.random.default_rng(seed)
  center = rng.normal(size=d)
  e = (center + 0.3 * rng.normal(size=(m, d))).astype(np.float32)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  unit = center / np.linalg.norm(center)
  z = rng.normal(size=(7, d))
  close = unit + 0.1 * (z - (z @ unit)[:, None] * unit)  # ties at the centre
  return e, jnp.asarray(np.stack([rng.normal(size=(7, d)), close]),
                        jnp.float32)


def test_every_kind_of_codes_and_chunking_counts_the_same(tmp_path):
  """Codes in memory, memory-mapped, misaligned (copied) or a jax array, in
  chunks of any size; non-finite rows count for no class and are certain;
  regenerate mode gives count_predictions' counts of the exact rows."""
  e, prompts = _rows(1)
  e[[3, 2000]] = np.nan
  rows = cache_codec.encode_rows(e, "int8")
  np.save(tmp_path / "codes.npy", rows.codes)
  buffer = np.empty(rows.codes.size + 1, np.int8)
  misaligned = buffer[1:].reshape(rows.codes.shape)
  misaligned[:] = rows.codes
  reference = cached_ovc.count_predictions_bounded(rows, prompts)
  assert not reference.ambiguous[[3, 2000]].any()
  assert reference.ambiguous.any()
  exact = np.asarray(cached_ovc.count_predictions(e, prompts))
  kinds = {"numpy": rows.codes, "jax": jnp.asarray(rows.codes),
           "misaligned": misaligned,
           "memmap": np.load(tmp_path / "codes.npy", mmap_mode="r")}
  for name, batch in [("numpy", None), ("numpy", 8), ("numpy", 1000),
                      ("jax", None), ("misaligned", None),
                      ("misaligned", 100), ("memmap", None), ("memmap", 100)]:
    codes = kinds[name]
    got = cached_ovc.count_predictions_bounded(rows._replace(codes=codes),
                                               prompts, batch_size=batch)
    for a, b in zip(got, reference):
      np.testing.assert_array_equal(a, b, err_msg=f"{name} {batch}")
    stream = cached_ovc.count_stream(
        rows._replace(codes=codes), prompts, stream="estimation",
        cached=CachedParams(batch_size=batch),
        regenerate=lambda stream, i: e[i])
    np.testing.assert_array_equal(stream.counts, exact)
  assert np.all(reference.certain <= exact)
  one = cached_ovc.count_predictions_bounded(rows, prompts[1])
  np.testing.assert_array_equal(one.certain, reference.certain[1])
  np.testing.assert_array_equal(one.ambiguous, reference.ambiguous[:, 1])


def test_a_block_of_a_stream_regenerates_its_own_samples():
  """first_index: a block of rows [500, 1500) asks for samples 500 + i."""
  e, prompts = _rows(2, m=1500)
  asked = []

  def regenerate(stream, indices):
    asked.append(indices)
    return e[indices]

  block = cache_codec.encode_rows(e[500:], "int8")
  got = cached_ovc.count_stream(block, prompts[1], stream="estimation",
                                regenerate=regenerate, first_index=500)
  np.testing.assert_array_equal(
      got.counts, cached_ovc.count_predictions(e[500:], prompts[1]))
  assert got.regenerated == got.ambiguous > 0
  assert np.concatenate(asked).min() >= 500


def test_float32_caches_count_as_before():
  e, prompts = _rows(3, m=200)
  cache = EmbeddingDraws(e[:50], e[50:])
  s = certificates.SmoothingParams(sigma=0.5, n0=50, n=150)
  for cert in cached_ovc.certify_cached_many(cache, prompts, s):
    assert cert.ambiguous == cert.regenerated == 0
  compressed = cached_ovc.compress_draws(cache, "int8")
  with pytest.raises(ConfigError, match="float32 caches only"):
    core.cached_counts(compressed, prompts)
  with pytest.raises(ConfigError, match="float32 caches only"):
    core.certify_cached(compressed, prompts[0], s)


def test_bad_inputs_get_one_clear_error():
  e, prompts = _rows(4, m=200)
  cache = cached_ovc.compress_draws(EmbeddingDraws(e[:50], e[50:]), "int8")
  s = certificates.SmoothingParams(sigma=0.5, n0=50, n=150)
  with pytest.raises(ConfigError, match="ambiguous must be one of"):
    CachedParams(ambiguous="regenrate")
  with pytest.raises(ConfigError, match="needs the encoder.*conservative"):
    cached_ovc.certify_cached(cache, prompts[0], s)
  with pytest.raises(ConfigError, match="regenerate must be a function"):
    cached_ovc.certify_cached(cache, prompts[0], s, regenerate="encoder")
  est = cache.estimation
  for bad, match in [
      (est._replace(scale=est.scale[:-1]), r"scale must be float \[150\]"),
      (est._replace(bound=est.bound[:-1]), r"bound must be float \[150\]"),
      (est._replace(mean=est.mean[:-1]), r"mean must be float \[64\]"),
      (est._replace(codes=est.codes.astype(np.float32)), "int8 or int16"),
      (est._replace(bound=np.where(np.arange(150) == 7, -1.0,
                                   est.bound).astype(np.float32)),
       "NaN or negative error bound"),
      (est._replace(bound=np.where(np.arange(150) == 7, np.nan,
                                   est.bound).astype(np.float32)),
       "NaN or negative error bound")]:
    with pytest.raises(InputError, match=match):
      cached_ovc.certify_cached(cache._replace(estimation=bad), prompts[0], s,
                                CONSERVATIVE)
  with pytest.raises(InputError, match="regenerator gave float64"):
    cached_ovc.certify_cached(
        cache, prompts[0], s,
        regenerate=lambda stream, i: np.zeros((len(i), 64)))
  with pytest.raises(ConfigError, match="count_predictions takes float32"):
    cached_ovc.count_predictions(cache.estimation, prompts[0])
  with pytest.raises(ConfigError, match="stream must be"):
    cached_ovc.count_stream(cache.estimation, prompts[0], stream="both")
  with pytest.raises(ConfigError, match="holds 150 estimation"):
    cached_ovc.certify_cached(cache, prompts[0], s.replace(n=151),
                              CONSERVATIVE)


def test_the_allowance_covers_float32_logits():
  """Rows certain by the test keep their class under any float32 rounding
  of their logits: checked against float64 logits of the exact rows with
  the worst rounding shift gamma_d ||e|| ||u_c|| either way."""
  e, prompts = _rows(5, m=2000, d=512)
  rows = cache_codec.encode_rows(e, "int8")
  got = cached_ovc.count_predictions_bounded(rows, prompts)
  u = np.asarray(prompts, np.float64)
  exact = np.einsum("md,pcd->mpc", e.astype(np.float64), u)
  d = e.shape[1]
  shift = (d * 2.0**-24 / (1 - d * 2.0**-24) * np.linalg.norm(
      e.astype(np.float64), axis=1)[:, None, None]
           * np.linalg.norm(u, axis=-1)[None])
  decoded = cache_codec.decode_rows(rows).astype(np.float64)
  top = np.einsum("md,pcd->mpc", decoded, u).argmax(axis=-1)  # [m, P]
  certain = ~got.ambiguous
  top_exact = np.take_along_axis(exact, top[..., None], -1)
  worst = ((top_exact - np.take_along_axis(shift, top[..., None], -1))
           - (exact + shift))
  others = np.arange(u.shape[1]) != top[..., None]
  assert np.all(np.where(others, worst, 1.0)[certain] > 0)
  assert certain[:, 0].mean() > 0.9 and certain[:, 1].any()
