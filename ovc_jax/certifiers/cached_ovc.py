"""Cached-OVC (paper Alg. 3): certify a new prompt from cached noisy embeddings.

The image embeddings of an input's noisy samples do not depend on the prompt.
Certifying the first prompt with the standard certifier keeps them: the
selection embeddings E0 [n0, d] and the estimation embeddings E [n, d], drawn
with the input's key. A new prompt with class matrix U* is then certified with
no image-encoder pass at all:

  counts0 = bincount(argmax(E0 U*^T)),  counts = bincount(argmax(E U*^T))

followed by CERTIFY's last lines. Predictions come from the same
`predict_from_embeddings` on the same embedding bits as in standard RS, so the
certificate is identical to standard RS with the same key: same prediction,
same counts, same radius. Unlike the paper's pseudocode, the selection counts
come from their own n0 draws, disjoint from the n estimation draws, as Cohen
et al.'s theorem requires.

How the cache is read (it is the whole cost: one pass over (n0 + n) d floats,
205 MB at n = 100,000, d = 512):

  * The rows are counted in fixed-size chunks by one compiled program per
    chunk shape (`predict_from_embeddings`, then a segment-sum histogram; no
    one-hot). A chunk's logits are kept to about `LOGITS_BYTES`, so at large C
    they stay in cache while its argmax is taken; at small C a chunk is the
    whole array.
  * Host rows are not copied: a numpy array and a jax array on the CPU reach
    the compiled program as zero-copy views of their 64-byte-aligned rows
    (`jax.device_put(..., may_alias=True)`), so both are read at memory
    speed. Rows that are not aligned or not contiguous (a fresh numpy array
    is 16-byte aligned) are copied one chunk (`COPY_BYTES`) at a time into
    reused aligned buffers, the copy of one chunk overlapping the counting of
    the one before; a ragged last chunk is padded (the padding masked).
  * A memory-mapped `.npy` (what `caches.load_embeddings` returns) is read in
    chunks of `READ_BYTES`, each mapped in place with no copy; a helper
    thread faults the next chunks in (`madvise(MADV_POPULATE_READ)`, large
    sequential reads where the page cache does not hold them) while the
    chunks before are counted, so a cold cache is read at about the disk's
    sequential speed, with the counting overlapped.
  * Arrays on an accelerator (or traced) are counted by a `lax.scan` on the
    device instead.

Bits: XLA on CPU gives a row of E U^T the same bits in every chunk of at least
`MIN_CHUNK_ROWS` rows, wherever the row sits in it; a chunk of fewer rows
(one row, say) can take another kernel with other rounding. So chunks here
are never smaller than that, and a certificate is bit-for-bit standard RS's
whenever standard RS ran in batches of at least `MIN_CHUNK_ROWS`
(tests/test_cached_ovc.py checks the rule and the equality, at the test
sizes and at d = 512, C = 1000). On an accelerator, whose kernels may depend
on the shape, pass the standard run's batch size as `batch_size`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import mmap
import sys
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import certificates
from ovc_jax import errors
from ovc_jax import sampler
from ovc_jax import tracing
from ovc_jax.certificates import Certificate, Counts, SmoothingParams
from ovc_jax.classifiers import check_class_embeddings, predict_from_embeddings
from ovc_jax.errors import ConfigError, InputError

# A chunk's logits ([rows, P * C] float32) are kept to about this many bytes:
# at C = 1000 that is 2,048 rows, which keeps them in the L2/L3 caches while
# the argmax is taken; at C = 10 a chunk is the whole array (one call).
LOGITS_BYTES = 8 << 20
# XLA on CPU computes a row of E U^T with the same bits in any chunk of at
# least this many rows (tests/test_cached_ovc.py); smaller chunks use other
# kernels. Chunks are never smaller (unless the array itself is).
MIN_CHUNK_ROWS = 8
# A memory-mapped file is counted in chunks of at most this many bytes, so
# that reading it overlaps with counting it.
READ_BYTES = 8 << 20
# Rows that cannot be read in place (not aligned, not contiguous) are copied
# into reused aligned buffers of at most this many bytes each: small enough
# that the copy and its counting stay in cache.
COPY_BYTES = 4 << 20


class EmbeddingDraws(NamedTuple):
  """The cached embeddings of one input at one sigma."""

  selection: jax.Array   # [n0, d]
  estimation: jax.Array  # [n, d]


def embeddings_from_draws(draws: sampler.Draws) -> EmbeddingDraws:
  """The embeddings kept by a standard certification run with "embeddings"."""
  return EmbeddingDraws(draws.selection["embeddings"],
                        draws.estimation["embeddings"])


def chunk_rows(num_rows: int, num_logits: int,
               batch_size: int | None = None) -> int:
  """Rows counted at once for `num_rows` rows and `num_logits` = P * C.

  About `LOGITS_BYTES` of logits and at most `batch_size` rows (a memory
  bound; None: none), rounded up to a multiple of `MIN_CHUNK_ROWS` and never
  fewer (unless there are fewer rows). The rows are split into equal chunks,
  so the ragged last chunk is short by little.
  """
  rows = max(LOGITS_BYTES // (4 * max(int(num_logits), 1)), 1)
  if batch_size is not None:
    rows = min(rows, int(batch_size))
  rows = max(rows, MIN_CHUNK_ROWS)
  if rows >= num_rows:
    return max(int(num_rows), 1)
  rows = math.ceil(num_rows / math.ceil(num_rows / rows))
  return min(MIN_CHUNK_ROWS * math.ceil(rows / MIN_CHUNK_ROWS), int(num_rows))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _count_chunk(counts, chunk, class_embeddings, num_valid, *, num_classes):
  """counts + the histogram of the first `num_valid` rows' predictions."""
  preds = predict_from_embeddings(chunk, class_embeddings)
  valid = jnp.arange(chunk.shape[0]) < num_valid
  return counts + sampler.count_classes(preds, valid, num_classes)


@functools.partial(jax.jit, static_argnames=("num_classes", "chunk"))
def _count_on_device(embeddings, class_embeddings, *, num_classes, chunk):
  """The histogram of all rows, chunk by chunk, for arrays on an accelerator
  (or traced): full chunks in a scan, then the ragged tail padded."""
  m = embeddings.shape[0]
  full = m // chunk
  counts = jnp.zeros(class_embeddings.shape[:-2] + (num_classes,), jnp.int32)
  if full:
    def add_chunk(c, i):
      x = jax.lax.dynamic_slice_in_dim(embeddings, i * chunk, chunk)
      return _count_chunk(c, x, class_embeddings, chunk,
                          num_classes=num_classes), None
    counts, _ = jax.lax.scan(add_chunk, counts, jnp.arange(full))
  tail = m - full * chunk
  if tail:
    x = jnp.pad(embeddings[full * chunk:], ((0, chunk - tail), (0, 0)))
    counts = _count_chunk(counts, x, class_embeddings, tail,
                          num_classes=num_classes)
  return counts


def _host_rows(embeddings: Any) -> np.ndarray | None:
  """The rows as a host numpy array without a copy (a memmap stays one), or
  None for arrays that live on an accelerator or are traced, or when called
  inside a trace (jit, vmap: the counting is then part of that program)."""
  if isinstance(embeddings, jax.core.Tracer) or tracing.under_trace():
    return None
  if isinstance(embeddings, jax.Array):
    devices = embeddings.devices()
    if (len(devices) != 1 or next(iter(devices)).platform != "cpu"
        or not embeddings.is_fully_addressable):
      return None
    return np.asarray(embeddings)  # a view of the jax buffer on the CPU
  return np.asarray(embeddings)


def _is_memory_mapped(rows: np.ndarray) -> bool:
  base = rows
  while isinstance(base, np.ndarray):
    if isinstance(base, np.memmap):
      return True
    base = base.base
  return isinstance(base, mmap.mmap)


def _libc():
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t,
                             ctypes.c_char_p)
    libc.mincore.restype = ctypes.c_int
    return libc
  except (OSError, AttributeError):
    return None


_LIBC = _libc() if sys.platform.startswith("linux") else None
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_PAGE = mmap.PAGESIZE


def _all_resident(rows: np.ndarray) -> bool:
  """Whether the page cache holds all of a memory-mapped array (a warm
  cache: then nothing is read ahead, populating would only walk page tables;
  a cold or partly cold one is read ahead chunk by chunk, every chunk, which
  keeps the kernel's own read-ahead going)."""
  address = rows.ctypes.data
  first = address - address % _PAGE
  return _resident(first, address + rows.nbytes - first)


def _resident(first: int, length: int) -> bool:
  """Whether the page cache holds every page of [first, first + length)."""
  pages = -(-length // _PAGE)
  vec = ctypes.create_string_buffer(pages)
  if _LIBC.mincore(first, length, vec) != 0:
    return False
  return b"\x00" not in vec.raw[:pages]


class _ReadAhead:
  """Faults a memory-mapped array in, chunk by chunk, from a helper thread.

  `madvise(MADV_POPULATE_READ)` maps each chunk's pages, reading them from
  disk (in large sequential reads) where they are not in the page cache,
  while the main thread counts the chunks before: `wait(i)` returns once
  chunk i is in memory. If the page cache already holds the whole array
  (`mincore`), nothing is read ahead. Without it, the counting's own page faults read the
  file a few pages at a time from two threads, at a fraction of the disk's
  speed. Where the call is not available, `wait` returns at once and the
  counting faults the pages in itself (slower, same result).
  """

  def __init__(self, rows: np.ndarray, chunk: int):
    self._starts = range(0, rows.shape[0], chunk)
    self._ready = [threading.Event() for _ in self._starts]
    self._stop = threading.Event()
    self._thread = None
    if (_LIBC is None or not _is_memory_mapped(rows)
        or not rows.flags.c_contiguous or _all_resident(rows)):
      for event in self._ready:
        event.set()
      return
    self._thread = threading.Thread(target=self._populate,
                                    args=(rows, chunk), daemon=True)
    self._thread.start()

  def _populate(self, rows: np.ndarray, chunk: int) -> None:
    works = True
    try:
      for i, start in enumerate(self._starts):
        block = rows[start:start + chunk]
        if (works and not self._stop.is_set() and block.flags.c_contiguous
            and block.nbytes):
          address = block.ctypes.data
          first = address - address % _PAGE
          length = address + block.nbytes - first
          # ctypes releases the GIL for the call.
          works = _LIBC.madvise(first, length, _MADV_POPULATE_READ) == 0
        self._ready[i].set()
    finally:  # never leave the counting waiting
      for event in self._ready:
        event.set()

  def wait(self, i: int) -> None:
    self._ready[i].wait()

  def join(self) -> None:
    """Stops reading ahead (if the counting ended early) and waits."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


def _in_place(rows: np.ndarray) -> bool:
  """Whether XLA can read these host rows where they are, chunk by chunk
  (C-contiguous, 64-byte aligned, and so is every chunk's first row, chunks
  being multiples of MIN_CHUNK_ROWS rows: `device_put(may_alias=True)` then
  makes no copy)."""
  return (rows.flags.c_contiguous and rows.ctypes.data % _ALIGNMENT == 0
          and (MIN_CHUNK_ROWS * rows[:1].nbytes) % _ALIGNMENT == 0)


_ALIGNMENT = 64
_STAGING_DEPTH = 3
_staging_lock = threading.Lock()
_staging_free: dict[tuple[int, str], list[list[np.ndarray]]] = {}


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  skip = -raw.ctypes.data % _ALIGNMENT
  return raw[skip:skip + nbytes].view(dtype).reshape(shape)


class _Staging:
  """Aligned buffers that rows which cannot be read in place are copied into,
  one chunk at a time, and reused (a fresh buffer per chunk would be a fresh
  mapping, whose page faults cost more than the copy). A buffer is refilled
  only once the chunk that read it has been counted."""

  def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
    self._key = (math.prod(shape) * dtype.itemsize, dtype.str)
    with _staging_lock:
      free = _staging_free.get(self._key)
      buffers = free.pop() if free else None
    if buffers is None:
      buffers = [_aligned_empty(shape, dtype) for _ in range(_STAGING_DEPTH)]
    self._buffers = [b.reshape(shape) for b in buffers]
    self._readers: list[jax.Array | None] = [None] * _STAGING_DEPTH

  def fill(self, i: int, block: np.ndarray) -> np.ndarray:
    k = i % _STAGING_DEPTH
    if self._readers[k] is not None:
      self._readers[k].block_until_ready()
    buffer = self._buffers[k]
    buffer[:block.shape[0]] = block
    buffer[block.shape[0]:] = 0
    return buffer

  def read_by(self, i: int, result: jax.Array) -> None:
    self._readers[i % _STAGING_DEPTH] = result

  def release(self) -> None:
    for reader in self._readers:
      if reader is not None:
        reader.block_until_ready()
    with _staging_lock:
      _staging_free[self._key] = [self._buffers]  # one set kept per size


def _count_host(rows: np.ndarray, class_embeddings: jax.Array, *,
                num_classes: int, chunk: int) -> jax.Array:
  m = rows.shape[0]
  counts = jnp.zeros(class_embeddings.shape[:-2] + (num_classes,), jnp.int32)
  staging = None if _in_place(rows) else _Staging((chunk,) + rows.shape[1:],
                                                  rows.dtype)
  ahead = _ReadAhead(rows, chunk)
  try:
    for i, start in enumerate(range(0, m, chunk)):
      ahead.wait(i)
      block = rows[start:start + chunk]
      if staging is not None:
        block = staging.fill(i, block)
      elif block.shape[0] < chunk:  # the ragged last chunk: padded
        block = np.concatenate([block, np.zeros(
            (chunk - block.shape[0],) + block.shape[1:], block.dtype)])
      counts = _count_chunk(counts, jax.device_put(block, may_alias=True),
                            class_embeddings, min(chunk, m - start),
                            num_classes=num_classes)
      if staging is not None:
        staging.read_by(i, counts)
    counts.block_until_ready()
  finally:
    ahead.join()
    if staging is not None:
      staging.release()
  return counts


def _check_rows(embeddings: Any) -> tuple[Any, np.ndarray | None]:
  host = _host_rows(embeddings)
  arr = host if host is not None else embeddings
  if np.ndim(arr) != 2:
    raise InputError(f"cached embeddings must be [m, d]; got shape "
                     f"{np.shape(arr)}")
  dtype = arr.dtype
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer)):
    raise InputError(f"cached embeddings must hold real numbers; got dtype "
                     f"{dtype}")
  if np.shape(arr)[0] < 1:
    raise InputError("the cache holds no embeddings")
  return arr, host


def _count(embeddings: Any, class_embeddings: jax.Array,
           batch_size: int | None) -> jax.Array:
  """count_predictions for a class matrix already checked."""
  arr, host = _check_rows(embeddings)
  if host is not None and tracing.is_traced(class_embeddings):
    host = None  # e.g. vmap over prompts: counted in the caller's program
  num_classes = int(class_embeddings.shape[-2])
  num_logits = math.prod(class_embeddings.shape[:-1])
  if host is not None and (_is_memory_mapped(host) or not _in_place(host)):
    # Read from a file, or copied: in chunks that overlap with the counting.
    limit = READ_BYTES if _in_place(host) else COPY_BYTES
    read_rows = max(limit // max(host[:1].nbytes, 1), 1)
    batch_size = read_rows if batch_size is None else min(batch_size, read_rows)
  chunk = chunk_rows(int(arr.shape[0]), num_logits, batch_size)
  if host is not None:
    return _count_host(host, class_embeddings, num_classes=num_classes,
                       chunk=chunk)
  if batch_size is not None:
    # On a device: the sampler's own layout, chunks of batch_size rows and
    # the last one padded, so that its kernels see the same shapes.
    chunk = min(int(batch_size), int(arr.shape[0]))
  return _count_on_device(arr, class_embeddings, num_classes=num_classes,
                          chunk=chunk)


def _check_batch_size(batch_size: int | None) -> None:
  if batch_size is not None and (
      not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ConfigError(f"batch size must be an integer >= 1 or None; got "
                      f"{batch_size}")


def _checked_class_embeddings(embeddings: Any, class_embeddings: Any):
  arr, _ = _check_rows(embeddings)
  return check_class_embeddings(
      class_embeddings, embedding_size=int(arr.shape[1]),
      embeddings_name="the cached embeddings")


def count_predictions(embeddings: Any, class_embeddings: jax.Array, *,
                      batch_size: int | None = None) -> jax.Array:
  """Histogram of argmax(E U^T): `[C]` for U [C, d], `[P, C]` for U [P, C, d].

  Args:
    embeddings: `[m, d]`: a jax array, a numpy array or a memory-mapped
      `.npy` (read in place, never copied whole).
    class_embeddings: `[C, d]` or `[P, C, d]`.
    batch_size: the most rows evaluated at once (memory, not semantics: the
      counts are the same for every value); None: as many as keep a chunk's
      logits near `LOGITS_BYTES`.

  One read of the embeddings serves all P prompts. A non-finite embedding
  (a sample the encoder gave no number for) counts for no class, exactly as
  in standard RS.
  """
  _check_batch_size(batch_size)
  class_embeddings = _checked_class_embeddings(embeddings, class_embeddings)
  return _count(embeddings, class_embeddings, batch_size)


@dataclasses.dataclass(frozen=True)
class CachedParams:
  """Cached-OVC's own numbers, checked on construction.

  Attributes:
    batch_size: the most cached rows evaluated at once (memory, not
      semantics: the counts are the same for every value); None: as many as
      keep a chunk's logits near `LOGITS_BYTES`.
  """

  batch_size: int | None = None

  def __post_init__(self):
    _check_batch_size(self.batch_size)


def _check_params(smoothing: Any, cached: Any) -> None:
  errors.check_bundle(smoothing, SmoothingParams, "smoothing")
  errors.check_bundle(cached, CachedParams, "cached")


def _checked_cache(cache: EmbeddingDraws, class_embeddings: Any):
  """The class matrix as [P, C, d], checked against both cached streams."""
  if not isinstance(cache, EmbeddingDraws):
    raise ConfigError(f"the cache must be an EmbeddingDraws(selection, "
                      f"estimation); got {type(cache).__name__}")
  class_embeddings = _checked_class_embeddings(cache.estimation,
                                               class_embeddings)
  selection, _ = _check_rows(cache.selection)
  if selection.shape[1] != class_embeddings.shape[-1]:
    raise InputError(
        f"class matrix {tuple(class_embeddings.shape)} has embedding size "
        f"{class_embeddings.shape[-1]} but the cached selection embeddings "
        f"have size {selection.shape[1]}")
  return class_embeddings


def cached_counts(cache: EmbeddingDraws, class_embeddings: jax.Array,
                  cached: CachedParams = CachedParams()) -> Counts:
  """Cached-OVC's selection and estimation counts (traceable).

  Args:
    cache: the selection embeddings [n0, d] and estimation embeddings [n, d]
      (jax or numpy arrays, memory-mapped files, or traced arrays inside jit
      or vmap).
    class_embeddings: `[C, d]` (counts `[C]`) or `[P, C, d]` (`[P, C]`).
    cached: the batch size.

  Concrete arrays are read by the host loop of `count_predictions`, traced
  ones by one scan in the program; the counts are the same.
  """
  errors.check_bundle(cached, CachedParams, "cached")
  return _cached_counts(cache, _checked_cache(cache, class_embeddings),
                        cached.batch_size)


def _cached_counts(cache: EmbeddingDraws, class_embeddings: jax.Array,
                   batch_size: int | None) -> Counts:
  """cached_counts for a class matrix already checked."""
  return Counts(_count(cache.selection, class_embeddings, batch_size),
                _count(cache.estimation, class_embeddings, batch_size))


def check_draws(cache: EmbeddingDraws, smoothing: SmoothingParams) -> None:
  """Raises ConfigError unless the cache holds the n0 selection and n
  estimation rows that smoothing says were drawn."""
  for name, rows, want in (("selection", cache.selection, smoothing.n0),
                           ("estimation", cache.estimation, smoothing.n)):
    have = np.shape(rows)[0] if np.ndim(rows) else 0
    if have != want:
      raise ConfigError(
          f"the cache holds {have} {name} embeddings but smoothing."
          f"{'n0' if name == 'selection' else 'n'} = {want}: certify with "
          "the SmoothingParams the cache was made with")


def certify_cached_many(cache: EmbeddingDraws, class_embeddings: jax.Array,
                        smoothing: SmoothingParams,
                        cached: CachedParams = CachedParams()
                        ) -> list[Certificate]:
  """Certificates of P prompts (U [P, C, d]) from one read of the cache.

  smoothing gives sigma and alpha, and its n0 and n must be the cache's row
  counts (smoothing.batch_size, the encoder's, is not used here).
  """
  _check_params(smoothing, cached)
  class_embeddings = _checked_cache(cache, class_embeddings)
  check_draws(cache, smoothing)
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  counts = _cached_counts(cache, class_embeddings, cached.batch_size)
  return certificates.certificates_from_counts(
      counts.selection, counts.estimation, n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha)


def certify_cached(cache: EmbeddingDraws, class_embeddings: jax.Array,
                   smoothing: SmoothingParams,
                   cached: CachedParams = CachedParams()) -> Certificate:
  """The certificate of one prompt (U [C, d]); no image-encoder pass."""
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_cached takes one prompt's [C, d] class matrix; "
                     "use certify_cached_many for [P, C, d]")
  return certify_cached_many(cache, class_embeddings, smoothing, cached)[0]
