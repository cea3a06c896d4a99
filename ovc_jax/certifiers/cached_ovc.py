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

Compressed caches (`cache_codec.CompressedRows`, int8 or int16 codes with a
bound b_i on each row's decoding error): each chunk's logits are computed
in the compiled program from its integer codes (`decoded_logits`), and a row
counts for its decoded class when that class is
certain to be standard RS's, its top logit beating every other by more than
b_i ||u_t - u_c|| plus a float32 rounding allowance (docs/METHOD.md,
"Compressed caches", derives it). The other rows are ambiguous:
`CachedParams.ambiguous` = "regenerate" recomputes them from their keys with
the encoder (`encoder_regenerator`), so the certificate is standard RS's bit
for bit; "conservative" counts an ambiguous estimation row as a miss and an
ambiguous selection row by its decoded class (sound, no encoder). The codes
are read like float32 rows: in place or copied, chunk by chunk, memory-mapped
files read ahead.

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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import cache_codec
from ovc_jax import certificates
from ovc_jax import errors
from ovc_jax import sampler
from ovc_jax import tracing
from ovc_jax.certificates import Certificate, Counts, SmoothingParams
from ovc_jax.cache_codec import CompressedRows
from ovc_jax.classifiers import (NO_CLASS, argmax_or_no_class,
                                 check_class_embeddings,
                                 predict_from_embeddings, prompt_logits)
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
  """The cached embeddings of one input at one sigma: each stream float32
  rows or a `cache_codec.CompressedRows` of them (its own mean: a
  selection row's decoding depends on the selection draws alone)."""

  selection: Any   # [n0, d]
  estimation: Any  # [n, d]


def embeddings_from_draws(draws: sampler.Draws) -> EmbeddingDraws:
  """The embeddings kept by a standard certification run with "embeddings"."""
  return EmbeddingDraws(draws.selection["embeddings"],
                        draws.estimation["embeddings"])


def compress_draws(cache: EmbeddingDraws, fmt: str) -> EmbeddingDraws:
  """Both streams of a float32 cache encoded to `fmt` ("int16" or "int8")."""
  return EmbeddingDraws(*(cache_codec.encode_rows(np.asarray(rows), fmt)
                          for rows in cache))


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


# Compressed caches (`cache_codec.CompressedRows`): counting with a bound.
#
# A decoded row ê_i differs from the exact row e_i by at most b_i in L2
# norm. Its class is certain when the top decoded logit t beats every other
# class c by more than b_i ||u_t - u_c|| plus the float32 rounding of both
# rows' logits (`rounding_allowance`; docs/METHOD.md, "Compressed caches",
# derives both): then standard RS's logits of e_i, whatever their rounding,
# have the same argmax. Every other row is ambiguous, and is either
# regenerated from its key (exact) or counted for no class (conservative).

AMBIGUOUS_MODES = ("regenerate", "conservative")
# Ambiguous rows regenerated at once (bounds their embeddings' memory).
REGENERATE_ROWS = 8192
# The unit roundoff of float32 (round to nearest).
FLOAT32_UNIT = 2.0**-24
# A decoded row whose (||ê|| + b) max ||u_c|| is above this is ambiguous:
# standard RS's logits of it could overflow (and count for no class).
LOGIT_LIMIT = 1e37

# (stream "selection" | "estimation", int64 sample indices [k]) -> the exact
# float32 embeddings [k, d] of those samples, bit for bit the standard run's.
Regenerate = Callable[[str, np.ndarray], Any]


class RoundingAllowance(NamedTuple):
  """The float32 constants of the certainty test for embedding size d
  (see `rounding_allowance`; docs/METHOD.md derives them).

  Attributes:
    gamma: gamma_{d+4} = (d+4)u / (1 - (d+4)u), rounded up: the test allows
      gamma (2a + b)(||u_t|| + ||u_c||) for the rounding of both rows' logits
      and of their difference.
    norm_scale: s_i fl(sqrt(sum q_ik^2)) times this, plus the mean's norm,
      is at least ||mean + s_i q_i|| (a), after the float32 roundings.
    need_scale: the test's right-hand side, computed in float32, times this
      is at least its exact value (it has 6 roundings).
    need_floor: covers underflow in that right-hand side and in the logits.
  """

  gamma: float
  norm_scale: float
  need_scale: float
  need_floor: float


def rounding_allowance(d: int) -> RoundingAllowance:
  """The rounding allowance's constants for embedding size d (float32)."""
  u = FLOAT32_UNIT
  gamma_d = d * u / (1 - d * u)
  up = lambda v: float(cache_codec.round_up_to_float32(
      np.float64(v) * (1 + 1e-12)))
  return RoundingAllowance(
      gamma=up((d + 4) * u / (1 - (d + 4) * u)),
      norm_scale=up(1 / ((1 - u)**4 * math.sqrt(1 - gamma_d))),
      need_scale=1 + 8 * u,
      need_floor=2.0**-100)


def class_geometry(class_embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
  """Upper bounds, float32, on ||u_t - u_c|| `[P, C, C]` and ||u_c||
  `[P, C]` for a class matrix `[P, C, d]` (of its float32 values, as the
  logits use them), computed in float64 from the Gram matrix and rounded up.

  Each float64 Gram entry is within gamma_d ||u_t|| ||u_c|| of its exact
  value (gamma_d ~ d 2^-53), so G_tt + G_cc - 2 G_tc is within
  4 gamma_{d+3} (G_tt + G_cc) of ||u_t - u_c||^2: that much is added.
  """
  u = np.asarray(class_embeddings, np.float32).astype(np.float64)
  d = u.shape[-1]
  gram = u @ np.swapaxes(u, -1, -2)
  sq = np.einsum("pcc->pc", gram)
  both = sq[:, :, None] + sq[:, None, :]
  gamma = (d + 3) * 2.0**-53 / (1 - (d + 3) * 2.0**-53)
  distances = np.sqrt(np.maximum(both - 2 * gram, 0) + 4 * gamma * both)
  safe = lambda v: cache_codec.round_up_to_float32(v * (1 + 1e-9))
  return safe(distances), safe(np.sqrt(sq))


def decoded_logits(codes, scale, mean, class_embeddings):
  """The decoded rows' logits, float32 `[k, P, C]` (or `[k, C]`):
  `scale_i fl(q_i . u_c) + fl(mean . u_c)`, the logits of the exact
  decoding mean + scale_i q_i up to the rounding the allowance covers. The
  int8/int16 codes are exact in float32; a NaN step (a row that was not
  finite) gives NaN logits, so no class."""
  # The barrier keeps the step out of the matrix product (whose error bound
  # is stated for the integer codes).
  products = jax.lax.optimization_barrier(
      prompt_logits(codes.astype(jnp.float32), class_embeddings))
  offsets = prompt_logits(mean[None], class_embeddings)[0]
  scale = scale.reshape(scale.shape + (1,) * (products.ndim - 1))
  return scale * products + offsets


def _certain(codes, logits, top, scale, bound, mean_norm, distances, norms,
             allowance):
  """Whether each row's decoded class is standard RS's class: bool [k, P]."""
  gamma, norm_scale, need_scale, need_floor = allowance
  codes = codes.astype(jnp.float32)
  size = scale * jnp.sqrt(jnp.sum(codes * codes, axis=-1)) * norm_scale
  size = size + mean_norm                                      # a >= ||ẽ||
  num_prompts, num_classes = norms.shape
  t = jnp.maximum(top, 0)                                      # [k, P]
  prompt = jnp.arange(num_prompts)[None, :]
  # The top logit (argmax of finite logits: the max).
  margin = jnp.max(logits, axis=-1, keepdims=True) - logits
  b = bound[:, None, None]
  a = size[:, None, None]
  pair = norms[prompt, t][..., None] + norms[None]             # [k, P, C]
  need = ((b * distances[prompt, t] + gamma * (2 * a + b) * pair)
          * need_scale + need_floor)
  own = jnp.arange(num_classes) == t[..., None]
  beats = jnp.all(own | (margin > need), axis=-1)
  small = (size + bound) * jnp.max(norms) < LOGIT_LIMIT       # [k]
  decided = beats & (top >= 0) & small[:, None]
  # A row that was not finite is stored with a NaN step: no class, exactly.
  return jnp.where(jnp.isnan(scale)[:, None], True, decided)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _count_bounded_chunk(certain_counts, decoded_counts, codes, scale, bound,
                         mean, mean_norm, class_embeddings, distances, norms,
                         allowance, num_valid, *, num_classes):
  """Adds a chunk's certain and decoded histograms; its ambiguous rows."""
  logits = decoded_logits(codes, scale, mean, class_embeddings)  # [k, P, C]
  top = argmax_or_no_class(logits)                               # [k, P]
  certain = _certain(codes, logits, top, scale, bound, mean_norm, distances,
                     norms, allowance)
  valid = jnp.arange(codes.shape[0]) < num_valid
  certain_counts = certain_counts + sampler.count_classes(
      jnp.where(certain, top, NO_CLASS), valid, num_classes)
  decoded_counts = decoded_counts + sampler.count_classes(top, valid,
                                                          num_classes)
  return certain_counts, decoded_counts, valid[:, None] & ~certain


class BoundedCounts(NamedTuple):
  """What the decoded rows of a compressed cache say.

  Attributes:
    certain: int64 `[P, C]`: the rows whose class is certain, by class.
    decoded: int64 `[P, C]`: every row by its decoded class.
    ambiguous: bool `[m, P]`: the rows whose class is in doubt.
  """

  certain: np.ndarray
  decoded: np.ndarray
  ambiguous: np.ndarray


def _host_array(value: Any, name: str) -> np.ndarray:
  if tracing.is_traced(value) or tracing.under_trace():
    raise ConfigError(
        "a compressed cache is counted on the host, not inside jit or vmap; "
        "use a float32 cache there")
  if isinstance(value, jax.Array):
    host = _host_rows(value)
    return host if host is not None else np.asarray(jax.device_get(value))
  try:
    return np.asarray(value)
  except (TypeError, ValueError) as e:
    raise InputError(f"the compressed cache's {name} is not an array: {e}")


def check_compressed(rows: Any) -> CompressedRows:
  """The rows with host arrays (codes untouched: a memmap stays one);
  raises InputError (one line) unless they are a consistent CompressedRows:
  codes int8/int16 [m, d], mean float [d], scale and bound float [m], every
  bound >= 0 (inf allowed: that row is then always ambiguous)."""
  codes = _host_array(rows.codes, "codes")
  mean, scale, bound = (_host_array(a, n) for a, n in (
      (rows.mean, "mean"), (rows.scale, "scale"), (rows.bound, "bound")))
  if codes.ndim != 2 or codes.dtype not in (np.int8, np.int16):
    raise InputError(f"compressed codes must be int8 or int16 [m, d]; got "
                     f"{codes.dtype} {codes.shape}")
  m, d = codes.shape
  if m < 1 or d < 1:
    raise InputError(f"the compressed cache holds no rows: codes {codes.shape}")
  for name, arr, want in (("mean", mean, (d,)), ("scale", scale, (m,)),
                          ("bound", bound, (m,))):
    if arr.shape != want or not np.issubdtype(arr.dtype, np.floating):
      raise InputError(f"compressed {name} must be float {list(want)} for "
                       f"codes {list(codes.shape)}; got {arr.dtype} "
                       f"{list(arr.shape)}")
  if not np.all(np.isfinite(mean)):
    raise InputError("compressed rows have a mean that is not finite; the "
                     "cache is corrupted")
  bound = bound.astype(np.float32)
  if np.isnan(bound).any() or (bound < 0).any():
    raise InputError("compressed rows have a NaN or negative error bound; "
                     "the cache is corrupted")
  return CompressedRows(mean.astype(np.float32), scale.astype(np.float32),
                        codes, bound)


def _count_bounded(rows: CompressedRows, class_embeddings: jax.Array,
                   batch_size: int | None) -> BoundedCounts:
  """count_predictions_bounded for checked rows and a [P, C, d] matrix."""
  if jax.default_backend() == "tpu":
    raise ConfigError(
        "compressed caches need IEEE float32 logits, which TPU matrix units "
        "do not compute (docs/METHOD.md); use a float32 cache on TPU")
  codes = rows.codes
  m, d = codes.shape
  num_prompts, num_classes = (int(s) for s in class_embeddings.shape[:2])
  distances, norms = class_geometry(class_embeddings)
  allowance = tuple(np.float32(v) for v in rounding_allowance(d))
  # ||mean||, rounded up past the one rounding of adding it in the graph.
  mean_norm = cache_codec.round_up_to_float32(np.float64(np.linalg.norm(
      rows.mean.astype(np.float64))) * (1 + 1e-9) / (1 - FLOAT32_UNIT))
  limit = READ_BYTES if _in_place(codes) else COPY_BYTES
  read_rows = max(limit // max(codes[:1].nbytes, 1), 1)
  batch_size = read_rows if batch_size is None else min(batch_size, read_rows)
  chunk = chunk_rows(m, num_prompts * num_classes, batch_size)
  certain = decoded = jnp.zeros((num_prompts, num_classes), jnp.int32)
  masks = []
  staging = None if _in_place(codes) else _Staging((chunk, d), codes.dtype)
  ahead = _ReadAhead(codes, chunk)
  fixed = (rows.mean, mean_norm, jnp.asarray(class_embeddings, jnp.float32),
           distances, norms, allowance)
  try:
    for i, start in enumerate(range(0, m, chunk)):
      ahead.wait(i)
      block = codes[start:start + chunk]
      valid = block.shape[0]
      if staging is not None:
        block = staging.fill(i, block)
      elif valid < chunk:
        block = np.concatenate([block, np.zeros((chunk - valid, d),
                                                block.dtype)])
      pad = lambda a: np.pad(a[start:start + chunk], (0, chunk - valid))
      certain, decoded, mask = _count_bounded_chunk(
          certain, decoded, jax.device_put(block, may_alias=True),
          pad(rows.scale), pad(rows.bound), *fixed, valid,
          num_classes=num_classes)
      if staging is not None:
        staging.read_by(i, certain)
      masks.append(mask[:valid])
    certain.block_until_ready()
  finally:
    ahead.join()
    if staging is not None:
      staging.release()
  certain, decoded, masks = jax.device_get((certain, decoded, masks))
  return BoundedCounts(np.asarray(certain, np.int64),
                       np.asarray(decoded, np.int64), np.concatenate(masks))


def count_predictions_bounded(rows: CompressedRows, class_embeddings: Any, *,
                              batch_size: int | None = None) -> BoundedCounts:
  """Counts a compressed cache's decoded rows, and finds the ambiguous ones.

  Args:
    rows: a `cache_codec.CompressedRows` (codes may be memory-mapped: read
      in chunks, read ahead from disk, never copied whole).
    class_embeddings: `[C, d]` or `[P, C, d]`.
    batch_size: the most rows evaluated at once (memory, not semantics).

  Returns:
    `BoundedCounts`; for `[C, d]` its certain and decoded are `[C]` and its
    ambiguous `[m]`. A row counts in `certain` when standard RS's float32
    logits of the exact row are sure to have the same argmax (or, for a row
    that was not finite, to have none).
  """
  _check_batch_size(batch_size)
  if not isinstance(rows, CompressedRows):
    raise ConfigError(f"count_predictions_bounded takes CompressedRows; got "
                      f"{type(rows).__name__}")
  rows = check_compressed(rows)
  u = check_class_embeddings(class_embeddings,
                             embedding_size=int(rows.codes.shape[1]),
                             embeddings_name="the cached embeddings")
  counts = _count_bounded(rows, u if u.ndim == 3 else u[None], batch_size)
  if u.ndim == 2:
    return BoundedCounts(counts.certain[0], counts.decoded[0],
                         counts.ambiguous[:, 0])
  return counts


def _predict_host(embeddings: np.ndarray,
                  class_embeddings: jax.Array) -> np.ndarray:
  """predict_from_embeddings of host rows, int [k, P], in padded chunks of
  at least MIN_CHUNK_ROWS rows (so each row's logits have standard RS's
  bits; see the module docstring)."""
  k = embeddings.shape[0]
  # A power of two (one compiled program per bucket, not per k).
  chunk = min(max(MIN_CHUNK_ROWS, 1 << (k - 1).bit_length()),
              chunk_rows(REGENERATE_ROWS,
                         math.prod(class_embeddings.shape[:-1])))
  out = []
  for start in range(0, k, chunk):
    block = embeddings[start:start + chunk]
    block = np.concatenate([block, np.zeros((chunk - block.shape[0],
                                             block.shape[1]), block.dtype)])
    out.append(_predict_chunk(jnp.asarray(block), class_embeddings))
  return np.concatenate(jax.device_get(out))[:k].reshape(k, -1)


_predict_chunk = jax.jit(predict_from_embeddings)


def _regenerated(regenerate: Regenerate, stream: str, indices: np.ndarray,
                 d: int) -> np.ndarray:
  rows = regenerate(stream, indices)
  rows = rows if isinstance(rows, np.ndarray) else np.asarray(
      jax.device_get(rows))
  if rows.shape != (indices.size, d) or rows.dtype != np.float32:
    raise InputError(
        f"the regenerator gave {rows.dtype} {list(rows.shape)} for "
        f"{indices.size} {stream} samples; it must give float32 "
        f"[{indices.size}, {d}]")
  return rows


class StreamCounts(NamedTuple):
  """One stream's counts from a cache.

  Attributes:
    counts: int `[P, C]`, the histogram counted (see `count_stream`).
    ambiguous: int64 `[P]`: rows whose class the compressed rows left in
      doubt (0 for float32 rows).
    regenerated: int64 `[P]`: how many of those were recomputed exactly.
    encoder_rows: rows the encoder evaluated, all prompts together (an
      ambiguous row of several prompts is regenerated once).
  """

  counts: Any
  ambiguous: np.ndarray
  regenerated: np.ndarray
  encoder_rows: int


def _stream_counts(rows: Any, class_embeddings: jax.Array, stream: str,
                   cached: "CachedParams", regenerate: Regenerate | None,
                   first_index: int = 0) -> StreamCounts:
  """count_stream for a checked [P, C, d] matrix."""
  num_prompts, num_classes = (int(s) for s in class_embeddings.shape[:2])
  none = np.zeros(num_prompts, np.int64)
  if not isinstance(rows, CompressedRows):
    return StreamCounts(_count(rows, class_embeddings, cached.batch_size),
                        none, none, 0)
  rows = check_compressed(rows)
  bounded = _count_bounded(rows, class_embeddings, cached.batch_size)
  ambiguous = bounded.ambiguous.sum(axis=0).astype(np.int64)
  if cached.ambiguous == "conservative":
    # Estimation: an ambiguous row is a miss (no class), which only lowers
    # pA_lower. Selection: the decoded argmax, a function of the selection
    # draws alone (docs/METHOD.md says why that suffices).
    counts = bounded.certain if stream == "estimation" else bounded.decoded
    return StreamCounts(counts, ambiguous, none, 0)
  if regenerate is None:
    raise ConfigError(_NEEDS_REGENERATOR)
  counts = bounded.certain.copy()
  union = np.flatnonzero(bounded.ambiguous.any(axis=1))
  d = int(rows.codes.shape[1])
  for start in range(0, union.size, REGENERATE_ROWS):
    idx = union[start:start + REGENERATE_ROWS]
    exact = _regenerated(regenerate, stream,
                         idx.astype(np.int64) + first_index, d)
    preds = _predict_host(exact, class_embeddings)              # [k, P]
    keep = bounded.ambiguous[idx] & (preds >= 0) & (preds < num_classes)
    ids = (preds + num_classes * np.arange(num_prompts))[keep]
    counts += np.bincount(ids, minlength=num_prompts * num_classes).reshape(
        num_prompts, num_classes)
  return StreamCounts(counts, ambiguous, ambiguous.copy(), int(union.size))


_NEEDS_REGENERATOR = (
    "a compressed cache with ambiguous='regenerate' needs the encoder: pass "
    "regenerate=cached_ovc.encoder_regenerator(...) or use "
    "CachedParams(ambiguous='conservative')")


def count_stream(rows: Any, class_embeddings: Any, *, stream: str,
                 cached: "CachedParams" = None,
                 regenerate: Regenerate | None = None,
                 first_index: int = 0) -> StreamCounts:
  """One stream's histogram from float32 or compressed rows.

  Args:
    rows: float32 `[m, d]` rows (any kind `count_predictions` takes) or a
      `cache_codec.CompressedRows`.
    class_embeddings: `[C, d]` or `[P, C, d]`.
    stream: "selection" or "estimation" (what the rows are: it decides how
      conservative mode counts, and names the samples to regenerate).
    cached: the batch size and the ambiguous mode (default CachedParams()).
    regenerate: needed for compressed rows in "regenerate" mode.
    first_index: the stream index of the first row (a block of a growing
      cache); regenerated samples are first_index + row.

  Returns:
    `StreamCounts`. Float32 rows: exactly `count_predictions`. Compressed,
    "regenerate": the same histogram (certain rows by their decoded class,
    ambiguous ones by their regenerated class). Compressed, "conservative":
    estimation rows count only when certain; selection rows by their
    decoded class. For `[C, d]` the counts are `[C]` and the numbers scalars.
  """
  cached = CachedParams() if cached is None else cached
  errors.check_bundle(cached, CachedParams, "cached")
  if stream not in ("selection", "estimation"):
    raise ConfigError(f"stream must be 'selection' or 'estimation'; got "
                      f"{stream!r}")
  if not isinstance(first_index, (int, np.integer)) or first_index < 0:
    raise ConfigError(f"first_index must be an integer >= 0; got "
                      f"{first_index}")
  u = _checked_class_embeddings(rows, class_embeddings)
  _check_regenerate(rows, cached, regenerate)
  out = _stream_counts(rows, u if u.ndim == 3 else u[None], stream, cached,
                       regenerate, int(first_index))
  if u.ndim == 2:
    return StreamCounts(out.counts[0], out.ambiguous[0], out.regenerated[0],
                        out.encoder_rows)
  return out


def _check_regenerate(rows: Any, cached: "CachedParams",
                      regenerate: Regenerate | None) -> None:
  if regenerate is not None and not callable(regenerate):
    raise ConfigError(f"regenerate must be a function (stream, indices) -> "
                      f"embeddings; got {type(regenerate).__name__}")
  streams = rows if isinstance(rows, EmbeddingDraws) else (rows,)
  if (cached.ambiguous == "regenerate" and regenerate is None
      and any(isinstance(r, CompressedRows) for r in streams)):
    raise ConfigError(_NEEDS_REGENERATOR)


def encoder_regenerator(apply_fn: sampler.ApplyFn, params: Any, x: Any,
                        key: jax.Array,
                        smoothing: SmoothingParams) -> Regenerate:
  """A `Regenerate` that recomputes samples with the encoder, bit for bit.

  Args:
    apply_fn, params: the base classifier of the run that filled the cache
      (an `EmbeddingClassifier` with any class matrix: only its embeddings
      are used).
    x: the input.
    key: the input's key (the streams' keys are derived from it).
    smoothing: the run's SmoothingParams: its batch size sets the batches,
      min(batch_size, n0) for selection and min(batch_size, n) for
      estimation, the shapes the standard run evaluated (on the CPU that
      gives the same bits; a run on a mesh or an accelerator may need its
      own batches).
  """
  errors.check_bundle(smoothing, SmoothingParams, "smoothing")
  sizes = {"selection": smoothing.n0, "estimation": smoothing.n}

  def regenerate(stream: str, indices: np.ndarray) -> jax.Array:
    if stream not in sizes:
      raise ConfigError(f"stream must be 'selection' or 'estimation'; got "
                        f"{stream!r}")
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= sizes[stream]):
      raise ConfigError(
          f"{stream} sample indices must lie in [0, {sizes[stream]}); got "
          f"{indices.min()} to {indices.max()}")
    return sampler.sample_at_indices(
        apply_fn, params, x, key, indices, sigma=smoothing.sigma,
        batch_size=min(smoothing.batch_size, sizes[stream]),
        stream=stream)["embeddings"]

  return regenerate


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


def _rows_shape(embeddings: Any) -> tuple[int, int]:
  """(m, d) of float32 rows or CompressedRows, checked."""
  if isinstance(embeddings, CompressedRows):
    return tuple(int(s) for s in check_compressed(embeddings).codes.shape)
  arr, _ = _check_rows(embeddings)
  return tuple(int(s) for s in arr.shape)


def _checked_class_embeddings(embeddings: Any, class_embeddings: Any):
  return check_class_embeddings(
      class_embeddings, embedding_size=_rows_shape(embeddings)[1],
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
  if isinstance(embeddings, CompressedRows):
    raise ConfigError("count_predictions takes float32 rows; count "
                      "compressed rows with count_stream or "
                      "count_predictions_bounded")
  class_embeddings = _checked_class_embeddings(embeddings, class_embeddings)
  return _count(embeddings, class_embeddings, batch_size)


@dataclasses.dataclass(frozen=True)
class CachedParams:
  """Cached-OVC's own numbers, checked on construction.

  Attributes:
    batch_size: the most cached rows evaluated at once (memory, not
      semantics: the counts are the same for every value); None: as many as
      keep a chunk's logits near `LOGITS_BYTES`.
    ambiguous: what a compressed cache does with the rows whose class it
      leaves in doubt: "regenerate" them with the encoder (the certificate is
      then standard RS's, bit for bit; needs a `Regenerate`), or count them
      "conservative"ly (an estimation row as a miss, a selection row by its
      decoded class: sound, never needs the encoder). Float32 caches have no
      ambiguous rows.
  """

  batch_size: int | None = None
  ambiguous: str = "regenerate"

  def __post_init__(self):
    _check_batch_size(self.batch_size)
    if self.ambiguous not in AMBIGUOUS_MODES:
      raise ConfigError(f"ambiguous must be one of {AMBIGUOUS_MODES}; got "
                        f"{self.ambiguous!r}")


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
  selection_size = _rows_shape(cache.selection)[1]
  if selection_size != class_embeddings.shape[-1]:
    raise InputError(
        f"class matrix {tuple(class_embeddings.shape)} has embedding size "
        f"{class_embeddings.shape[-1]} but the cached selection embeddings "
        f"have size {selection_size}")
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
  ones by one scan in the program; the counts are the same. Float32 caches
  only: a compressed cache (ConfigError here) is counted on the host by
  `certify_cached`, which may call the encoder.
  """
  errors.check_bundle(cached, CachedParams, "cached")
  if any(isinstance(rows, CompressedRows) for rows in cache):
    raise ConfigError(
        "cached_counts (the traceable core) takes float32 caches only; "
        "certify a compressed cache with cached_ovc.certify_cached")
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
    have = (int(np.shape(rows.codes)[0]) if isinstance(rows, CompressedRows)
            else np.shape(rows)[0] if np.ndim(rows) else 0)
    if have != want:
      raise ConfigError(
          f"the cache holds {have} {name} embeddings but smoothing."
          f"{'n0' if name == 'selection' else 'n'} = {want}: certify with "
          "the SmoothingParams the cache was made with")


def certify_cached_many(cache: EmbeddingDraws, class_embeddings: jax.Array,
                        smoothing: SmoothingParams,
                        cached: CachedParams = CachedParams(),
                        regenerate: Regenerate | None = None
                        ) -> list[Certificate]:
  """Certificates of P prompts (U [P, C, d]) from one read of the cache.

  smoothing gives sigma and alpha, and its n0 and n must be the cache's row
  counts (smoothing.batch_size, the encoder's, is not used here). Either
  stream may be compressed (`cache_codec.CompressedRows`); then
  `cached.ambiguous` says what its ambiguous rows count as, and
  "regenerate" needs `regenerate` (e.g. `encoder_regenerator`). A row
  ambiguous for several prompts is regenerated once. Each certificate
  reports its prompt's ambiguous and regenerated rows.
  """
  _check_params(smoothing, cached)
  class_embeddings = _checked_cache(cache, class_embeddings)
  check_draws(cache, smoothing)
  _check_regenerate(cache, cached, regenerate)
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  selection, estimation = (
      _stream_counts(rows, class_embeddings, stream, cached, regenerate)
      for rows, stream in ((cache.selection, "selection"),
                           (cache.estimation, "estimation")))
  certs = certificates.certificates_from_counts(
      selection.counts, estimation.counts, n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha)
  return [cert._replace(
      ambiguous=int(selection.ambiguous[p] + estimation.ambiguous[p]),
      regenerated=int(selection.regenerated[p] + estimation.regenerated[p]))
          for p, cert in enumerate(certs)]


def certify_cached(cache: EmbeddingDraws, class_embeddings: jax.Array,
                   smoothing: SmoothingParams,
                   cached: CachedParams = CachedParams(),
                   regenerate: Regenerate | None = None) -> Certificate:
  """The certificate of one prompt (U [C, d]); no image-encoder pass (but
  for a compressed cache's ambiguous rows in "regenerate" mode)."""
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_cached takes one prompt's [C, d] class matrix; "
                     "use certify_cached_many for [P, C, d]")
  return certify_cached_many(cache, class_embeddings, smoothing, cached,
                             regenerate)[0]
