"""On-disk caches of the OVC certifiers: what certifying earlier prompts leaves.

A cache is a directory holding `metadata.json` and one `.npy` file per array:

  embeddings   Cached-OVC: the embeddings of all n0 + n noisy samples of an
               input at one sigma, in one of `cache_codec.FORMATS`: float32
               (`selection` [n0, d], `estimation` [n, d], the exact rows) or
               int16 / int8 (per stream the `cache_codec.CompressedRows`
               arrays `<stream>_mean` [d], `_scale` [m], `_codes` [m, d] and
               `_bound` [m]: every row quantised, with a bound on its error).
  gaussian     MVN-OVC: the mean [d] and a covariance factor [d, r] of them.
  known        Modified-IRS: each known prompt's first n_p estimation
               predictions, its selection predictions, cA and pA_lower.

Why not orbax: orbax cannot memory-map, and restoring a 205 MB embedding cache
(n = 100,000, d = 512) with orbax took 0.6-1.6 s here against 0.05 s for a
memory-mapped `.npy`; the load time is what bounds Cached-OVC's speedup. Orbax
keeps the model checkpoints. No cache ever uses pickle (`allow_pickle=False`).

The metadata records what the cache was made from (model name and weights
fingerprint, preprocessing, noise space, sigma, n0, n, the noise key, dtype, the
input's fingerprint, the dataset's class count), its storage format (float32
for the gaussian and known kinds) and a CRC-32, shape and dtype per array, and a sha256 `checksum` over all of that (the canonical JSON of the
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

import ctypes
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

from ovc_jax import cache_codec
from ovc_jax.cache_codec import CompressedRows
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers.cached_ovc import EmbeddingDraws
from ovc_jax.certifiers.modified_irs import KnownPrompts
from ovc_jax.certifiers.mvn_ovc import GaussianFit
from ovc_jax.classifiers import check_class_embeddings
from ovc_jax.errors import CacheError, ConfigError

# 2: the metadata carries a sha256 checksum over itself and the arrays' CRCs.
# 3: and the storage format ("format"): embeddings may be int16 or int8.
FORMAT_VERSION = 3
# Versions read as they are: a version-2 cache has version 3's layout, in
# float32 (the only format there was).
READABLE_VERSIONS = (2, 3)
KINDS = ("embeddings", "gaussian", "known")
_METADATA = "metadata.json"
# The arrays of one stream of a compressed embedding cache, in the order of
# `cache_codec.CompressedRows`'s fields.
COMPRESSED_PARTS = cache_codec.CompressedRows._fields
STREAMS = ("selection", "estimation")


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
               extra: Mapping[str, Any] | None = None,
               fmt: str = "float32") -> int:
  """Writes a cache atomically; returns the bytes its arrays take.

  Args:
    directory: the cache directory (created; replaced if it exists).
    kind: one of KINDS.
    provenance: what it was made from.
    arrays: name -> array (host or device); each becomes `<name>.npy`.
    extra: JSON-serialisable metadata to keep beside (e.g. prompt names).
    fmt: the storage format recorded (one of `cache_codec.FORMATS`).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown cache kind {kind!r}")
  tmp, total = write_cache_beside(directory, kind, provenance, arrays, extra,
                                  fmt)
  try:
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return total


TMP_PREFIX = ".tmp-cache-"


def write_cache_beside(directory: str, kind: str, provenance: Provenance,
                       arrays: Mapping[str, Any],
                       extra: Mapping[str, Any] | None = None,
                       fmt: str = "float32") -> tuple[str, int]:
  """Writes a whole cache into a new temporary folder beside `directory`
  (same parent, so that it can be renamed into place); returns its path and
  the bytes its arrays take. Nothing is left behind if writing fails."""
  cache_codec.check_format(fmt)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent)
  try:
    entries, total = {}, 0
    for name, value in arrays.items():
      arr = np.ascontiguousarray(jax.device_get(value))
      _save_array(os.path.join(tmp, f"{name}.npy"), arr, directory)
      entries[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str,
                       "crc32": _crc32(arr)}
      total += arr.nbytes
    metadata = {"format_version": FORMAT_VERSION, "kind": kind,
                "format": fmt, "provenance": _provenance_dict(provenance),
                "arrays": entries, "extra": dict(extra or {}), "bytes": total}
    # Round-trip through JSON first, so the checksum is over what is read back.
    metadata = json.loads(json.dumps(metadata))
    metadata["checksum"] = metadata_checksum(metadata)
    with open(os.path.join(tmp, _METADATA), "w") as f:
      json.dump(metadata, f, indent=1)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return tmp, total


def _provenance_dict(provenance: Provenance | Mapping[str, Any]):
  return (provenance.to_dict() if isinstance(provenance, Provenance)
          else dict(provenance))


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
  format: str = "float32"


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


def read_metadata(directory: str, kind: str | None = None) -> dict[str, Any]:
  """A cache's metadata, checked (version, checksum, kind); reads no array.

  A version-2 cache (float32 by construction) is read as format float32.

  Raises:
    CacheError: no cache there, an older or newer format, a metadata file
      that was edited or corrupted, or another kind than `kind`.
  """
  what = f"{kind} cache" if kind else "cache"
  meta_path = os.path.join(directory, _METADATA)
  if not os.path.isdir(directory):
    raise CacheError(f"no {what} at {directory}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise CacheError(f"cache {directory} has no {_METADATA}: not a cache, or "
                     "an interrupted write") from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CacheError(f"cache metadata {meta_path} is corrupted: {e}") from e
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if version not in READABLE_VERSIONS or isinstance(version, bool):
    if isinstance(version, int) and version < min(READABLE_VERSIONS):
      raise CacheError(
          f"cache {directory} was made by an older ovc_jax (cache format "
          f"{version}; this one reads {READABLE_VERSIONS[0]} to "
          f"{FORMAT_VERSION}, whose checksum also covers the metadata); "
          "delete it and certify again to rebuild it")
    if isinstance(version, int):
      raise CacheError(
          f"cache {directory} was made by a newer ovc_jax (cache format "
          f"{version}; this one reads {READABLE_VERSIONS[0]} to "
          f"{FORMAT_VERSION}); update ovc_jax or delete the cache")
    raise CacheError(f"cache {directory} has no valid format version "
                     f"({version!r}): not an ovc_jax cache")
  if meta.get("checksum") != metadata_checksum(meta):
    raise CacheError(
        f"cache metadata {meta_path} does not match its checksum: it was "
        "edited or corrupted; delete the cache and certify again to rebuild it")
  if kind is not None and meta.get("kind") != kind:
    raise CacheError(f"cache {directory} holds {meta.get('kind')!r}, "
                     f"not {kind!r}")
  if meta.get("kind") not in KINDS:
    raise CacheError(f"cache {directory} holds an unknown kind "
                     f"{meta.get('kind')!r}")
  fmt = meta.get("format", "float32") if version == 2 else meta.get("format")
  if fmt not in cache_codec.FORMATS or (
      fmt != "float32" and meta["kind"] != "embeddings"):
    raise CacheError(f"cache {directory} records an unknown storage format "
                     f"{fmt!r} for a {meta.get('kind')} cache")
  meta["format"] = fmt
  return meta


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
  meta = read_metadata(directory, kind)
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
               meta.get("extra", {}), int(meta.get("bytes", 0)),
               meta["format"])


# The three kinds, typed: each pair below owns its kind's array names.


def embedding_arrays(draws: EmbeddingDraws, fmt: str = "float32"
                     ) -> dict[str, Any]:
  """The arrays of an embedding cache in format `fmt`, by file name.

  float32 rows are encoded (`cache_codec.encode_rows`) when `fmt` is a
  compressed format; rows already compressed (`CompressedRows`) are kept as
  they are and must be in `fmt` (a compressed cache cannot become exact).
  """
  cache_codec.check_format(fmt)
  arrays = {}
  for stream, rows in zip(STREAMS, draws):
    if isinstance(rows, CompressedRows):
      if rows.format != fmt:
        raise ConfigError(f"the {stream} embeddings are stored as "
                          f"{rows.format} and cannot be written as {fmt}")
      arrays.update({f"{stream}_{part}": value
                     for part, value in zip(COMPRESSED_PARTS, rows)})
    elif fmt == "float32":
      arrays[stream] = rows
    else:
      rows = np.asarray(jax.device_get(rows))
      packed = cache_codec.encode_rows(rows, fmt)
      arrays.update({f"{stream}_{part}": value
                     for part, value in zip(COMPRESSED_PARTS, packed)})
  return arrays


def save_embeddings(directory: str, draws: EmbeddingDraws,
                    provenance: Provenance, fmt: str = "float32") -> int:
  """Cached-OVC's cache: the embeddings of the n0 + n noisy samples, in
  format `fmt` (one of `cache_codec.FORMATS`); returns the bytes its arrays
  take."""
  return save_cache(directory, "embeddings", provenance,
                    embedding_arrays(draws, fmt), fmt=fmt)


def embeddings_of(cache: Cache) -> EmbeddingDraws:
  """A loaded embedding cache's rows: float32 arrays, or `CompressedRows` of
  the memory-mapped arrays, checked to be consistent (CacheError naming the
  file otherwise)."""
  if cache.format == "float32":
    names = set(STREAMS)
  else:
    names = {f"{s}_{p}" for s in STREAMS for p in COMPRESSED_PARTS}
  if set(cache.arrays) != names:
    raise CacheError(f"cache {cache.directory} holds the arrays "
                     f"{sorted(cache.arrays)}; a {cache.format} embedding "
                     f"cache holds {sorted(names)}")
  if cache.format == "float32":
    for stream in STREAMS:
      rows = cache.arrays[stream]
      if rows.dtype != np.float32:
        raise CacheError(f"cache file {_file(cache, stream)} holds "
                         f"{rows.dtype} embeddings; float32 expected")
    return EmbeddingDraws(*(cache.arrays[s] for s in STREAMS))
  return EmbeddingDraws(*(_compressed(cache, s) for s in STREAMS))


def _file(cache: Cache, name: str) -> str:
  return os.path.join(cache.directory, f"{name}.npy")


def _compressed(cache: Cache, stream: str) -> CompressedRows:
  """One stream's CompressedRows, every array checked against the others."""
  rows = CompressedRows(*(cache.arrays[f"{stream}_{p}"]
                          for p in COMPRESSED_PARTS))
  name = lambda part: _file(cache, f"{stream}_{part}")
  code_dtype = np.dtype(cache_codec.CODE_DTYPES[cache.format])
  if rows.codes.ndim != 2 or rows.codes.dtype != code_dtype:
    raise CacheError(f"cache file {name('codes')} holds {rows.codes.dtype}"
                     f"{list(rows.codes.shape)}; a {cache.format} cache holds "
                     f"{code_dtype} codes [m, d]")
  m, d = rows.codes.shape
  for part, shape in (("mean", (d,)), ("scale", (m,)), ("bound", (m,))):
    arr = getattr(rows, part)
    if arr.dtype != np.float32 or arr.shape != shape:
      raise CacheError(f"cache file {name(part)} holds {arr.dtype}"
                       f"{list(arr.shape)}; float32{list(shape)} expected with "
                       f"codes [{m}, {d}]")
  if not np.all(np.isfinite(rows.mean)):
    raise CacheError(f"cache file {name('mean')} holds non-finite numbers: "
                     "the cache is corrupted")
  scale, bound = np.asarray(rows.scale), np.asarray(rows.bound)
  if np.any(np.isinf(scale)) or np.any(scale < 0):
    raise CacheError(f"cache file {name('scale')} holds a negative or infinite "
                     "step: the cache is corrupted")
  finite = np.isfinite(scale)
  with np.errstate(invalid="ignore"):
    bad = finite & ~(np.isfinite(bound) & (bound >= 0))
  if np.any(bad):
    i = int(np.flatnonzero(bad)[0])
    raise CacheError(f"cache file {name('bound')} holds the bound "
                     f"{float(bound[i])!r} for row {i}: a bound must be finite "
                     "and >= 0; the cache is corrupted")
  return rows


def load_embeddings(directory: str, expected: Provenance) -> EmbeddingDraws:
  """The embeddings, memory-mapped (float32 arrays, or `CompressedRows` of
  memory-mapped arrays for an int16 or int8 cache); raises CacheError if they
  do not fit.

  (To check them against the model too, see `ovc.verify_embedding_samples`.)
  """
  draws = embeddings_of(load_cache(directory, "embeddings", expected))
  for name, arr, want in (("selection", draws.selection, expected.n0),
                          ("estimation", draws.estimation, expected.n)):
    if len(arr.shape) != 2 or arr.shape[0] != want:
      raise CacheError(f"cache {directory} holds {name} embeddings of shape "
                       f"{tuple(arr.shape)}; {want} draws [{want}, d] expected")
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


# Converting an embedding cache in place: write the new one beside, read it
# back and check it, then swap the two folders in one step.

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Where a swap that cannot be made in one step keeps the old cache between
# its two renames (see `replace_directory`).
OLD_SUFFIX = ".old-cache"


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False
  where the system or the file system cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint)
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP,
             errno.EXDEV):
    return False
  raise OSError(err, os.strerror(err), b)


def replace_directory(new: str, target: str) -> None:
  """Puts folder `new` at `target` and removes the folder that was there.

  On Linux file systems that support it the two are swapped in one step, so
  a kill at any moment leaves `target` holding the old folder or the new one,
  whole (and the other beside it, which `recover_interrupted` removes).
  Elsewhere the old folder is first renamed to `target + OLD_SUFFIX`; a kill
  between that and the second rename leaves both whole and `target` missing,
  which `recover_interrupted` repairs (the old folder goes back).
  """
  if _exchange(new, target):
    shutil.rmtree(new)
    return
  old = target + OLD_SUFFIX
  if os.path.exists(old):
    shutil.rmtree(old)
  os.rename(target, old)
  try:
    os.rename(new, target)
  except BaseException:
    os.rename(old, target)
    raise
  shutil.rmtree(old)


def recover_interrupted(parent: str) -> list[str]:
  """Repairs what a killed write or conversion left in folder `parent`:
  temporary folders (`TMP_PREFIX`) go, and an old cache parked at
  `NAME + OLD_SUFFIX` goes back to NAME if NAME is missing, else goes.
  Returns what it removed or restored. Only for a folder no other process
  writes (the caller holds the workdir's lock)."""
  done = []
  try:
    names = sorted(os.listdir(parent))
  except FileNotFoundError:
    return done
  for name in names:
    path = os.path.join(parent, name)
    if name.startswith(TMP_PREFIX):
      shutil.rmtree(path, ignore_errors=True)
      done.append(f"removed {path}")
    elif name.endswith(OLD_SUFFIX):
      target = path[:-len(OLD_SUFFIX)]
      if os.path.exists(os.path.join(target, _METADATA)):
        shutil.rmtree(path)
        done.append(f"removed {path}")
      else:
        if os.path.exists(target):
          shutil.rmtree(target)
        os.rename(path, target)
        done.append(f"restored {target}")
  return done


def check_within_bounds(exact: Any, packed: CompressedRows, name: str,
                        rows_at_once: int = 4096) -> None:
  """Raises CacheError unless every decoded row of `packed` lies within its
  bound of the float32 row of `exact` it was made from (non-finite rows:
  NaN step)."""
  m = int(np.shape(exact)[0])
  if tuple(packed.shape) != tuple(np.shape(exact)):
    raise CacheError(f"{name} holds rows {tuple(packed.shape)}; "
                     f"{tuple(np.shape(exact))} expected")
  for start in range(0, m, rows_at_once):
    stop = min(start + rows_at_once, m)
    rows = np.asarray(exact[start:stop], np.float64)
    finite = np.all(np.isfinite(rows), axis=1)
    scale = np.asarray(packed.scale[start:stop])
    decoded = cache_codec.decode_rows(packed, start, stop).astype(np.float64)
    with np.errstate(invalid="ignore"):
      err = np.linalg.norm(rows - decoded, axis=1)
      bound = np.asarray(packed.bound[start:stop], np.float64)
      bad = np.where(finite, ~(err <= bound), ~np.isnan(scale))
    if np.any(bad):
      i = int(np.flatnonzero(bad)[0])
      raise CacheError(
          f"{name}: row {start + i} decodes {err[i]:.3g} away from the "
          f"exact row, beyond its bound {bound[i]:.3g}")


def convert_embeddings(directory: str, fmt: str) -> tuple[int, int]:
  """Converts a float32 embedding cache to `fmt` (int16 or int8) in place.

  The new cache is written beside the old one, read back (checksums) and
  checked to decode within its bounds of the old rows; only then does it
  replace the old one (`replace_directory`). A failure at any point leaves
  the old cache as it was and nothing beside it. Returns (bytes before,
  bytes after) of the arrays.

  Raises:
    CacheError: the cache is not a float32 embedding cache, is corrupted,
      or the new one does not read back within its bounds.
    OSError: writing failed (a full disk, say).
  """
  if fmt not in cache_codec.CODE_DTYPES:
    raise ConfigError(f"cannot convert to {fmt!r}; choose "
                      f"{' or '.join(cache_codec.CODE_DTYPES)}")
  cache = load_cache(directory, "embeddings")
  if cache.format != "float32":
    raise CacheError(f"cache {directory} is {cache.format} already; only a "
                     "float32 cache is converted")
  exact = embeddings_of(cache)
  tmp, total = write_cache_beside(directory, "embeddings", cache.provenance,
                                  embedding_arrays(exact, fmt), cache.extra,
                                  fmt)
  try:
    written = load_cache(tmp, "embeddings")
    if written.format != fmt or written.provenance != cache.provenance:
      raise CacheError(f"the {fmt} cache written beside {directory} does not "
                       "read back as written")
    for stream, rows, packed in zip(STREAMS, exact, embeddings_of(written)):
      check_within_bounds(rows, packed,
                          f"the {fmt} cache written beside {directory} "
                          f"({stream})")
    replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return cache.nbytes, total
