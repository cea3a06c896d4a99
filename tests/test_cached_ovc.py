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
        key, CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]),
        x, smoothing(sigma), num_classes=C))
    for p in range(1, 4):
      reference = standard.certify(
          key, CLASSIFIER, CLASSIFIER.params(encoder, prompts[p]),
          x, smoothing(sigma), num_classes=C)
      for chunk in (128, 1000, 4096):
        assert_identical(
            cached_ovc.certify_cached(cache, prompts[p], smoothing(sigma),
                                      cached_ovc.CachedParams(chunk)),
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
          cache, prompts, smoothing(sigma))]
  assert certificates.ABSTAIN in preds
  assert any(p != certificates.ABSTAIN for p in preds)


def test_many_prompts_in_one_pass():
  encoder, prompts = make_params(1), make_prompts(1, 5)
  x, key = make_input(4), jax.random.key(4)
  _, cache = first_prompt_run(encoder, prompts[0], x, key, 0.25)
  many = cached_ovc.certify_cached_many(cache, prompts, smoothing(0.25))
  for p in range(5):
    assert_identical(many[p], cached_ovc.certify_cached(
        cache, prompts[p], smoothing(0.25)))


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
        cached_ovc.certify_cached(disk, prompts[p], smoothing(0.25)),
        cached_ovc.certify_cached(cache, prompts[p], smoothing(0.25)))


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
    cached_ovc.certify_cached(cache, jnp.ones((C, E + 1)), smoothing(0.25))


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


# How the cache is read: every kind of input, chunking and read path gives
# the same counts, and those are standard RS's at realistic sizes too.


def _reference_counts(embeddings, prompts):
  """The histogram of predict_from_embeddings on chunks of 1000 rows (the
  way standard RS batches them), in numpy."""
  from ovc_jax.classifiers import predict_from_embeddings
  e = np.asarray(embeddings)
  preds = np.concatenate([np.asarray(predict_from_embeddings(
      jnp.asarray(e[i:i + 1000]), prompts)) for i in range(0, len(e), 1000)])
  c = prompts.shape[-2]
  return np.stack([np.bincount(p[p >= 0], minlength=c)
                   for p in preds.reshape(len(e), -1).T])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's rule")
@pytest.mark.parametrize("d, c", [(E, C), (512, 1000), (1024, 10)])
def test_row_bits_do_not_depend_on_the_chunk(d, c):
  """The rule Cached-OVC's chunking rests on: XLA on CPU gives a row of
  E U^T the same bits in every chunk of >= MIN_CHUNK_ROWS rows, wherever the
  row sits in it."""
  from ovc_jax.classifiers import prompt_logits
  rng = np.random.default_rng(d + c)
  e = rng.normal(size=(2100, d)).astype(np.float32)
  u = jnp.asarray(rng.normal(size=(c, d)), jnp.float32)
  logits = jax.jit(prompt_logits)
  reference = np.asarray(logits(jnp.asarray(e[:2048]), u))
  for rows in (cached_ovc.MIN_CHUNK_ROWS, 13, 100, 1000, 2048):
    got = np.concatenate([np.asarray(logits(jnp.asarray(e[i:i + rows]), u))
                          for i in range(0, 2048, rows)])[:2048]
    np.testing.assert_array_equal(got, reference, err_msg=f"{rows} rows")


@pytest.mark.parametrize("m, logits, batch", [
    (1, 10, None), (7, 10, None), (100, 10, None), (100_000, 10, None),
    (100_000, 1000, None), (100_000, 1000, 10_000), (100_000, 10, 10_000),
    (100_001, 1000, None), (50, 10, 3), (1500, 6, 128)])
def test_chunk_rows(m, logits, batch):
  rows = cached_ovc.chunk_rows(m, logits, batch)
  assert 1 <= rows <= m
  if m >= cached_ovc.MIN_CHUNK_ROWS:
    assert rows >= cached_ovc.MIN_CHUNK_ROWS
  if rows < m:
    assert rows % cached_ovc.MIN_CHUNK_ROWS == 0
    assert rows * 4 * logits <= 2 * cached_ovc.LOGITS_BYTES
    if batch is not None:
      assert rows < max(batch, cached_ovc.MIN_CHUNK_ROWS) + cached_ovc.MIN_CHUNK_ROWS
    # equal chunks: the last one is short by less than one rounding step each
    chunks = -(-m // rows)
    assert chunks * rows - m < cached_ovc.MIN_CHUNK_ROWS * chunks


def test_every_input_kind_and_batch_size_counts_the_same(tmp_path):
  rng = np.random.default_rng(7)
  e = rng.normal(size=(5003, 64)).astype(np.float32)
  e[[3, 4000]] = np.nan  # no class: counted for none
  prompts = jnp.asarray(rng.normal(size=(2, C, 64)), jnp.float32)
  reference = _reference_counts(e, prompts)
  np.save(tmp_path / "e.npy", e)
  buffer = np.empty(e.size + 1, np.float32)
  misaligned = buffer[1:].reshape(e.shape)  # 4 bytes off: cannot be aliased
  misaligned[:] = e
  kinds = {"jax": jnp.asarray(e), "numpy": np.array(e),
           "misaligned": misaligned,
           "strided": np.asfortranarray(e),
           "memmap": np.load(tmp_path / "e.npy", mmap_mode="r")}
  assert isinstance(kinds["memmap"], np.memmap)
  for name, rows in kinds.items():
    for batch in (None, 1, 8, 37, 1000, 10_000):
      got = cached_ovc.count_predictions(rows, prompts, batch_size=batch)
      np.testing.assert_array_equal(got, reference, err_msg=f"{name} {batch}")
  np.testing.assert_array_equal(
      cached_ovc.count_predictions(e, prompts[0]), reference[0])


def test_a_cold_memory_mapped_cache_counts_the_same(tmp_path):
  """A file larger than a read chunk: read ahead chunk by chunk (after its
  pages are dropped from the page cache where the system allows)."""
  import gc
  rng = np.random.default_rng(8)
  rows = 3 * cached_ovc.READ_BYTES // (128 * 4) + 5
  e = rng.normal(size=(rows, 128)).astype(np.float32)
  path = str(tmp_path / "big.npy")
  np.save(path, e)
  prompts = jnp.asarray(rng.normal(size=(3, 40, 128)), jnp.float32)
  reference = _reference_counts(e, prompts)
  del e
  gc.collect()
  if hasattr(os, "posix_fadvise"):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
  mapped = np.load(path, mmap_mode="r")
  np.testing.assert_array_equal(
      cached_ovc.count_predictions(mapped, prompts), reference)
  # A slice of the map (how the sequential certifier reads its blocks).
  np.testing.assert_array_equal(
      cached_ovc.count_predictions(mapped[1000:5000], prompts),
      _reference_counts(np.asarray(mapped[1000:5000]), prompts))


def test_device_path_counts_the_same():
  """Arrays the host cannot read in place (here: traced) are counted by a
  scan on the device, with the same result."""
  rng = np.random.default_rng(9)
  e = jnp.asarray(rng.normal(size=(3001, 16)), jnp.float32)
  prompts = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  reference = _reference_counts(e, prompts)
  for batch in (None, 100, 1000):
    traced = jax.jit(lambda x, u, b=batch: cached_ovc.count_predictions(
        x, u, batch_size=b))(e, prompts)
    np.testing.assert_array_equal(traced, reference)


def test_bit_for_bit_at_clip_sizes():
  """d = 512 and C = 1000 (ViT-B/32 on ImageNet): standard RS's chunks of
  256 rows against Cached-OVC's own chunks, from memory and from disk."""
  d, c = 512, 1000
  rng = np.random.default_rng(10)
  encoder = {"w1": jnp.asarray(rng.normal(size=(D, H)) / 2, jnp.float32),
             "b1": jnp.asarray(rng.normal(size=H) * 0.1, jnp.float32),
             "w2": jnp.asarray(rng.normal(size=(H, d)), jnp.float32)}
  prompts = rng.normal(size=(2, c, d))
  prompts = jnp.asarray(prompts / np.linalg.norm(prompts, axis=-1,
                                                 keepdims=True), jnp.float32)
  x, key, sigma = make_input(5), jax.random.key(5), 0.5
  s = SmoothingParams(sigma=sigma, n0=64, n=3000, alpha=0.001, batch_size=256)
  draws = sampler.sample_certification_draws(
      CLASSIFIER, CLASSIFIER.params(encoder, prompts[0]), x, key, sigma=sigma,
      num_classes=c, n0=s.n0, n=s.n, batch_size=s.batch_size,
      outputs=("embeddings",))
  cache = cached_ovc.embeddings_from_draws(draws)
  reference = standard.certify(
      key, CLASSIFIER, CLASSIFIER.params(encoder, prompts[1]), x, s,
      num_classes=c)
  assert len(np.unique(np.nonzero(reference.counts)[0])) > 1
  host = cached_ovc.EmbeddingDraws(np.asarray(cache.selection),
                                   np.asarray(cache.estimation))
  for draws_ in (cache, host):
    for batch in (None, 1000):
      assert_identical(cached_ovc.certify_cached(
          draws_, prompts[1], s, cached_ovc.CachedParams(batch)), reference)
