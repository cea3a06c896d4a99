"""On-disk caches of the OVC certifiers: what certifying earlier prompts leaves.

A cache is a directory holding `metadata.json` and one `.npy` file per array:

  embeddings   Cached-OVC: the embeddings of all n0 + n noisy samples of an
               input at one sigma (`selection` [n0, d], `estimation` [n, d]).
  gaussian     MVN-OVC: the mean [d] and a covariance factor [d, r] of them.
  known        Modified-IRS: each known prompt's first n_p estimation
               predictions, its selection predictions, cA and pA_lower.

Why not orbax: orbax cannot memory-map, and restoring a 205 MB embedding cache
(n = 100,000, d = 512) with orbax took 0.6-1.6 s here against 0.05 s for a
memory-mapped `.npy`; the load time is what bounds Cached-OVC's speedup. Orbax
keeps the model checkpoints. No cache ever uses pickle (`allow_pickle=False`).

The metadata records what the cache was made from (model name and weights
fingerprint, preprocessing, noise space, sigma, n0, n, the noise key, dtype, the
input's fingerprint, the dataset's class count) and a CRC-32, shape and dtype
per array, and a sha256 `checksum` over all of that (the canonical JSON of the
metadata without the checksum, which holds every array's CRC-32), so metadata
and arrays are bound together: an edited metadata.json is refused like a
corrupted array. `load_cache` refuses a cache whose provenance differs from
what the caller expects, naming the field, and a truncated or corrupted one. A
cache is written into a temporary directory and renamed into place, so a killed
run leaves either a whole cache or none.

A checksum cannot tell a cache whose metadata was rewritten consistently (or
written by a buggy caller) from a true one; for embedding caches
`ovc.verify_embedding_samples` can, by regenerating a few noisy samples.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers.cached_ovc import EmbeddingDraws
from ovc_jax.certifiers.modified_irs import KnownPrompts
from ovc_jax.certifiers.mvn_ovc import GaussianFit
from ovc_jax.classifiers import check_class_embeddings
from ovc_jax.errors import CacheError

# 2: the metadata carries a sha256 checksum over itself and the arrays' CRCs.
FORMAT_VERSION = 2
KINDS = ("embeddings", "gaussian", "known")
_METADATA = "metadata.json"


@dataclasses.dataclass(frozen=True)
class Provenance:
  """What a cache was made from; a cache is used only where all of it matches.

  Attributes:
    model: the model's name.
    weights: the fingerprint of its weights (sha256).
    preprocess: the preprocessing spec, as a dict.
    noise_space: "normalized" or "pixel".
    sigma: the noise level.
    n0: selection draws.
    n: estimation draws.
    key: the input's noise key data (list of uint32).
    dtype: the compute dtype of the encoder.
    input_sha256: fingerprint of the input image the noise was added to.
    num_classes: the class count of the dataset the cache belongs to.
  """

  model: str
  weights: str
  preprocess: Mapping[str, Any]
  noise_space: str
  sigma: float
  n0: int
  n: int
  key: tuple[int, ...]
  dtype: str
  input_sha256: str
  num_classes: int

  @classmethod
  def for_input(cls, model: Any, *, noise_space: str,
                smoothing: SmoothingParams, key: jax.Array, image: Any,
                dtype: str, num_classes: int) -> "Provenance":
    """The provenance of one input's caches; `model` has .name, .fingerprint
    and .preprocess (a `LoadedClip`, say)."""
    return cls(model=model.name, weights=model.fingerprint,
               preprocess=model.preprocess.to_dict(), noise_space=noise_space,
               sigma=float(smoothing.sigma), n0=smoothing.n0, n=smoothing.n,
               key=key_fingerprint(key), dtype=dtype,
               input_sha256=array_fingerprint(image), num_classes=num_classes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["preprocess"] = dict(self.preprocess)
    d["key"] = [int(v) for v in self.key]
    return d


def key_fingerprint(key: jax.Array) -> tuple[int, ...]:
  """The raw data of a JAX key, as a tuple of ints (JSON-friendly)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return tuple(int(v) for v in np.asarray(key).reshape(-1))


def array_fingerprint(x: Any) -> str:
  """sha256 of an array's dtype, shape and bytes."""
  arr = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
  h.update(memoryview(arr).cast("B"))
  return h.hexdigest()


def _crc32(arr: np.ndarray) -> int:
  return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"))


def metadata_checksum(metadata: Mapping[str, Any]) -> str:
  """sha256 of the canonical JSON of a cache's metadata without its
  "checksum" field (the arrays' CRC-32s are part of it)."""
  body = {k: v for k, v in metadata.items() if k != "checksum"}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"),
                    ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def save_cache(directory: str, kind: str, provenance: Provenance,
               arrays: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> int:
  """Writes a cache atomically; returns the bytes its arrays take.

  Args:
    directory: the cache directory (created; replaced if it exists).
    kind: one of KINDS.
    provenance: what it was made from.
    arrays: name -> array (host or device); each becomes `<name>.npy`.
    extra: JSON-serialisable metadata to keep beside (e.g. prompt names).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown cache kind {kind!r}")
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-cache-", dir=parent)
  try:
    entries, total = {}, 0
    for name, value in arrays.items():
      arr = np.ascontiguousarray(jax.device_get(value))
      _save_array(os.path.join(tmp, f"{name}.npy"), arr, directory)
      entries[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                       "crc32": _crc32(arr)}
      total += arr.nbytes
    metadata = {"format_version": FORMAT_VERSION, "kind": kind,
                "provenance": provenance.to_dict(), "arrays": entries,
                "extra": dict(extra or {}), "bytes": total}
    # Round-trip through JSON first, so the checksum is over what is read back.
    metadata = json.loads(json.dumps(metadata))
    metadata["checksum"] = metadata_checksum(metadata)
    with open(os.path.join(tmp, _METADATA), "w") as f:
      json.dump(metadata, f, indent=1)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return total


def _save_array(path: str, arr: np.ndarray, directory: str) -> None:
  """np.save, with a short write reported as the full disk it is.

  NumPy reports a short write as "N requested and M written", an OSError
  without errno; the file system only writes short when it is out of space
  (or quota).
  """
  try:
    np.save(path, arr, allow_pickle=False)
  except OSError as e:
    if e.errno is None and "requested and" in str(e):
      raise OSError(errno.ENOSPC,
                    f"{os.strerror(errno.ENOSPC)} (a short write: {e})",
                    directory) from e
    raise


@dataclasses.dataclass(frozen=True)
class Cache:
  """A loaded cache: its arrays (memory-mapped, read-only) and metadata."""

  directory: str
  kind: str
  provenance: dict[str, Any]
  arrays: dict[str, np.ndarray]
  extra: dict[str, Any]
  nbytes: int


def _fields_differ(found: Mapping[str, Any], expected: Mapping[str, Any]):
  for name, want in expected.items():
    have = found.get(name)
    if isinstance(want, float) or isinstance(have, float):
      same = have is not None and np.isclose(float(have), float(want),
                                             rtol=1e-9, atol=0)
    else:
      same = json.loads(json.dumps(have)) == json.loads(json.dumps(want))
    if not same:
      yield name, have, want


def load_cache(directory: str, kind: str,
               expected: Provenance | None = None,
               ignore: tuple[str, ...] = (),
               verify_checksums: bool = True) -> Cache:
  """Loads and checks a cache; raises CacheError naming what is wrong.

  Args:
    directory: the cache directory.
    kind: the kind expected.
    expected: the provenance the caller's certification would have; every
      field must match (except those named in `ignore`).
    ignore: provenance fields not to compare (e.g. "num_classes" for a cache
      whose arrays do not depend on the classes).
    verify_checksums: check each array's CRC-32 (reads every byte).
  """
  meta_path = os.path.join(directory, _METADATA)
  if not os.path.isdir(directory):
    raise CacheError(f"no {kind} cache at {directory}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise CacheError(f"cache {directory} has no {_METADATA}: not a cache, or "
                     "an interrupted write") from e
  except (OSError, json.JSONDecodeError) as e:
    raise CacheError(f"cache metadata {meta_path} is corrupted: {e}") from e
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if version != FORMAT_VERSION:
    if isinstance(version, int) and version < FORMAT_VERSION:
      raise CacheError(
          f"cache {directory} was made by an older ovc_jax (cache format "
          f"{version}; this one reads {FORMAT_VERSION}, whose checksum also "
          "covers the metadata); delete it and certify again to rebuild it")
    if isinstance(version, int):
      raise CacheError(
          f"cache {directory} was made by a newer ovc_jax (cache format "
          f"{version}; this one reads {FORMAT_VERSION}); update ovc_jax or "
          "delete the cache")
    raise CacheError(f"cache {directory} has no valid format version "
                     f"({version!r}): not an ovc_jax cache")
  if meta.get("checksum") != metadata_checksum(meta):
    raise CacheError(
        f"cache metadata {meta_path} does not match its checksum: it was "
        "edited or corrupted; delete the cache and certify again to rebuild it")
  if meta.get("kind") != kind:
    raise CacheError(f"cache {directory} holds {meta.get('kind')!r}, "
                     f"not {kind!r}")
  if expected is not None:
    want = {k: v for k, v in expected.to_dict().items() if k not in ignore}
    for name, have, wanted in _fields_differ(meta.get("provenance", {}), want):
      raise CacheError(
          f"cache {directory} was made with a different {name}: "
          f"{have!r} in the cache, {wanted!r} expected")
  arrays = {}
  for name, entry in meta.get("arrays", {}).items():
    path = os.path.join(directory, f"{name}.npy")
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
      raise CacheError(f"cache {directory} is missing {name}.npy") from e
    except (OSError, ValueError) as e:
      raise CacheError(f"cache file {path} is truncated or corrupted: {e}") from e
    if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
      raise CacheError(
          f"cache file {path} holds {arr.dtype.str}{list(arr.shape)}, "
          f"metadata says {entry['dtype']}{entry['shape']}")
    if verify_checksums and _crc32(arr) != entry["crc32"]:
      raise CacheError(f"cache file {path} is corrupted (CRC-32 mismatch)")
    arrays[name] = arr
  return Cache(directory, kind, meta["provenance"], arrays,
               meta.get("extra", {}), int(meta.get("bytes", 0)))


# The three kinds, typed: each pair below owns its kind's array names.


def save_embeddings(directory: str, draws: EmbeddingDraws,
                    provenance: Provenance) -> int:
  """Cached-OVC's cache: the embeddings of the n0 + n noisy samples."""
  return save_cache(directory, "embeddings", provenance,
                    {"selection": draws.selection,
                     "estimation": draws.estimation})


def load_embeddings(directory: str, expected: Provenance) -> EmbeddingDraws:
  """The embeddings, memory-mapped; raises CacheError if they do not fit.

  (To check them against the model too, see `ovc.verify_embedding_samples`.)
  """
  cache = load_cache(directory, "embeddings", expected)
  draws = EmbeddingDraws(cache.arrays["selection"], cache.arrays["estimation"])
  for name, arr, want in (("selection", draws.selection, expected.n0),
                          ("estimation", draws.estimation, expected.n)):
    if arr.ndim != 2 or arr.shape[0] != want:
      raise CacheError(f"cache {directory} holds {name} embeddings of shape "
                       f"{arr.shape}; {want} draws [{want}, d] expected")
  if draws.selection.shape[1] != draws.estimation.shape[1]:
    raise CacheError(f"cache {directory} holds selection and estimation "
                     "embeddings of different sizes")
  return draws


def save_gaussian(directory: str, fit: GaussianFit,
                  provenance: Provenance) -> int:
  """MVN-OVC's cache: mean and covariance factor of the embeddings."""
  return save_cache(directory, "gaussian", provenance,
                    {"mean": fit.mean, "factor": fit.factor})


def load_gaussian(directory: str, expected: Provenance) -> GaussianFit:
  cache = load_cache(directory, "gaussian", expected)
  return GaussianFit(jax.numpy.asarray(cache.arrays["mean"]),
                     jax.numpy.asarray(cache.arrays["factor"]))


def save_known(directory: str, known: KnownPrompts, provenance: Provenance, *,
               templates: list[str] | None = None, alpha: float) -> int:
  """Modified-IRS's cache: the known prompts' per-sample predictions, cA and
  pA_lower (their class matrices are not stored: the caller has them)."""
  num_classes = known.class_embeddings.shape[-2]
  label_dtype = np.int16 if num_classes < 2**15 else np.int32
  return save_cache(
      directory, "known", provenance,
      {"selection_predictions": np.asarray(known.selection_predictions,
                                           label_dtype),
       "estimation_predictions": np.asarray(known.estimation_predictions,
                                            label_dtype),
       "predictions": np.asarray(known.predictions, np.int32),
       "p_lower": np.asarray(known.p_lower, np.float64)},
      extra={"templates": list(templates) if templates is not None else None,
             "n_p": int(known.estimation_predictions.shape[0]),
             "alpha": float(alpha)})


def load_known(directory: str, expected: Provenance, class_embeddings: Any, *,
               templates: list[str] | None = None) -> KnownPrompts:
  """The known prompts' record; `class_embeddings` [P, C, d] are theirs."""
  cache = load_cache(directory, "known", expected)
  if templates is not None and cache.extra.get("templates") != list(templates):
    raise CacheError(f"known-prompt cache {directory} was made for other "
                     "known prompts than this run's")
  class_embeddings = np.asarray(jax.device_get(
      check_class_embeddings(class_embeddings, ndims=(3,))))
  if class_embeddings.shape[0] != cache.arrays["predictions"].shape[0]:
    raise CacheError(
        f"known-prompt cache {directory} holds "
        f"{cache.arrays['predictions'].shape[0]} prompts; "
        f"{class_embeddings.shape[0]} class matrices given")
  return KnownPrompts(
      selection_predictions=np.asarray(cache.arrays["selection_predictions"]),
      estimation_predictions=np.asarray(cache.arrays["estimation_predictions"]),
      predictions=np.asarray(cache.arrays["predictions"]),
      p_lower=np.asarray(cache.arrays["p_lower"]),
      class_embeddings=class_embeddings)
