"""A restricted unpickler for data files: plain containers and NumPy arrays.

Unpickling runs whatever code a file names, so `restricted_unpickle` resolves
only the few NumPy globals an array pickle needs, each mapped to a stand-in of
ours that merely collects (shape, dtype, bytes); the array is made afterwards
with `np.frombuffer`. Any other global (`os.system`, `builtins.eval`, ...)
fails the load with a `DataError`; nothing in the file is ever called.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from typing import Any

import numpy as np

from ovc_jax.errors import DataError

# A NumPy array pickles as REDUCE(_reconstruct, (ndarray, (0,), b'b')) followed
# by BUILD with (1, shape, dtype, is_fortran, raw bytes), or under protocol 5
# as REDUCE(_frombuffer, (bytes, dtype, shape, order)); the dtype as
# REDUCE(dtype, ('u1', False, True)) then BUILD with its byte order. Python 3
# pickles of protocol < 3 store bytes as `_codecs.encode(text, 'latin1')`.
# Those are the only globals resolved, each to a stand-in below. The stand-ins
# define `__setstate__` (BUILD calls it instead of writing attributes) and
# accept one expected form only; they never call into NumPy.


class _Refused(pickle.UnpicklingError):
  """The file asks for something the restricted unpickler does not allow."""


class _Stub:
  """Base of the stand-ins: BUILD on them fails unless a subclass allows it."""

  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise _Refused(
        f"unexpected BUILD on {type(self).__name__}")

  def __reduce__(self):
    raise TypeError("stand-ins are not picklable")


class _NdarrayType(_Stub):
  """Stands for `numpy.ndarray`, the first argument of `_reconstruct`."""

  __slots__ = ()


class _DtypeStub(_Stub):
  """Stands for a simple numeric `numpy.dtype` ('u1', '<i8', ...)."""

  __slots__ = ("code", "byteorder", "_built")

  def __init__(self, code: str):
    self.code = code
    self.byteorder = "="
    self._built = False

  def __setstate__(self, state: Any) -> None:
    # NumPy's dtype state: (version, byteorder, subdescr, names, fields,
    # elsize, alignment, flags); only plain scalar dtypes are accepted.
    if self._built or not isinstance(state, tuple) or len(state) < 5:
      raise _Refused(f"unexpected dtype state {state!r:.80}")
    byteorder = to_text(state[1])
    if byteorder not in ("|", "<", ">", "=") or any(
        s is not None for s in state[2:5]):
      raise _Refused(
          "only plain numeric dtypes are allowed, not structured ones")
    self.byteorder = byteorder
    self._built = True

  def to_numpy(self) -> np.dtype:
    dtype = np.dtype(self.code)
    if self.byteorder in ("<", ">"):
      dtype = dtype.newbyteorder(self.byteorder)
    return dtype


class _ArrayStub(_Stub):
  """Stands for an ndarray: collects shape, dtype, order and raw bytes."""

  __slots__ = ("shape", "dtype", "fortran", "raw")

  def __init__(self):
    self.shape = None
    self.dtype = None
    self.fortran = False
    self.raw = None

  def __setstate__(self, state: Any) -> None:
    if self.raw is not None or not isinstance(state, tuple) or len(state) != 5:
      raise _Refused(f"unexpected ndarray state {state!r:.80}")
    _, shape, dtype, fortran, raw = state
    self._set(shape, dtype, bool(fortran), raw)

  def _set(self, shape, dtype, fortran, raw) -> None:
    if not (isinstance(shape, tuple)
            and all(type(s) is int and s >= 0 for s in shape)):
      raise _Refused(f"bad ndarray shape {shape!r:.80}")
    if not isinstance(dtype, _DtypeStub):
      raise _Refused("ndarray dtype is not a numpy.dtype")
    if isinstance(raw, str):  # bytes written as text, one char per byte
      raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
      raise _Refused(
          f"ndarray data must be bytes, not {type(raw).__name__}")
    self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, raw

  def to_numpy(self) -> np.ndarray:
    if self.raw is None:
      raise ValueError("an ndarray in the file has no data")
    dtype = self.dtype.to_numpy()
    expected = math.prod(self.shape) * dtype.itemsize
    if len(self.raw) != expected:
      raise ValueError(f"an ndarray of shape {self.shape} and dtype {dtype} "
                       f"holds {len(self.raw)} bytes, not {expected}")
    flat = np.frombuffer(self.raw, dtype=dtype)
    return flat.reshape(self.shape, order="F" if self.fortran else "C").copy()


class _Callable(_Stub):
  """A stand-in global that can be called (REDUCE) but not built on."""

  __slots__ = ("_fn", "_name")

  def __init__(self, fn, name: str):
    object.__setattr__(self, "_fn", fn)
    object.__setattr__(self, "_name", name)

  def __setattr__(self, key, value):
    raise AttributeError(f"{self._name} is read-only")

  def __call__(self, *args):
    return self._fn(*args)


def to_text(v: Any) -> str:
  """Bytes (as latin1) or str as str; anything else is refused."""
  if isinstance(v, bytes):
    return v.decode("latin1")
  if isinstance(v, str):
    return v
  raise _Refused(f"expected a string, got {type(v).__name__}")


_DTYPE_CODE = re.compile(r"[biuf][1248]")


def _reconstruct(subtype, shape, typecode):
  if not isinstance(subtype, _NdarrayType):
    raise _Refused("_reconstruct may only build numpy.ndarray")
  del shape, typecode  # placeholders; BUILD carries the real ones
  return _ArrayStub()


def _frombuffer(buf, dtype, shape, order):
  array = _ArrayStub()
  order = to_text(order)
  if order not in ("C", "F"):
    raise _Refused(f"bad ndarray order {order!r}")
  array._set(shape, dtype, order == "F", buf)
  return array


def _dtype(obj, align=False, copy=False):
  del align, copy
  code = to_text(obj)
  if not _DTYPE_CODE.fullmatch(code):
    raise _Refused(
        f"dtype {code!r:.20} is not allowed (plain numeric dtypes only)")
  return _DtypeStub(code)


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or to_text(encoding).lower() not in (
      "latin1", "latin-1"):
    raise _Refused("_codecs.encode is allowed for latin1 only")
  return text.encode("latin1")


_NDARRAY = _NdarrayType()
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"):
        _Callable(_reconstruct, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"):
        _Callable(_reconstruct, "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"):
        _Callable(_frombuffer, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"):
        _Callable(_frombuffer, "_frombuffer"),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Callable(_dtype, "dtype"),
    ("_codecs", "encode"): _Callable(_codecs_encode, "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves `_SAFE_GLOBALS` only; everything else is an error."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise _Refused(
          f"it refers to {module}.{name}, which a data file has no reason to "
          "use (only NumPy arrays, containers, strings and numbers are "
          "allowed)") from None

  def persistent_load(self, pid: Any) -> Any:
    raise _Refused("persistent ids are not allowed")


_MAX_DEPTH = 32


def _to_plain(obj: Any, done: dict[int, Any], depth: int = 0) -> Any:
  """`obj` with every `_ArrayStub` in it made an ndarray.

  Shared objects are converted once (`done`, by id): a pickle can reference
  one list from many places, and walking each reference would take time
  exponential in the nesting. The depth bound also stops cycles.
  """
  if depth > _MAX_DEPTH:
    raise ValueError(f"containers nested more than {_MAX_DEPTH} deep "
                     "(or a cycle)")
  if id(obj) in done:
    return done[id(obj)]
  if isinstance(obj, _ArrayStub):
    out = obj.to_numpy()
  elif isinstance(obj, _Stub):
    raise ValueError(f"a bare {type(obj).__name__} outside an array")
  elif isinstance(obj, dict):
    out = {k: _to_plain(v, done, depth + 1) for k, v in obj.items()}
  elif isinstance(obj, (list, tuple)):
    out = type(obj)(_to_plain(v, done, depth + 1) for v in obj)
  else:
    return obj
  done[id(obj)] = out
  return out


def restricted_unpickle(path: str | os.PathLike) -> Any:
  """Loads a pickle of plain containers, strings, numbers and NumPy arrays.

  Python 2 strings load as bytes (`encoding='bytes'`, as CIFAR readers do).
  Only the NumPy globals an array pickle needs are resolved, to stand-ins
  that collect (shape, dtype, bytes); arrays are then made with
  `np.frombuffer`, so nothing named in the file is ever called.

  Returns:
    The unpickled object: dicts, lists, tuples, str, bytes, numbers, None and
    ndarrays of plain numeric dtypes.

  Raises:
    DataError: the file is missing, unreadable, truncated, or names any global
      outside the allowed NumPy ones (no code in it is run).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}") from e
  try:
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
  except _Refused as e:
    raise DataError(f"refusing to load {path}: {e}") from e
  except Exception as e:  # truncated, garbage: EOFError, ValueError, ...
    raise DataError(f"{path} is not a readable pickle (truncated or "
                    f"corrupted?): {type(e).__name__}: {e}") from e
  try:
    return _to_plain(obj, {})
  except ValueError as e:
    raise DataError(f"{path} holds a malformed array: {e}") from e
