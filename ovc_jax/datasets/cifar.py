"""CIFAR-10's `cifar-10-batches-py` layout: reading and writing its batches.

A batch (`test_batch`, `data_batch_1..5`) is a protocol-2 pickle, written as
Python 2 wrote CIFAR-10's, of a dict with bytes keys b'batch_label' (bytes),
b'labels' (list of int), b'data' (uint8 ndarray `[N, 3072]`, each row the
red, then green, then blue 32x32 plane, row-major) and b'filenames' (list of
bytes); `batches.meta` holds b'num_cases_per_batch', b'label_names' (list of
bytes) and b'num_vis'. Files are read with `restricted_unpickle`, so nothing
in them is ever called. The toy world's test split uses the same layout, with
its own class names, counts and image size.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import struct
from typing import Any, Sequence

import numpy as np

from ovc_jax.datasets.unpickle import restricted_unpickle, to_text
from ovc_jax.errors import ConfigError, DataError

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
PICKLE_PROTOCOL = 2  # what CIFAR-10's own files use


# --------------------------------------------------------------------------
# Reading.


def _str_keys(obj: Any, path: str, what: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise DataError(f"{path} is not a {what}: it holds a "
                    f"{type(obj).__name__}, not a dict")
  out = {}
  for k, v in obj.items():
    if isinstance(k, (bytes, str)):
      out[to_text(k)] = v
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


# --------------------------------------------------------------------------
# Writing.


def cifar_rows(images: np.ndarray) -> np.ndarray:
  """uint8 `[N, H, W, 3]` -> CIFAR rows `[N, 3 * H * W]` (R, G, B planes)."""
  n = images.shape[0]
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(n, -1))


class _CifarPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles the way CIFAR-10's own files were written (Python 2, protocol 2).

  Python 3 pickles bytes under protocol 2 as `_codecs.encode(text, 'latin1')`
  calls, which load as bytes only; CIFAR-10's Python 2 files hold raw
  (SHORT_)BINSTRINGs, which load as bytes with `encoding='bytes'` and as str
  with `encoding='latin1'` (what torchvision's reader passes). NumPy 2 names
  its array reconstructor `numpy._core.multiarray`, a module NumPy 1 lacks;
  CIFAR-10 names `numpy.core.multiarray`, which both NumPy 1 and 2 resolve.
  Only the pure-Python pickler lets a subclass change how bytes are written.
  """

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def save_bytes(self, obj: bytes) -> None:
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_bytes

  def save_global(self, obj: Any, name: str | None = None) -> None:
    if (getattr(obj, "__module__", None) == "numpy._core.multiarray"
        and getattr(obj, "__name__", None) == "_reconstruct"):
      self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
      self.memoize(obj)
      return
    super().save_global(obj, name)


def _cifar_pickle(obj: Any) -> bytes:
  buffer = io.BytesIO()
  _CifarPickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
  return buffer.getvalue()


def pickle_cifar_batch(images: np.ndarray, labels: np.ndarray,
                       batch_label: str, filenames: Sequence[str]) -> bytes:
  """A pickled batch (see module doc) of uint8 `images [N, H, W, 3]`.

  `batch_label` and `filenames` (one per image) must be ASCII.
  """
  batch = {
      b"batch_label": batch_label.encode("ascii"),
      b"labels": [int(k) for k in labels],
      b"data": cifar_rows(images),
      b"filenames": [f.encode("ascii") for f in filenames],
  }
  return _cifar_pickle(batch)


def pickle_cifar_meta(label_names: Sequence[str], num_cases: int,
                      num_vis: int) -> bytes:
  """A pickled `batches.meta`: ASCII class names, images per batch, row size."""
  meta = {
      b"num_cases_per_batch": int(num_cases),
      b"label_names": [name.encode("ascii") for name in label_names],
      b"num_vis": int(num_vis),
  }
  return _cifar_pickle(meta)
