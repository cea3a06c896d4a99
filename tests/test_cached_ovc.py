"""Cached-OVC: bit-for-bit equal to standard RS with the same key; cache safety."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import caches
from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import cached_ovc, standard
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import CacheError, InputError

D, H, E, C = 16, 32, 8, 6


def mlp_encoder(params, inputs):
  """A small non-linear encoder (tanh MLP), a stand-in for a CLIP tower."""
  h = jnp.tanh(inputs.reshape(inputs.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"]


CLASSIFIER = EmbeddingClassifier(mlp_encoder, normalize=True)


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"w1": f(D, H) / 2, "b1": f(H) * 0.1, "w2": f(H, E)}


def make_prompts(seed, p):
  rng = np.random.default_rng(100 + seed)
  u = rng.normal(size=(p, C, E))
  return jnp.asarray(u / np.linalg.norm(u, axis=-1, keepdims=True), jnp.float32)


def make_input(seed):
  return jnp.asarray(np.random.default_rng(200 + seed).normal(size=D), jnp.float32)


KW = dict(n0=64, n=1500, alpha=0.001, batch_size=128)


def smoothing(sigma):
  return SmoothingParams(sigma=sigma, **KW)


def first_prompt_run(encoder_params, prompt, x, key, sigma):
  """Standard RS on the first prompt, keeping the embeddings (fills the cache)."""
  draws = sampler.sample_certification_draws(
      CLASSIFIER, CLASSIFIER.params(encoder_params, prompt), x,
      key, sigma=sigma, num_classes=C, n0=KW["n0"], n=KW["n"],
      batch_size=KW["batch_size"], outputs=("counts", "embeddings"))
  cert = certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"], n=KW["n"],
      sigma=sigma, alpha=KW["alpha"])[0]
  return cert, cached_ovc.embeddings_from_draws(draws)


def assert_identical(a, b):
  assert a.prediction == b.prediction
  assert a.radius == b.radius
  assert a.pA_lower == b.pA_lower
  np.testing.assert_array_equal(a.counts, b.counts)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_bit_for_bit_equal_to_standard_rs(sigma):
  encoder = make_params()
  prompts = make_prompts(0, 4)
  for i in range(3):
    x, key = make_input(i), jax.random.key(i)
    first_cert, cache = first_prompt_run(encoder, prompts[0], x, key, sigma)
    assert_identical(first_cert, standard.certify(
        CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]), x,
        key, smoothing(sigma), num_classes=C))
    for p in range(1, 4):
      reference = standard.certify(
          CLASSIFIER, CLASSIFIER.params(encoder, prompts[p]), x,
          key, smoothing(sigma), num_classes=C)
      for chunk in (128, 1000, 4096):
        assert_identical(
            cached_ovc.certify_cached(cache, prompts[p], sigma=sigma,
                                      alpha=KW["alpha"], batch_size=chunk),
            reference)


def test_abstentions_and_certificates_both_occur():
  """The bit-for-bit test covers both outcomes, not only easy cases."""
  encoder, prompts = make_params(), make_prompts(0, 4)
  preds = []
  for sigma in (0.12, 1.0):
    for i in range(3):
      _, cache = first_prompt_run(encoder, prompts[0], make_input(i),
                                  jax.random.key(i), sigma)
      preds += [c.prediction for c in cached_ovc.certify_cached_many(
          cache, prompts, sigma=sigma, alpha=KW["alpha"])]
  assert certificates.ABSTAIN in preds
  assert any(p != certificates.ABSTAIN for p in preds)


def test_many_prompts_in_one_pass():
  encoder, prompts = make_params(1), make_prompts(1, 5)
  x, key = make_input(4), jax.random.key(4)
  _, cache = first_prompt_run(encoder, prompts[0], x, key, 0.25)
  many = cached_ovc.certify_cached_many(cache, prompts, sigma=0.25,
                                        alpha=KW["alpha"])
  for p in range(5):
    assert_identical(many[p], cached_ovc.certify_cached(
        cache, prompts[p], sigma=0.25, alpha=KW["alpha"]))


def provenance(**overrides):
  fields = dict(model="mlp", weights="abc", preprocess={"image_size": 4},
                noise_space="normalized", sigma=0.25, n0=KW["n0"], n=KW["n"],
                key=caches.key_fingerprint(jax.random.key(0)), dtype="float32",
                input_sha256=caches.array_fingerprint(make_input(0)),
                num_classes=C)
  fields.update(overrides)
  return caches.Provenance(**fields)


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory):
  encoder, prompts = make_params(), make_prompts(0, 3)
  x, key = make_input(0), jax.random.key(0)
  cert, cache = first_prompt_run(encoder, prompts[0], x, key, 0.25)
  directory = str(tmp_path_factory.mktemp("cache") / "sigma_0.25" / "0")
  nbytes = caches.save_cache(directory, "embeddings", provenance(),
                             cache._asdict())
  return directory, cache, prompts, nbytes


def test_round_trip_through_disk_is_exact(saved_cache):
  directory, cache, prompts, nbytes = saved_cache
  assert nbytes == (KW["n0"] + KW["n"]) * E * 4
  loaded = caches.load_cache(directory, "embeddings", provenance())
  assert isinstance(loaded.arrays["estimation"], np.memmap)
  disk = cached_ovc.EmbeddingDraws(**loaded.arrays)
  for p in range(3):
    assert_identical(
        cached_ovc.certify_cached(disk, prompts[p], sigma=0.25),
        cached_ovc.certify_cached(cache, prompts[p], sigma=0.25))


@pytest.mark.parametrize("field, value", [
    ("model", "other-model"), ("weights", "def"), ("sigma", 0.5),
    ("n", 1000), ("n0", 100), ("noise_space", "pixel"),
    ("key", caches.key_fingerprint(jax.random.key(1))), ("dtype", "bfloat16"),
    ("preprocess", {"image_size": 8}), ("num_classes", 10),
    ("input_sha256", "0" * 64),
])
def test_refuses_a_cache_made_from_something_else(saved_cache, field, value):
  directory = saved_cache[0]
  with pytest.raises(CacheError, match=f"different {field}"):
    caches.load_cache(directory, "embeddings", provenance(**{field: value}))


def _copy(directory, tmp_path):
  import shutil
  target = str(tmp_path / "copy")
  shutil.copytree(directory, target)
  return target


def test_refuses_a_truncated_cache(saved_cache, tmp_path):
  target = _copy(saved_cache[0], tmp_path)
  path = os.path.join(target, "estimation.npy")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(CacheError, match="truncated or corrupted"):
    caches.load_cache(target, "embeddings", provenance())


def test_refuses_a_corrupted_cache(saved_cache, tmp_path):
  target = _copy(saved_cache[0], tmp_path)
  path = os.path.join(target, "estimation.npy")
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) - 7)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x40]))
  with pytest.raises(CacheError, match="CRC-32"):
    caches.load_cache(target, "embeddings", provenance())


def test_refuses_missing_or_garbled_metadata(saved_cache, tmp_path):
  target = _copy(saved_cache[0], tmp_path)
  with open(os.path.join(target, "metadata.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(CacheError, match="corrupted"):
    caches.load_cache(target, "embeddings", provenance())
  os.remove(os.path.join(target, "metadata.json"))
  with pytest.raises(CacheError, match="no metadata.json"):
    caches.load_cache(target, "embeddings", provenance())
  with pytest.raises(CacheError, match="no embeddings cache"):
    caches.load_cache(str(tmp_path / "absent"), "embeddings", provenance())


def test_refuses_wrong_kind(saved_cache):
  with pytest.raises(CacheError, match="holds 'embeddings'"):
    caches.load_cache(saved_cache[0], "gaussian", provenance())


def test_an_interrupted_write_leaves_nothing(tmp_path):
  class Boom(Exception):
    pass

  class Exploding:
    def __array__(self, *a, **k):
      raise Boom()

  target = str(tmp_path / "c")
  with pytest.raises(Boom):
    caches.save_cache(target, "embeddings", provenance(),
                      {"selection": np.zeros((2, 2)), "estimation": Exploding()})
  assert os.listdir(tmp_path) == []


def test_prompt_of_another_size_is_refused(saved_cache):
  cache = saved_cache[1]
  with pytest.raises(InputError, match="embedding size"):
    cached_ovc.certify_cached(cache, jnp.ones((C, E + 1)), sigma=0.25)


def _rewrite_metadata(directory, edit, *, recompute_checksum):
  import json
  path = os.path.join(directory, "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  if recompute_checksum:
    meta["checksum"] = caches.metadata_checksum(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


def test_refuses_edited_metadata(saved_cache, tmp_path):
  """The checksum covers the metadata: a cache made at sigma 0.25 whose
  metadata.json was edited to say 0.5 is refused, not used at 0.5."""
  target = _copy(saved_cache[0], tmp_path)
  _rewrite_metadata(target, lambda m: m["provenance"].update(sigma=0.5),
                    recompute_checksum=False)
  with pytest.raises(CacheError, match="does not match its checksum"):
    caches.load_cache(target, "embeddings", provenance(sigma=0.5))
  with pytest.raises(CacheError, match="does not match its checksum"):
    caches.load_embeddings(target, provenance(sigma=0.5))


def test_refuses_a_cache_of_another_format(saved_cache, tmp_path):
  target = _copy(saved_cache[0], tmp_path)

  def old(meta):
    meta["format_version"] = 1
    del meta["checksum"]

  _rewrite_metadata(target, old, recompute_checksum=False)
  with pytest.raises(CacheError, match="made by an older ovc_jax.*delete it"):
    caches.load_cache(target, "embeddings", provenance())
  _rewrite_metadata(target, lambda m: m.update(format_version=99),
                    recompute_checksum=False)
  with pytest.raises(CacheError, match="made by a newer ovc_jax"):
    caches.load_cache(target, "embeddings", provenance())


def test_refuses_arrays_that_do_not_fit_the_draws(saved_cache, tmp_path):
  target = _copy(saved_cache[0], tmp_path)
  _rewrite_metadata(target, lambda m: m["provenance"].update(n=1000),
                    recompute_checksum=True)
  with pytest.raises(CacheError, match="1000 draws"):
    caches.load_embeddings(target, provenance(n=1000))
