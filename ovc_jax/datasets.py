"""Datasets to certify: CIFAR-10, ImageNet, image folders and the toy world.

Every dataset has one interface (`Dataset`): `name`, `class_names`, `labels`,
`len(ds)` and `ds[i] -> (image, label)` with the image float32 `[H, W, 3]` in
[0, 1], channels last, and the label an int (-1 where a folder has no classes).
`load_dataset(name, root, split)` builds one by name.

CIFAR-10 comes as pickled batches (`cifar-10-batches-py/`). Unpickling runs
whatever code a file names, so the batches are read with a restricted
unpickler that resolves only the few NumPy globals an array pickle needs, each
mapped to a stand-in of ours that merely collects (shape, dtype, bytes); the
array is made afterwards with `np.frombuffer`. Any other global (`os.system`,
`builtins.eval`, ...) fails the load with a `DataError`; nothing in the file
is ever called. The toy world's test split uses the same layout and reader,
with its own class names and counts.

ImageNet and image folders are read lazily, one decoded image per `ds[i]`,
ordered as torchvision's `ImageFolder` orders them (Cohen et al. certify
`ImageFolder(".../val")`): class folders sorted by name, files sorted within.

Cohen et al. certify every `skip`-th test image; `subsample_indices` is their
`certify.py` loop, quirks included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import operator
import os
import pathlib
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ovc_jax import prompts
from ovc_jax.errors import ConfigError, DataError

DATASET_NAMES = ("cifar10", "imagenet", "folder", "toy")

# Cohen et al.'s `--skip`: 500 images from each full test set.
DEFAULT_SKIP = {"cifar10": 20, "imagenet": 100}

# Where `load_dataset(name, None)` looks: under the repository's checkpoints/
# (checkpoints/downloads/ is git-ignored). ImageNet and folders have no
# default: their root is required.
_REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ROOTS = {"cifar10": str(_REPO / "checkpoints" / "downloads"),
                 "toy": str(_REPO / "checkpoints" / "toy_world")}

# The official archive. MD5 as published on the CIFAR page; SHA-256 and size
# as pinned by Keras' `cifar10.load_data` (tensorflow/python/keras/datasets).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SHA256 = (
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
CIFAR10_ARCHIVE_BYTES = 170_498_071
CIFAR10_ARCHIVE_NAME = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_META = "batches.meta"

# Files torchvision's ImageFolder accepts (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp")

# Cohen et al.'s ImageNet transform: Resize(256) then CenterCrop(224).
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
IMAGENET_NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


# --------------------------------------------------------------------------
# The common interface.


@runtime_checkable
class Dataset(Protocol):
  """What every dataset offers.

  Attributes:
    name: 'cifar10', 'imagenet', 'folder' or 'toy'.
    class_names: one name per class, in label order.
    labels: int64 `[N]`, every item's label without decoding its image; -1
      where the dataset has no classes (a flat image folder).
  """

  name: str
  class_names: tuple[str, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    """(image float32 [H, W, 3] in [0, 1], label)."""
    ...


def _check_index(index: Any, size: int) -> int:
  """A sequence index in [-size, size) as a non-negative int."""
  try:
    i = operator.index(index)
  except TypeError as e:
    raise TypeError(f"dataset indices must be integers; got "
                    f"{type(index).__name__}") from e
  if not -size <= i < size:
    # IndexError, not DataError: `for x in ds` relies on it to stop.
    raise IndexError(f"index {i} out of range for a dataset of {size} items")
  return i % size


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A dataset held in memory as uint8 images (CIFAR-10, the toy world).

  Attributes:
    name: the dataset's name.
    images: uint8 `[N, H, W, 3]`, channels last.
    labels: int64 `[N]`.
    class_names: one name per class.
    source: the folder or file it was read from (for messages).
  """

  name: str
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  source: str = ""

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    i = _check_index(index, len(self))
    return self.images[i].astype(np.float32) / 255.0, int(self.labels[i])


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFileDataset:
  """Images decoded from files one at a time, on `ds[i]`.

  Attributes:
    name: the dataset's name.
    paths: one image file per item.
    labels: int64 `[N]` (-1: no class).
    class_names: one name per class (empty for a flat folder).
    image_size: side of the centre crop; None keeps the (resized) image whole.
    resize_size: the shorter side is resized to this first; None: to
      `image_size`, or no resizing when both are None.
    interpolation: 'bilinear' or 'bicubic' (PIL's filters, as torchvision
      applies them to PIL images).
    source: the folder it was read from.
  """

  name: str
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  image_size: int | None = None
  resize_size: int | None = None
  interpolation: str = "bilinear"
  source: str = ""

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    i = _check_index(index, len(self))
    image = load_image(self.paths[i], image_size=self.image_size,
                       resize_size=self.resize_size,
                       interpolation=self.interpolation)
    return image, int(self.labels[i])


# --------------------------------------------------------------------------
# Restricted unpickling of CIFAR batches.
#
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
    byteorder = _text(state[1])
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


def _text(v: Any) -> str:
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
  order = _text(order)
  if order not in ("C", "F"):
    raise _Refused(f"bad ndarray order {order!r}")
  array._set(shape, dtype, order == "F", buf)
  return array


def _dtype(obj, align=False, copy=False):
  del align, copy
  code = _text(obj)
  if not _DTYPE_CODE.fullmatch(code):
    raise _Refused(
        f"dtype {code!r:.20} is not allowed (plain numeric dtypes only)")
  return _DtypeStub(code)


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or _text(encoding).lower() not in (
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


# --------------------------------------------------------------------------
# CIFAR-10 batches.


def _str_keys(obj: Any, path: str, what: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise DataError(f"{path} is not a {what}: it holds a "
                    f"{type(obj).__name__}, not a dict")
  out = {}
  for k, v in obj.items():
    if isinstance(k, (bytes, str)):
      out[_text(k)] = v
  return out


def _as_array(obj: Any) -> np.ndarray:
  """An ndarray or a list of ints as an ndarray; ValueError otherwise."""
  if isinstance(obj, np.ndarray):
    return obj
  if isinstance(obj, (list, tuple)):
    if not all(type(v) is int for v in obj):
      raise ValueError("a list holds something other than integers")
    return np.asarray(obj, dtype=np.int64)
  raise ValueError(f"expected an array, got {type(obj).__name__}")


def read_cifar_batch(path: str | os.PathLike, *, num_classes: int | None = 10,
                     image_size: int | None = 32,
                     what: str = "CIFAR-10 batch"
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Reads one `cifar-10-batches-py` batch (`test_batch`, `data_batch_k`).

  Args:
    path: the batch file.
    num_classes: labels must lie in [0, num_classes); None: any label >= 0.
    image_size: side of the square images; None: inferred from the row
      length (3 * side^2).
    what: how messages name the expected format.

  Returns:
    images: uint8 `[N, side, side, 3]`, channels last (the file stores each
      row channel-planar: 1024 red, then green, then blue values).
    labels: int64 `[N]`.

  Raises:
    DataError: `'<path> is not a <what>: <why>'`, or an unreadable file.
  """
  path = os.fspath(path)
  batch = _str_keys(restricted_unpickle(path), path, what)

  def bad(why: str) -> DataError:
    return DataError(f"{path} is not a {what}: {why}")

  missing = [k for k in ("data", "labels") if k not in batch]
  if missing:
    raise bad(f"it has no {' or '.join(repr(k) for k in missing)} entry "
              f"(keys: {sorted(batch)})")
  try:
    data = _as_array(batch["data"])
    labels = _as_array(batch["labels"])
  except ValueError as e:
    raise bad(str(e)) from e
  if data.dtype != np.uint8 or data.ndim != 2:
    raise bad(f"'data' must be uint8 [N, 3072]; got {data.dtype} "
              f"{list(data.shape)}")
  n, row = data.shape
  side = image_size or int(round((row / 3) ** 0.5))
  if row != 3 * side * side or side < 1:
    raise bad(f"'data' rows hold {row} values, not 3 x {side} x {side}")
  if labels.ndim != 1 or labels.shape[0] != n:
    raise bad(f"{labels.shape[0] if labels.ndim else 'no'} labels for {n} "
              "images")
  if not np.issubdtype(labels.dtype, np.integer):
    raise bad(f"labels must be integers; got {labels.dtype}")
  labels = labels.astype(np.int64)
  if n and (labels.min() < 0 or (num_classes is not None
                                 and labels.max() >= num_classes)):
    limit = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
    raise bad(f"labels must lie in {limit}; found {labels.min()}.."
              f"{labels.max()}")
  images = data.reshape(n, 3, side, side).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def read_cifar_meta(path: str | os.PathLike,
                    what: str = "CIFAR-10 batches.meta") -> tuple[str, ...]:
  """The class names (`label_names`) of a `batches.meta` file."""
  path = os.fspath(path)
  meta = _str_keys(restricted_unpickle(path), path, what)
  names = meta.get("label_names")
  if not isinstance(names, list) or not names or not all(
      isinstance(s, (bytes, str)) for s in names):
    raise DataError(f"{path} is not a {what}: 'label_names' must be a "
                    "non-empty list of strings")
  try:
    return tuple(s.decode("utf-8") if isinstance(s, bytes) else s
                 for s in names)
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not a {what}: a class name is not UTF-8: "
                    f"{e}") from e


def find_cifar_folder(root: str | os.PathLike) -> pathlib.Path:
  """`root/cifar-10-batches-py`, or `root` itself when it holds the batches."""
  root = pathlib.Path(root)
  if (root / CIFAR10_DIRNAME).is_dir():
    return root / CIFAR10_DIRNAME
  if (root / CIFAR10_META).is_file() or (root / CIFAR10_TEST_BATCH).is_file():
    return root
  where = "does not exist" if not root.exists() else "has no CIFAR batches"
  raise DataError(
      f"{root} {where}: expected the extracted {CIFAR10_ARCHIVE_NAME}, i.e. "
      f"{root / CIFAR10_DIRNAME}/ holding {CIFAR10_TEST_BATCH}, "
      f"data_batch_1..5 and {CIFAR10_META} (download {CIFAR10_URL} and "
      f"extract it there, or pass download=True)")


def read_cifar_folder(folder: str | os.PathLike, split: str = "test", *,
                      num_classes: int | None = 10,
                      image_size: int | None = 32,
                      what: str = "CIFAR-10 batch"
                      ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """Reads a split of a `cifar-10-batches-py` folder.

  Args:
    folder: the folder holding the batches and `batches.meta`.
    split: 'test' (`test_batch`) or 'train' (`data_batch_1..5`, in order).
    num_classes: the class count `batches.meta` must have; None: whatever it
      lists (the toy world).
    image_size: see `read_cifar_batch`.
    what: how messages name the expected format.

  Returns:
    (images uint8 [N, H, W, 3], labels int64 [N], class names).
  """
  folder = pathlib.Path(folder)
  if split == "test":
    names = (CIFAR10_TEST_BATCH,)
  elif split == "train":
    names = CIFAR10_TRAIN_BATCHES
  else:
    raise ConfigError(f"CIFAR split must be 'test' or 'train'; got {split!r}")
  for name in (CIFAR10_META,) + names:
    if not (folder / name).is_file():
      raise DataError(
          f"{folder / name} is missing: a {CIFAR10_DIRNAME} folder holds "
          f"{CIFAR10_TEST_BATCH}, data_batch_1..5 and {CIFAR10_META}")
  class_names = read_cifar_meta(folder / CIFAR10_META, what=f"{what} meta")
  if num_classes is not None and len(class_names) != num_classes:
    raise DataError(f"{folder / CIFAR10_META} is not a {what} meta: it lists "
                    f"{len(class_names)} classes, not {num_classes}")
  parts = [read_cifar_batch(folder / name, num_classes=len(class_names),
                            image_size=image_size, what=what)
           for name in names]
  if len({p[0].shape[1:] for p in parts}) > 1:
    raise DataError(f"the batches in {folder} have different image sizes")
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  return images, labels, class_names


def load_cifar10(root: str | os.PathLike, split: str = "test", *,
                 download: bool = False, **download_kw) -> ArrayDataset:
  """CIFAR-10 from `root/cifar-10-batches-py` (or `root` itself).

  Args:
    root: the folder holding `cifar-10-batches-py/`.
    split: 'test' (10,000 images) or 'train' (50,000).
    download: fetch and extract the official archive into `root` first if
      the folder is not there (see `download_cifar10`).
    **download_kw: `url`, `md5`, `sha256`, `timeout` for `download_cifar10`.
  """
  if download:
    download_cifar10(root, **download_kw)
  elif download_kw:
    raise ConfigError(f"{sorted(download_kw)} only apply with download=True")
  folder = find_cifar_folder(root)
  images, labels, names = read_cifar_folder(folder, split)
  return ArrayDataset("cifar10", images, labels, names, str(folder))


def load_toy(root: str | os.PathLike, split: str = "test") -> ArrayDataset:
  """The toy world's split, stored like CIFAR-10 under `root`.

  Class names and count come from its `batches.meta`; the image side from the
  rows' length (3 * side^2).
  """
  folder = pathlib.Path(root)
  if not (folder / CIFAR10_DIRNAME).is_dir() and not (
      folder / CIFAR10_META).is_file():
    raise DataError(
        f"no toy-world data at {folder}: expected {folder / CIFAR10_DIRNAME}/"
        f" with {CIFAR10_TEST_BATCH} and {CIFAR10_META} in the CIFAR-10 "
        "layout (the toy world's data generator writes it there)")
  folder = find_cifar_folder(folder)
  images, labels, names = read_cifar_folder(
      folder, split, num_classes=None, image_size=None,
      what="toy-world batch in the CIFAR-10 layout")
  return ArrayDataset("toy", images, labels, names, str(folder))


# --------------------------------------------------------------------------
# Downloading and extracting the CIFAR-10 archive.


def _hashes(path: str | os.PathLike) -> tuple[str, str]:
  # MD5 only checks integrity here (FIPS builds need the flag to allow it).
  md5 = hashlib.md5(usedforsecurity=False)
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      md5.update(chunk)
      sha.update(chunk)
  return md5.hexdigest(), sha.hexdigest()


def _checksum_problem(got: tuple[str, str], md5: str | None,
                      sha256: str | None) -> str | None:
  if md5 is not None and got[0] != md5.lower():
    return f"MD5 {got[0]}, expected {md5}"
  if sha256 is not None and got[1] != sha256.lower():
    return f"SHA-256 {got[1]}, expected {sha256}"
  return None


def _fetch(url: str, dest: pathlib.Path,
           timeout: float) -> tuple[str, tuple[str, str]]:
  """Streams `url` into a temporary file next to `dest`.

  Returns the temporary file's path and its (MD5, SHA-256) hex digests.

  The temporary file is renamed to `dest` by the caller once verified; on any
  error it is removed, so `dest` is never half-written.
  """
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                             dir=dest.parent)
  # MD5 only checks integrity here (FIPS builds need the flag to allow it).
  md5 = hashlib.md5(usedforsecurity=False)
  sha = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
        url, timeout=timeout) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        md5.update(chunk)
        sha.update(chunk)
        out.write(chunk)
  except BaseException:
    os.unlink(tmp)
    raise
  return tmp, (md5.hexdigest(), sha.hexdigest())


def download_cifar10(root: str | os.PathLike, *, url: str = CIFAR10_URL,
                     md5: str | None = CIFAR10_MD5,
                     sha256: str | None = CIFAR10_SHA256,
                     timeout: float = 60.0,
                     max_extracted_bytes: int = 1 << 30) -> pathlib.Path:
  """Downloads, verifies and safely extracts the CIFAR-10 archive into `root`.

  Does nothing when `root/cifar-10-batches-py/` already exists. Otherwise the
  archive is streamed to a temporary file, checked against `md5` and `sha256`
  and only then renamed to `root/cifar-10-python.tar.gz` (an archive already
  there is checked, not downloaded again). It is extracted into a temporary
  folder by `safe_extract_tar`, and the `cifar-10-batches-py` folder is renamed
  into place only when the whole archive is out.

  Args:
    root: folder to put the archive and `cifar-10-batches-py/` in.
    url: where to download from ('https' or 'file' URL; tests use file://).
    md5, sha256: expected hex digests; at least one must be given.
    timeout: socket timeout in seconds.
    max_extracted_bytes: refuse archives that unpack to more (tar bombs).

  Returns:
    The `cifar-10-batches-py` folder.

  Raises:
    ConfigError: a URL of another scheme, or no checksum.
    DataError: download failed, checksum mismatch, or an unsafe archive.
  """
  root = pathlib.Path(root)
  target = root / CIFAR10_DIRNAME
  if target.is_dir():
    return target
  scheme = urllib.parse.urlsplit(url).scheme
  if scheme not in ("https", "file"):
    raise ConfigError(f"CIFAR-10 URL must be https:// or file://; got {url}")
  if md5 is None and sha256 is None:
    raise ConfigError("refusing to download without an MD5 or SHA-256")
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create {root}: {e.strerror or e}") from e

  archive = root / CIFAR10_ARCHIVE_NAME
  if archive.is_file():
    problem = _checksum_problem(_hashes(archive), md5, sha256)
    if problem:
      raise DataError(f"{archive} has {problem}: delete it so that it can be "
                      "downloaded again")
  else:
    try:
      tmp, got = _fetch(url, archive, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      raise DataError(
          f"cannot download {url}: {reason}. Without network, fetch it "
          f"elsewhere and put it at {archive} (or extract it to {target})"
      ) from e
    problem = _checksum_problem(got, md5, sha256)
    if problem:
      os.unlink(tmp)
      raise DataError(f"the download of {url} has {problem}: it is corrupted "
                      "or not the official archive; nothing was kept")
    os.replace(tmp, archive)

  staging = pathlib.Path(tempfile.mkdtemp(prefix=".cifar-10-extract.",
                                          dir=root))
  try:
    safe_extract_tar(archive, staging, max_bytes=max_extracted_bytes)
    extracted = staging / CIFAR10_DIRNAME
    if not (extracted / CIFAR10_TEST_BATCH).is_file():
      raise DataError(f"{archive} has no {CIFAR10_DIRNAME}/"
                      f"{CIFAR10_TEST_BATCH}: it is not the CIFAR-10 archive")
    try:
      os.replace(extracted, target)
    except OSError as e:
      raise DataError(f"cannot move the extracted data to {target}: "
                      f"{e.strerror or e}") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _member_kind(m: tarfile.TarInfo) -> str:
  if m.issym():
    return "a symbolic link"
  if m.islnk():
    return "a hard link"
  if m.isdev():
    return "a device or FIFO"
  return "not a regular file or folder"


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike, *,
                     max_bytes: int = 1 << 30) -> None:
  """Extracts regular files and folders of a tar archive into `dest`.

  Every member is checked before anything is written, and the whole archive
  is refused if one member has an absolute path, a '..' component, a path
  that resolves outside `dest`, or is a link, device or FIFO, or if the files
  add up to more than `max_bytes`. Files are written by copying their bytes
  (never with tarfile's own extraction), without their modes or owners.

  Raises:
    DataError: naming the archive and the offending member.
  """
  archive = os.fspath(archive)
  dest = pathlib.Path(dest).resolve()
  try:
    with tarfile.open(archive, "r:*") as tar:
      members = tar.getmembers()
      total = 0
      for m in members:
        name = m.name
        if not (m.isfile() or m.isdir()):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          f"is {_member_kind(m)}")
        parts = pathlib.PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name)
            or ".." in parts or "\\" in name):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          "has an absolute path or '..'")
        out = (dest / name).resolve()
        if dest not in out.parents and not (m.isdir() and out == dest):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          f"would land outside {dest}")
        total += max(m.size, 0)
        if total > max_bytes:
          raise DataError(f"refusing to extract {archive}: it unpacks to "
                          f"more than {max_bytes} bytes")
      for m in members:
        out = dest / m.name
        if m.isdir():
          out.mkdir(parents=True, exist_ok=True)
          continue
        out.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        # 'xb': a repeated member name is an error, not an overwrite.
        with src, open(out, "xb") as f:
          shutil.copyfileobj(src, f)
  except DataError:
    raise
  except FileExistsError as e:
    raise DataError(f"refusing to extract {archive}: member "
                    f"{e.filename} appears twice") from e
  except (tarfile.TarError, OSError, EOFError, ValueError) as e:
    raise DataError(f"cannot extract {archive} (truncated or not a tar "
                    f"archive?): {e}") from e


# --------------------------------------------------------------------------
# Image files: ImageNet and folders.


def load_image(path: str | os.PathLike, *, image_size: int | None = None,
               resize_size: int | None = None,
               interpolation: str = "bilinear") -> np.ndarray:
  """Decodes an image file to float32 `[H, W, 3]` in [0, 1].

  As torchvision's `Resize(resize_size)` and `CenterCrop(image_size)` do on a
  PIL image: convert to RGB; scale the shorter side to `resize_size` (the
  longer one to `int(resize_size * long / short)`) with PIL's filter; crop the
  centre square, its corner at `round((side - image_size) / 2)`.

  Args:
    path: the image file (any format PIL reads).
    image_size: side of the centre crop; None: no crop.
    resize_size: shorter side after resizing; None: `image_size` (no resizing
      when both are None).
    interpolation: 'bilinear' or 'bicubic'.

  Raises:
    DataError: the file is missing or cannot be decoded.
  """
  path = os.fspath(path)
  if interpolation not in _RESAMPLE:
    raise ConfigError(f"interpolation must be one of {sorted(_RESAMPLE)}; got "
                      f"{interpolation!r}")
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")  # decodes; CMYK and grey JPEGs exist in ImageNet
  except FileNotFoundError as e:
    raise DataError(f"image file {path} does not exist") from e
  except (OSError, ValueError, SyntaxError, EOFError,
          Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode image file {path}: {e}") from e
  resize_size = resize_size or image_size
  if resize_size is not None:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    size = (resize_size, new_long) if w <= h else (new_long, resize_size)
    if size != (w, h):
      img = img.resize(size, _RESAMPLE[interpolation])
  if image_size is not None:
    w, h = img.size
    top = int(round((h - image_size) / 2.0))
    left = int(round((w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
  return np.asarray(img, dtype=np.float32) / 255.0


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: pathlib.Path) -> list[str]:
  """Image files under `folder`, at any depth, in ImageFolder's order."""
  found = []
  for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
    found.extend(os.path.join(dirpath, f) for f in sorted(files)
                 if _is_image(f))
  return found


def _check_sizes(image_size: int | None, resize_size: int | None) -> None:
  for name, v in (("image_size", image_size), ("resize_size", resize_size)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                          or v < 1):
      raise ConfigError(f"{name} must be a positive integer or None; got {v!r}")
  if image_size and resize_size and resize_size < image_size:
    raise ConfigError(f"resize_size {resize_size} is smaller than the crop "
                      f"image_size {image_size}")


def _scan_classes(root: pathlib.Path
                  ) -> tuple[list[str], list[str], np.ndarray]:
  """(sorted class folders, image paths, labels) of a class-folder layout."""
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  paths, labels, empty = [], [], []
  for label, c in enumerate(classes):
    found = _images_under(root / c)
    if not found:
      empty.append(c)
    paths.extend(found)
    labels.extend([label] * len(found))
  if empty:
    raise DataError(
        f"{len(empty)} class folder(s) under {root} hold no images "
        f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); "
        f"image files end in {', '.join(IMAGE_EXTENSIONS)}")
  return classes, paths, np.asarray(labels, dtype=np.int64)


def load_image_folder(root: str | os.PathLike, *,
                      image_size: int | None = None,
                      resize_size: int | None = None,
                      interpolation: str = "bilinear",
                      class_names: Sequence[str] | None = None,
                      name: str = "folder") -> ImageFileDataset:
  """Images in `root`, either directly or in one subfolder per class.

  Class subfolders: label = position of the folder in sorted order, images
  found at any depth inside it (torchvision's ImageFolder); class names are
  the folder names unless `class_names` (one per folder) is given. Images
  directly in `root`: labels are -1 (unknown) and class names are
  `class_names` or empty. A folder with both is refused as ambiguous.

  Args:
    root: the folder.
    image_size, resize_size, interpolation: see `load_image`; None sizes keep
      each image's own size.
    class_names: display names of the classes.
    name: the dataset's name.
  """
  root = pathlib.Path(root)
  _check_sizes(image_size, resize_size)
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist: expected images "
                    "directly in it, or one subfolder of images per class")
  subdirs = [e.name for e in os.scandir(root) if e.is_dir()]
  flat = sorted(e.name for e in os.scandir(root)
                if e.is_file() and _is_image(e.name))
  if subdirs and flat:
    raise DataError(f"{root} holds both image files and subfolders: put "
                    "images either directly in it or in one subfolder per "
                    "class, not both")
  if subdirs:
    classes, paths, labels = _scan_classes(root)
  else:
    if not flat:
      raise DataError(f"image folder {root} is empty: expected image files "
                      f"({', '.join(IMAGE_EXTENSIONS)}) directly in it or in "
                      "one subfolder per class")
    classes, paths = [], [str(root / f) for f in flat]
    labels = np.full(len(paths), -1, dtype=np.int64)
  if class_names is not None:
    class_names = prompts.validate_class_names(class_names)
    if classes and len(class_names) != len(classes):
      raise ConfigError(f"{len(class_names)} class names given for the "
                        f"{len(classes)} class folders of {root}")
    classes = class_names
  return ImageFileDataset(name, tuple(paths), labels, tuple(classes),
                          image_size, resize_size, interpolation, str(root))


def find_imagenet_folder(root: str | os.PathLike,
                         split: str = "val") -> pathlib.Path:
  """`root/<split>` if present, else `root`; must hold 1000 wnid folders."""
  root = pathlib.Path(root)
  folder = root / split if (root / split).is_dir() else root
  layout = (f"expected the ImageNet {split} images sorted into 1000 "
            f"folders named by WordNet id (n01440764/, ..., n15075141/) in "
            f"{root} or {root / split}")
  if not folder.is_dir():
    raise DataError(f"{root} does not exist: {layout}")
  subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir())
  wnids = [d for d in subdirs if _WNID.fullmatch(d)]
  if len(wnids) != IMAGENET_NUM_CLASSES or len(subdirs) != len(wnids):
    hint = ""
    if not subdirs and any(_is_image(e.name) for e in os.scandir(folder)):
      hint = (" (the images lie unsorted in one folder: move each into its "
              "class's wnid folder, e.g. with the widely used valprep.sh)")
    others = [d for d in subdirs if not _WNID.fullmatch(d)]
    found = f"found {len(wnids)} wnid folders"
    if others:
      found += f" and other folders ({', '.join(others[:5])})"
    raise DataError(f"{folder} is not an ImageNet {split} folder: {found}; "
                    f"{layout}{hint}")
  return folder


def load_imagenet(root: str | os.PathLike, split: str = "val", *,
                  interpolation: str = "bilinear") -> ImageFileDataset:
  """ImageNet as Cohen et al. certify it, one image decoded per `ds[i]`.

  Class index = position of the wnid folder in sorted order (the standard
  order, which CLIP's `IMAGENET_CLASSES` follows); items ordered as
  ImageFolder orders them, so `subsample_indices(50000, 100)` picks Cohen's
  500 images. Each image: RGB, shorter side resized to 256 (bilinear by
  default: torchvision's `Resize` default, which Cohen's code uses), centre
  crop 224, scaled to [0, 1].
  """
  folder = find_imagenet_folder(root, split)
  ds = load_image_folder(folder, image_size=IMAGENET_CROP,
                         resize_size=IMAGENET_RESIZE,
                         interpolation=interpolation, name="imagenet")
  return dataclasses.replace(ds, class_names=tuple(prompts.IMAGENET_CLASSES))


# --------------------------------------------------------------------------
# By name, and Cohen's subsampling.


def load_dataset(name: str, root: str | os.PathLike | None = None,
                 split: str = "test", **kwargs) -> Dataset:
  """Builds a dataset by name.

  Args:
    name: 'cifar10', 'imagenet', 'folder' or 'toy'.
    root: where it lies; None: `DEFAULT_ROOTS[name]` (cifar10, toy).
      cifar10 and toy: the folder holding `cifar-10-batches-py/` (or that
      folder itself). imagenet: the folder with the 1000 wnid folders, or its
      parent holding `val/` (`train/`). folder: the image folder.
    split: 'test' or 'train'. ImageNet's 'test' is its validation set (`val`,
      what Cohen et al. certify). Ignored for 'folder'.
    **kwargs: cifar10: `download`, `url`, `md5`, `sha256`, `timeout`;
      imagenet: `interpolation`; folder: `image_size`, `resize_size`,
      `interpolation`, `class_names`.

  Raises:
    ConfigError: unknown name, split or keyword; no root where one is needed.
    DataError: the data is missing or malformed (the message says what layout
      is expected where).
  """
  allowed = {"cifar10": {"download", "url", "md5", "sha256", "timeout"},
             "imagenet": {"interpolation"},
             "folder": {"image_size", "resize_size", "interpolation",
                        "class_names"},
             "toy": set()}
  if name not in allowed:
    raise ConfigError(f"unknown dataset {name!r}; known: {DATASET_NAMES}")
  unknown = set(kwargs) - allowed[name]
  if unknown:
    raise ConfigError(f"dataset {name!r} takes no option(s) {sorted(unknown)}"
                      f"; it takes {sorted(allowed[name]) or 'none'}")
  if split not in ("test", "train", "val"):
    raise ConfigError(f"split must be 'test' or 'train'; got {split!r}")
  if root is None:
    if name not in DEFAULT_ROOTS:
      raise ConfigError(f"dataset {name!r} needs a root folder (data_dir)")
    root = DEFAULT_ROOTS[name]
  if name == "imagenet":
    return load_imagenet(root, "train" if split == "train" else "val",
                         **kwargs)
  if name == "folder":
    return load_image_folder(root, **kwargs)
  split = "test" if split == "val" else split
  if name == "toy":
    return load_toy(root, split)
  return load_cifar10(root, split, **kwargs)


def subsample_indices(num_items: int, skip: int,
                      max_index: int = -1) -> list[int]:
  """The dataset indices Cohen et al.'s `certify.py` certifies.

  Their loop, verbatim:

    for i in range(len(dataset)):
      if i % skip != 0: continue
      if i == max: break

  so `max_index` is an index bound, not a count, and -1 (any negative) means
  none. A quirk kept on purpose: the bound applies only when it is a multiple
  of `skip`; otherwise the loop never meets it and every `skip`-th index is
  taken. Defaults in the paper: skip 20 on CIFAR-10, 100 on ImageNet
  (`DEFAULT_SKIP`), 500 images each.
  """
  for arg, v in (("num_items", num_items), ("skip", skip),
                 ("max_index", max_index)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ConfigError(f"{arg} must be an integer; got {v!r}")
  if skip < 1:
    raise ConfigError(f"skip must be >= 1; got {skip}")
  if num_items < 0:
    raise ConfigError(f"num_items must be >= 0; got {num_items}")
  stop = num_items
  if max_index >= 0 and max_index % skip == 0:
    stop = min(stop, max_index)
  return list(range(0, int(stop), int(skip)))
