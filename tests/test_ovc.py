"""The OVC pipeline: known prompts in one pass, novel prompts by four methods.

On a small linear encoder: the known prompts' certificates are standard RS's,
Cached-OVC through the pipeline is bit-identical to standard RS (from memory
and from disk), stale caches are refused, and every method runs through
NOVEL_CERTIFIERS.
"""

import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import caches
from ovc_jax import certificates
from ovc_jax import ovc
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import cached_ovc, modified_irs, standard
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.certifiers.mvn_ovc import MVNParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import CacheError, ConfigError, OVCError

LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)
D, E, C, P = 8, 5, 4, 3  # input size, embedding size, classes, known prompts

PARAMS = ovc.OVCParams(
    SmoothingParams(sigma=0.5, n0=50, n=1000, alpha=0.001, batch_size=256),
    IRSParams(n_p=200), MVNParams(delta=0.0, batch_size=512),
    cached_batch_size=300)


def _encoder():
  rng = np.random.default_rng(0)
  return {"A": jnp.asarray(rng.normal(size=(E, D)), jnp.float32),
          "c": jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32)}


def _prompts(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


ENCODER = _encoder()
KNOWN_U = _prompts(1, (P, C, E))
NOVEL_U = _prompts(2, (4, C, E))  # four novel prompts
X = jnp.asarray(np.random.default_rng(3).normal(size=D), jnp.float32)
KEY = jax.random.key(7)


def _model():
  preprocess = types.SimpleNamespace(to_dict=lambda: {"image_size": 4})
  return types.SimpleNamespace(name="linear", fingerprint="f" * 64,
                               preprocess=preprocess)


def _provenance(smoothing=PARAMS.smoothing):
  return caches.Provenance.for_input(
      _model(), noise_space="normalized", smoothing=smoothing, key=KEY,
      image=X, dtype="float32", num_classes=C)


def assert_identical(a, b):
  assert a.prediction == b.prediction
  assert a.radius == b.radius
  assert a.pA_lower == b.pA_lower
  np.testing.assert_array_equal(a.counts, b.counts)


@pytest.fixture(scope="module")
def known():
  return ovc.certify_known_prompts(LINEAR, ENCODER, X, KEY, KNOWN_U, PARAMS)


@pytest.fixture(scope="module")
def standard_novel():
  """standard.certify of each novel prompt alone, with the input's key."""
  return [standard.certify(KEY, LINEAR, LINEAR.params(ENCODER, u), X,
                           PARAMS.smoothing) for u in NOVEL_U]


@pytest.fixture(scope="module")
def stored(known, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ovc") / "sigma_0.5" / "0")
  nbytes = ovc.save_caches(directory, known.caches, _provenance(),
                           alpha=PARAMS.smoothing.alpha,
                           templates=["a", "b", "c"])
  assert set(nbytes) == set(ovc.CACHE_KINDS)
  smoothing = PARAMS.smoothing
  assert nbytes["embeddings"] == (smoothing.n0 + smoothing.n) * E * 4
  return ovc.StoredCaches(directory, _provenance(),
                          known_class_embeddings=KNOWN_U,
                          templates=("a", "b", "c"))


def test_known_prompts_equal_standard_rs_alone(known):
  assert len(known.certificates) == P
  for p, cert in enumerate(known.certificates):
    alone = standard.certify(KEY, LINEAR, LINEAR.params(ENCODER, KNOWN_U[p]),
                             X, PARAMS.smoothing)
    assert_identical(cert, alone)
  smoothing = PARAMS.smoothing
  kp = known.caches.known_prompts
  assert kp.selection_predictions.shape == (smoothing.n0, P)
  assert kp.estimation_predictions.shape == (PARAMS.irs.n_p, P)
  assert known.caches.embedding_draws.selection.shape == (smoothing.n0, E)
  assert known.caches.embedding_draws.estimation.shape == (smoothing.n, E)


def test_cached_is_bit_identical_to_standard(known, standard_novel):
  preds = []
  for u, reference in zip(NOVEL_U, standard_novel):
    via_standard = ovc.certify_novel_prompt(
        "standard", LINEAR, ENCODER, X, KEY, known.caches, u, PARAMS)
    cached = ovc.certify_novel_prompt(
        "cached", LINEAR, ENCODER, X, KEY, known.caches, u, PARAMS)
    assert_identical(via_standard.certificate, reference)
    assert_identical(cached.certificate, reference)
    assert cached.method == "cached" and not cached.approximate
    assert cached.confidence == pytest.approx(1 - PARAMS.smoothing.alpha)
    preds.append(reference.prediction)
  # The comparison covers certified prompts, not only abstentions.
  assert any(p != certificates.ABSTAIN for p in preds), preds


def test_cached_from_disk_is_bit_identical_to_standard(stored, standard_novel):
  for u, reference in zip(NOVEL_U, standard_novel):
    cached = ovc.certify_novel_prompt(
        "cached", LINEAR, ENCODER, X, KEY, stored, u, PARAMS)
    assert_identical(cached.certificate, reference)


def test_disk_and_memory_caches_agree_for_every_method(known, stored):
  u = NOVEL_U[0]
  for method in ovc.METHODS:
    memory = ovc.certify_novel_prompt(method, LINEAR, ENCODER, X, KEY,
                                      known.caches, u, PARAMS)
    disk = ovc.certify_novel_prompt(method, LINEAR, ENCODER, X, KEY, stored,
                                    u, PARAMS)
    assert_identical(memory.certificate, disk.certificate)
    assert (memory.method, memory.approximate) == (disk.method,
                                                   disk.approximate)


def test_stored_caches_refuse_another_sigma(stored):
  other = dataclasses.replace(
      stored, provenance=_provenance(PARAMS.smoothing.replace(sigma=0.25)))
  with pytest.raises(CacheError, match="different sigma"):
    ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY, other,
                             NOVEL_U[0], PARAMS)
  for load in (other.load_embeddings, other.load_gaussian, other.load_known):
    with pytest.raises(CacheError, match="sigma"):
      load()


def test_irs_and_mvn_through_the_table(known):
  u = NOVEL_U[0]
  irs = ovc.certify_novel_prompt("irs", LINEAR, ENCODER, X, KEY, known.caches,
                                 u, PARAMS)
  assert isinstance(irs, ovc.NovelResult)
  assert irs.method == "irs" and irs.approximate is False
  assert isinstance(irs.irs, modified_irs.IRSResult)
  assert irs.confidence == irs.irs.confidence
  assert irs.certificate == irs.irs.certificate
  mvn = ovc.certify_novel_prompt("mvn", LINEAR, ENCODER, X, KEY, known.caches,
                                 u, PARAMS)
  assert isinstance(mvn, ovc.NovelResult)
  assert mvn.method == "mvn" and mvn.approximate is True
  assert mvn.confidence is None and mvn.irs is None
  assert int(np.sum(mvn.certificate.counts)) == PARAMS.smoothing.n
  assert set(ovc.NOVEL_CERTIFIERS) == {"standard", "irs", "cached", "mvn"}


def test_unknown_method(known):
  with pytest.raises(ConfigError, match="unknown method"):
    ovc.certify_novel_prompt("exact", LINEAR, ENCODER, X, KEY, known.caches,
                             NOVEL_U[0], PARAMS)


def test_verify_embedding_samples_accepts_the_true_cache(known, stored):
  draws = known.caches.embedding_draws
  picks = ovc.verify_embedding_samples(LINEAR, ENCODER, X, KEY, draws,
                                       PARAMS.smoothing, num_checks=6, seed=0)
  assert sorted(s for s, _ in picks) == ["estimation"] * 3 + ["selection"] * 3
  assert ovc.verify_embedding_samples(LINEAR, ENCODER, X, KEY, draws,
                                      PARAMS.smoothing, num_checks=0) == []
  checked = dataclasses.replace(stored, verify=ovc.NovelInput(
      LINEAR, ENCODER, X, KEY), verify_samples=8, verify_seed=1)
  np.testing.assert_array_equal(checked.load_embeddings().estimation,
                                draws.estimation)


def _rewritten_copy(stored, tmp_path, field, value):
  """A copy of the stored caches whose embedding metadata claims `field` =
  `value`, with the checksum recomputed to match (a consistent rewrite)."""
  import json
  import shutil
  target = str(tmp_path / "rewritten")
  shutil.copytree(stored.directory, target)
  path = f"{target}/embeddings/metadata.json"
  with open(path) as f:
    meta = json.load(f)
  meta["provenance"][field] = value
  meta["checksum"] = caches.metadata_checksum(meta)
  with open(path, "w") as f:
    json.dump(meta, f)
  return target


def _cache_claiming_this_input(tmp_path, field, cache_format):
  """Caches made at sigma 0.25 (field "sigma") or with another key ("key"),
  rewritten consistently to claim this input's sigma or key: only
  regenerating samples can tell. Returns the rewritten cache's directory."""
  if field == "sigma":
    smoothing, key = PARAMS.smoothing.replace(sigma=0.25), KEY
  else:
    smoothing, key = PARAMS.smoothing, jax.random.key(8)
  made = ovc.certify_known_prompts(
      LINEAR, ENCODER, X, key, KNOWN_U,
      dataclasses.replace(PARAMS, smoothing=smoothing))
  source = str(tmp_path / "made")
  made_prov = caches.Provenance.for_input(
      _model(), noise_space="normalized", smoothing=smoothing, key=key,
      image=X, dtype="float32", num_classes=C)
  ovc.save_caches(source, made.caches, made_prov, alpha=PARAMS.smoothing.alpha,
                  cache_format=cache_format)
  return _rewritten_copy(ovc.StoredCaches(source, made_prov), tmp_path,
                         field, _provenance().to_dict()[field])


@pytest.mark.parametrize("field", ["sigma", "key"])
def test_regeneration_catches_consistently_rewritten_metadata(
    known, tmp_path, field):
  """A cache made at sigma 0.25 (or for another key) whose metadata says
  sigma 0.5 (or this key): the checksum holds, the provenance matches, and
  only regenerating samples from the key shows the arrays are not these."""
  target = _cache_claiming_this_input(tmp_path, field, "float32")
  unchecked = ovc.StoredCaches(target, _provenance())
  # Without the check the stale embeddings are used, silently.
  wrong = ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY,
                                   unchecked, NOVEL_U[0], PARAMS)
  right = ovc.certify_novel_prompt("standard", LINEAR, ENCODER, X, KEY,
                                   unchecked, NOVEL_U[0], PARAMS)
  assert not np.array_equal(wrong.certificate.counts, right.certificate.counts)
  checked = dataclasses.replace(
      unchecked, verify=ovc.NovelInput(LINEAR, ENCODER, X, KEY))
  with pytest.raises(CacheError, match=r"(selection|estimation) sample \d+ "
                     r"differs from the one the model gives .* by [\d.e+-]+ "
                     r"\(max abs; tolerance 0.0001\)"):
    checked.load_embeddings()
  with pytest.raises(CacheError, match="sample"):
    ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY, checked,
                             NOVEL_U[0], PARAMS)
  # verify_samples=0 turns the check off.
  dataclasses.replace(checked, verify_samples=0).load_embeddings()


# Compressed embedding caches: storage.


def _rewrite_array(directory, name, arr, **meta_changes):
  """Replaces `name`.npy of a cache and rewrites its metadata to match
  (CRC-32 and checksum recomputed: only the consistency checks can tell)."""
  import json
  np.save(f"{directory}/{name}.npy", arr, allow_pickle=False)
  path = f"{directory}/metadata.json"
  with open(path) as f:
    meta = json.load(f)
  meta["arrays"][name] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                          "crc32": caches._crc32(arr)}  # pylint: disable=protected-access
  meta.update(meta_changes)
  meta["checksum"] = caches.metadata_checksum(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("fmt", ["float32", "int16", "int8"])
def test_embedding_cache_round_trip_per_format(known, tmp_path, fmt):
  from ovc_jax import cache_codec
  draws = known.caches.embedding_draws
  directory = str(tmp_path / "embeddings")
  nbytes = caches.save_embeddings(directory, draws, _provenance(), fmt)
  loaded = caches.load_embeddings(directory, _provenance())
  assert caches.read_metadata(directory)["format"] == fmt
  on_disk = sum(np.load(f"{directory}/{f}", mmap_mode="r").nbytes
                for f in os.listdir(directory) if f.endswith(".npy"))
  assert nbytes == on_disk == caches.load_cache(directory,
                                                "embeddings").nbytes
  for exact, rows in zip(draws, loaded):
    if fmt == "float32":
      assert isinstance(rows, np.memmap)
      np.testing.assert_array_equal(rows, np.asarray(exact))
      continue
    assert isinstance(rows, cache_codec.CompressedRows)
    assert rows.format == fmt and rows.shape == exact.shape
    assert all(isinstance(a, np.memmap) for a in rows)
    packed = cache_codec.encode_rows(np.asarray(exact), fmt)
    for a, b in zip(rows, packed):
      np.testing.assert_array_equal(a, b)
    caches.check_within_bounds(np.asarray(exact), rows, "round trip")
  m = PARAMS.smoothing.n0 + PARAMS.smoothing.n
  per_row = {"float32": 4 * E, "int16": 2 * E + 8, "int8": E + 8}[fmt]
  assert nbytes == m * per_row + (0 if fmt == "float32" else 2 * 4 * E)
  # And through save_caches / StoredCaches.
  target = str(tmp_path / "all")
  sizes = ovc.save_caches(target, known.caches, _provenance(),
                          alpha=PARAMS.smoothing.alpha, cache_format=fmt)
  assert sizes["embeddings"] == nbytes
  assert type(ovc.StoredCaches(target, _provenance()).load_embeddings()
              .estimation) is type(loaded.estimation)


def test_a_format_2_cache_still_loads_and_older_or_newer_are_refused(
    known, tmp_path):
  import json
  directory = str(tmp_path / "embeddings")
  caches.save_embeddings(directory, known.caches.embedding_draws,
                         _provenance())
  path = f"{directory}/metadata.json"
  with open(path) as f:
    meta = json.load(f)

  def write(version, **changes):
    old = {k: v for k, v in meta.items() if k not in ("checksum", "format")}
    old.update(format_version=version, **changes)
    old["checksum"] = caches.metadata_checksum(old)
    with open(path, "w") as f:
      json.dump(old, f)

  write(2)  # what an earlier release wrote: no "format" field
  draws = caches.load_embeddings(directory, _provenance())
  np.testing.assert_array_equal(draws.estimation,
                                known.caches.embedding_draws.estimation)
  assert caches.read_metadata(directory)["format"] == "float32"
  write(1)
  with pytest.raises(CacheError, match="older ovc_jax"):
    caches.load_embeddings(directory, _provenance())
  write(4)
  with pytest.raises(CacheError, match="newer ovc_jax"):
    caches.load_embeddings(directory, _provenance())
  write(3)  # version 3 without its format field
  with pytest.raises(CacheError, match="unknown storage format None"):
    caches.load_embeddings(directory, _provenance())


@pytest.mark.parametrize("damage, fragment", [
    ("negative_bound", "estimation_bound.npy holds the bound -1.0 for row 3"),
    ("nan_bound", "estimation_bound.npy holds the bound nan for row 3"),
    ("int16_codes", "selection_codes.npy holds int16"),
    ("short_scale", "estimation_scale.npy holds float32[999]"),
    ("inf_scale", "selection_scale.npy holds a negative or infinite step"),
    ("missing_array", "a int8 embedding cache holds"),
    ("format_name", "unknown storage format 'int4'"),
    ("crc", "estimation_codes.npy is corrupted (CRC-32 mismatch)"),
])
def test_an_inconsistent_compressed_cache_is_refused(known, tmp_path, damage,
                                                     fragment):
  import json
  directory = str(tmp_path / "embeddings")
  caches.save_embeddings(directory, known.caches.embedding_draws,
                         _provenance(), "int8")
  load = lambda name: np.array(np.load(f"{directory}/{name}.npy"))
  if damage in ("negative_bound", "nan_bound"):
    bound = load("estimation_bound")
    bound[3] = -1.0 if damage == "negative_bound" else np.nan
    _rewrite_array(directory, "estimation_bound", bound)
  elif damage == "int16_codes":
    _rewrite_array(directory, "selection_codes",
                   load("selection_codes").astype(np.int16))
  elif damage == "short_scale":
    _rewrite_array(directory, "estimation_scale", load("estimation_scale")[1:])
  elif damage == "inf_scale":
    scale = load("selection_scale")
    scale[0] = np.inf
    _rewrite_array(directory, "selection_scale", scale)
  elif damage == "missing_array":
    with open(f"{directory}/metadata.json") as f:
      meta = json.load(f)
    del meta["arrays"]["selection_mean"]
    meta["checksum"] = caches.metadata_checksum(meta)
    with open(f"{directory}/metadata.json", "w") as f:
      json.dump(meta, f)
  elif damage == "format_name":
    _rewrite_array(directory, "selection_mean", load("selection_mean"),
                   format="int4")
  else:
    codes = np.load(f"{directory}/estimation_codes.npy", mmap_mode="r+")
    codes[0, 0] = codes[0, 0] + 1
    codes.flush()
    del codes
  with pytest.raises(CacheError) as e:
    caches.load_embeddings(directory, _provenance())
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_compressed_rows_cannot_be_written_in_another_format(known, tmp_path):
  draws = known.caches.embedding_draws
  packed = cached_ovc.compress_draws(draws, "int8")
  directory = str(tmp_path / "e")
  caches.save_embeddings(directory, packed, _provenance(), "int8")
  for fmt in ("float32", "int16"):
    with pytest.raises(ConfigError, match=f"stored as int8 and cannot be "
                       f"written as {fmt}"):
      caches.save_embeddings(directory, packed, _provenance(), fmt)
  with pytest.raises(OVCError, match="unknown cache format 'int4'"):
    caches.save_embeddings(directory, draws, _provenance(), "int4")
  assert caches.read_metadata(directory)["format"] == "int8"


# Compressed embedding caches through the pipeline.


def _near_tie(u, eps=1e-4):
  """A class matrix whose classes 0 and 1 nearly tie everywhere: most decoded
  samples are ambiguous between them."""
  u = np.array(u)
  u[1] = u[0] + eps * np.random.default_rng(5).normal(size=u.shape[1])
  return jnp.asarray(u, jnp.float32)


@pytest.fixture(scope="module")
def compressed(known, tmp_path_factory):
  """{format: StoredCaches} of the known pass's caches in each format."""
  out = {}
  for fmt in ("float32", "int16", "int8"):
    directory = str(tmp_path_factory.mktemp(fmt) / "sigma_0.5" / "0")
    ovc.save_caches(directory, known.caches, _provenance(),
                    alpha=PARAMS.smoothing.alpha, cache_format=fmt)
    out[fmt] = ovc.StoredCaches(directory, _provenance())
  return out


def test_compressed_caches_with_regenerate_equal_float32_field_for_field(
    compressed, standard_novel):
  ties = [_near_tie(NOVEL_U[0]), _near_tie(NOVEL_U[1], eps=1e-6)]
  prompts = list(NOVEL_U) + ties
  references = standard_novel + [standard.certify(
      KEY, LINEAR, LINEAR.params(ENCODER, u), X, PARAMS.smoothing)
                                 for u in ties]
  seen = {}
  for u, reference in zip(prompts, references):
    exact = ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY,
                                     compressed["float32"], u, PARAMS)
    assert_identical(exact.certificate, reference)
    assert exact.certificate.ambiguous == exact.certificate.regenerated == 0
    for fmt in ("int16", "int8"):
      got = ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY,
                                     compressed[fmt], u, PARAMS).certificate
      assert_identical(got, reference)  # prediction, radius, pA_lower, counts
      assert got.regenerated == got.ambiguous
      seen[fmt] = seen.get(fmt, 0) + got.ambiguous
  # The near ties leave samples in doubt, and they were recomputed.
  assert seen["int8"] > 0 and seen["int16"] > 0, seen


def test_conservative_mode_never_certifies_a_larger_radius(compressed,
                                                           standard_novel):
  conservative = dataclasses.replace(PARAMS, cached_ambiguous="conservative")
  prompts = list(NOVEL_U) + [_near_tie(NOVEL_U[0]),
                             _near_tie(NOVEL_U[1], eps=1e-6)]
  ambiguous = 0
  for u in prompts:
    exact = ovc.certify_novel_prompt("standard", LINEAR, ENCODER, X, KEY,
                                     compressed["float32"], u,
                                     PARAMS).certificate
    for fmt in ("int16", "int8"):
      got = ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY,
                                     compressed[fmt], u,
                                     conservative).certificate
      ambiguous += got.ambiguous
      assert got.regenerated == 0
      assert got.radius <= exact.radius
      assert got.prediction in (exact.prediction, certificates.ABSTAIN)
  assert ambiguous > 0  # the near ties were counted conservatively
  # A float32 cache in conservative mode is exact.
  for u, reference in zip(NOVEL_U, standard_novel):
    got = ovc.certify_novel_prompt("cached", LINEAR, ENCODER, X, KEY,
                                   compressed["float32"], u, conservative)
    assert_identical(got.certificate, reference)


def test_cached_ambiguous_is_checked():
  with pytest.raises(ConfigError, match="cached_ambiguous must be one of "
                     r"\('regenerate', 'conservative'\); got 'exact'"):
    dataclasses.replace(PARAMS, cached_ambiguous="exact")
  with pytest.raises(OVCError, match="unknown cache format 'int4'"):
    ovc.save_caches("/nonexistent", None, _provenance(), alpha=0.001,
                    cache_format="int4")


def test_verify_accepts_a_true_compressed_cache(known, compressed):
  for fmt in ("int16", "int8"):
    checked = dataclasses.replace(compressed[fmt], verify=ovc.NovelInput(
        LINEAR, ENCODER, X, KEY), verify_samples=16, verify_seed=2)
    draws = checked.load_embeddings()
    assert ovc.is_compressed(draws)


@pytest.mark.parametrize("field", ["sigma", "key"])
def test_verify_catches_a_compressed_cache_of_another_sigma_or_key(
    tmp_path, field):
  target = _cache_claiming_this_input(tmp_path, field, "int8")
  checked = ovc.StoredCaches(target, _provenance(), verify=ovc.NovelInput(
      LINEAR, ENCODER, X, KEY))
  with pytest.raises(CacheError, match=r"(selection|estimation) sample \d+ "
                     r"decodes [\d.e+-]+ \(L2\) away from the one the model "
                     r"gives .* beyond its bound"):
    checked.load_embeddings()
