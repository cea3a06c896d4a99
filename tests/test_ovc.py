"""The OVC pipeline: known prompts in one pass, novel prompts by four methods.

On a small linear encoder: the known prompts' certificates are standard RS's,
Cached-OVC through the pipeline is bit-identical to standard RS (from memory
and from disk), stale caches are refused, and every method runs through
NOVEL_CERTIFIERS.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import caches
from ovc_jax import certificates
from ovc_jax import ovc
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import modified_irs, standard
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.certifiers.mvn_ovc import MVNParams
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import CacheError, ConfigError

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


@pytest.mark.parametrize("field", ["sigma", "key"])
def test_regeneration_catches_consistently_rewritten_metadata(
    known, tmp_path, field):
  """A cache made at sigma 0.25 (or for another key) whose metadata says
  sigma 0.5 (or this key): the checksum holds, the provenance matches, and
  only regenerating samples from the key shows the arrays are not these."""
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
  ovc.save_caches(source, made.caches, made_prov, alpha=PARAMS.smoothing.alpha)
  claimed = _provenance().to_dict()[field]
  target = _rewritten_copy(ovc.StoredCaches(source, made_prov), tmp_path,
                           field, claimed)
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
