"""The dataset interface: `Dataset`, its two kinds, and building one by name.

Every dataset has one interface (`Dataset`): `name`, `class_names`, `labels`,
`len(ds)` and `ds[i] -> (image, label)` with the image float32 `[H, W, 3]` in
[0, 1], channels last, and the label an int (-1 where a folder has no classes).
`load_dataset(name, root, split)` builds one by name; ImageNet and folders are
read lazily, one decoded image per `ds[i]`. Cohen et al. certify every
`skip`-th test image; `subsample_indices` is their `certify.py` loop, quirks
included.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import pathlib
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ovc_jax import prompts
from ovc_jax.datasets import cifar
from ovc_jax.datasets.download import download_cifar10
from ovc_jax.datasets import image_folders
from ovc_jax.errors import ConfigError, DataError

DATASET_NAMES = ("cifar10", "imagenet", "folder", "toy")

# Where `load_dataset(name, None)` looks: under the repository's checkpoints/
# (checkpoints/downloads/ is git-ignored). ImageNet and folders have no
# default: their root is required.
_REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_ROOTS = {"cifar10": str(_REPO / "checkpoints" / "downloads"),
                 "toy": str(_REPO / "checkpoints" / "toy_world")}


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
    image = image_folders.load_image(self.paths[i],
                                     image_size=self.image_size,
                                     resize_size=self.resize_size,
                                     interpolation=self.interpolation)
    return image, int(self.labels[i])


# --------------------------------------------------------------------------
# Building each dataset from its files.


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
  folder = cifar.find_cifar_folder(root)
  images, labels, names = cifar.read_cifar_folder(folder, split)
  return ArrayDataset("cifar10", images, labels, names, str(folder))


def load_toy(root: str | os.PathLike, split: str = "test") -> ArrayDataset:
  """The toy world's split, stored like CIFAR-10 under `root`.

  Class names and count come from its `batches.meta`; the image side from the
  rows' length (3 * side^2).
  """
  folder = pathlib.Path(root)
  if not (folder / cifar.CIFAR10_DIRNAME).is_dir() and not (
      folder / cifar.CIFAR10_META).is_file():
    raise DataError(
        f"no toy-world data at {folder}: expected "
        f"{folder / cifar.CIFAR10_DIRNAME}/ with {cifar.CIFAR10_TEST_BATCH} "
        f"and {cifar.CIFAR10_META} in the CIFAR-10 layout (the toy world's "
        "data generator writes it there)")
  folder = cifar.find_cifar_folder(folder)
  images, labels, names = cifar.read_cifar_folder(
      folder, split, num_classes=None, image_size=None,
      what="toy-world batch in the CIFAR-10 layout")
  return ArrayDataset("toy", images, labels, names, str(folder))


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
    image_size, resize_size, interpolation: see `image_folders.load_image`;
      None sizes keep each image's own size.
    class_names: display names of the classes.
    name: the dataset's name.
  """
  root = pathlib.Path(root)
  image_folders.check_sizes(image_size, resize_size)
  classes, paths, labels = image_folders.scan_image_folder(root)
  if class_names is not None:
    class_names = prompts.validate_class_names(class_names)
    if classes and len(class_names) != len(classes):
      raise ConfigError(f"{len(class_names)} class names given for the "
                        f"{len(classes)} class folders of {root}")
    classes = class_names
  return ImageFileDataset(name, tuple(paths), labels, tuple(classes),
                          image_size, resize_size, interpolation, str(root))


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
  folder = image_folders.find_imagenet_folder(root, split)
  ds = load_image_folder(folder, image_size=image_folders.IMAGENET_CROP,
                         resize_size=image_folders.IMAGENET_RESIZE,
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
  (`dataset_settings.DEFAULT_SKIP`), 500 images each.
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
