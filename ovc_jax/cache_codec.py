"""Compressed embedding caches: each row quantised, with a bound on its error.

Cached-OVC keeps the n0 + n noisy embeddings of an input, [m, d] float32. The
rows of one input at one sigma lie close to their mean, so a row is stored as
its residual from the mean, quantised with its own step:

  mean   [d]     float32, the mean of the finite rows
  scale  [m]     float32, the row's step: max |e_i - mean| / QMAX
  codes  [m, d]  int8 or int16, round((e_i - mean) / scale_i)
  bound  [m]     float32, an upper bound on ||e_i - decode(i)||_2

and decoded as `mean + scale_i * codes_i` in float32. With d = 512, an int8
row takes 520 bytes against float32's 2,048 (0.254x), an int16 row 1,032
(0.504x).

The bound b_i is what keeps certificates exact: it is computed when writing,
from the float32 row and its decoded row, in float64 and rounded up, so
||e_i - ê_i||_2 <= b_i holds for the decoded row whichever way the decode's
float32 multiply-add is rounded (separately, as NumPy does, or fused, as a
compiler may): per coordinate, fl(fl(p) + mu) and fl(p + mu), p = scale_i
codes_ik, differ by at most the product's rounding, 2^-24 |p|, plus one unit
in the last place of the result, 2^-23 |ê_ik|; b_i adds
2^-22 (||scale_i codes_i||_2 + ||ê_i||_2), twice that. docs/METHOD.md
derives how the counting uses b_i.

A row that is not finite (a sample the encoder gave no number for) is kept
as a NaN step with zero codes, so it decodes to NaN and, as in standard RS,
counts for no class; its bound is 0 (its class, none, is certain).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ovc_jax.errors import InputError

# The storage formats of an embedding cache; "float32" is the exact rows.
FORMATS = ("float32", "int16", "int8")
CODE_DTYPES = {"int16": np.int16, "int8": np.int8}
# Codes span [-QMAX, QMAX] (symmetric: -128 is never written).
QMAX = {"int16": 32767, "int8": 127}
# Rows encoded at once (bounds the float64 temporaries).
_ENCODE_ROWS = 4096


class CompressedRows(NamedTuple):
  """m embedding rows, quantised (see the module docstring).

  Attributes:
    mean: [d] float32.
    scale: [m] float32 (NaN for a non-finite row).
    codes: [m, d] int8 or int16.
    bound: [m] float32, ||e_i - decode(i)||_2 <= bound[i].
  """

  mean: Any
  scale: Any
  codes: Any
  bound: Any

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(np.shape(self.codes))

  @property
  def format(self) -> str:
    return np.dtype(self.codes.dtype).name

  @property
  def nbytes(self) -> int:
    return sum(int(np.asarray(a).nbytes) if not hasattr(a, "nbytes")
               else int(a.nbytes) for a in self)


def check_format(name: Any) -> str:
  if name not in FORMATS:
    raise InputError(f"unknown cache format {name!r}; choose from "
                     f"{', '.join(FORMATS)}")
  return name


def decode_rows(rows: CompressedRows, start: int = 0,
                stop: int | None = None) -> np.ndarray:
  """Rows [start, stop) decoded to float32 [k, d] (NumPy, two roundings)."""
  codes = np.asarray(rows.codes[start:stop])
  scale = np.asarray(rows.scale[start:stop], np.float32)[:, None]
  with np.errstate(invalid="ignore"):
    return (codes.astype(np.float32) * scale) + np.asarray(rows.mean,
                                                           np.float32)


def round_up_to_float32(values: np.ndarray) -> np.ndarray:
  """float64 values as float32 no smaller than them."""
  f32 = values.astype(np.float32)
  below = f32.astype(np.float64) < values
  return np.where(below, np.nextafter(f32, np.float32(np.inf)), f32)


def encode_rows(rows: Any, fmt: str, *,
                mean: Any = None) -> CompressedRows:
  """Quantises float32 rows [m, d] to `fmt` ("int16" or "int8").

  `mean` [d] float32: the residuals' reference (default: the mean of the
  finite rows); rows appended to a cache are encoded against its mean.
  """
  if fmt not in CODE_DTYPES:
    raise InputError(f"cannot compress to {fmt!r}; choose int16 or int8")
  rows = np.asarray(rows)
  if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
    raise InputError(f"embeddings to compress must be [m, d]; got shape "
                     f"{rows.shape}")
  if rows.dtype != np.float32:
    raise InputError(f"embeddings to compress must be float32; got "
                     f"{rows.dtype}")
  m, d = rows.shape
  finite = np.all(np.isfinite(rows), axis=1)
  if mean is None:
    mean = (rows[finite].astype(np.float64).mean(axis=0) if finite.any()
            else np.zeros(d)).astype(np.float32)
  else:
    mean = np.asarray(mean)
    if (mean.shape != (d,) or mean.dtype != np.float32
        or not np.all(np.isfinite(mean))):
      raise InputError(f"the mean to encode against must be finite float32 "
                       f"[{d}]; got {mean.dtype} {list(mean.shape)}")
  qmax = QMAX[fmt]
  scale = np.empty(m, np.float32)
  codes = np.empty((m, d), CODE_DTYPES[fmt])
  bound = np.empty(m, np.float32)
  for start in range(0, m, _ENCODE_ROWS):
    block = rows[start:start + _ENCODE_ROWS]
    ok = finite[start:start + _ENCODE_ROWS]
    with np.errstate(invalid="ignore", over="ignore"):
      residual = block.astype(np.float64) - mean
      step = (np.max(np.abs(residual), axis=1) / qmax).astype(np.float32)
      # A step that rounded down could make a code exceed qmax: clip.
      safe = np.where(ok & (step > 0), step, np.float32(1))
      q = np.clip(np.rint(residual / safe[:, None]), -qmax, qmax)
      q = np.where(ok[:, None] & (step[:, None] > 0), q, 0)
    s = np.where(ok, step, np.float32(np.nan)).astype(np.float32)
    c = q.astype(CODE_DTYPES[fmt])
    decoded = decode_rows(CompressedRows(mean, s, c, None))
    with np.errstate(invalid="ignore"):
      err = np.linalg.norm(block.astype(np.float64) - decoded, axis=1)
      product = np.linalg.norm(c.astype(np.float64) * s[:, None], axis=1)
      size = np.linalg.norm(decoded.astype(np.float64), axis=1)
    # float64 norms err by far less than 1e-9 relative at any d used here;
    # the 2^-22 term covers a fused decode (module docstring).
    b = (err + 2.0**-22 * (product + size)) * (1 + 1e-9)
    bound[start:start + len(block)] = np.where(ok, round_up_to_float32(b), 0)
    scale[start:start + len(block)] = s
    codes[start:start + len(block)] = c
  return CompressedRows(mean, scale, codes, bound)
