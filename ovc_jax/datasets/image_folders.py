"""Image files: decoding with Cohen et al.'s transform, folders and ImageNet.

Folders are scanned as torchvision's `ImageFolder` scans them (Cohen et al.
certify `ImageFolder(".../val")`): class folders sorted by name, files
sorted within.
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
from PIL import Image

from ovc_jax.errors import ConfigError, DataError

# Files torchvision's ImageFolder accepts (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                    ".tiff", ".webp")

# Cohen et al.'s ImageNet transform: Resize(256) then CenterCrop(224).
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
IMAGENET_NUM_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


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


def check_sizes(image_size: int | None, resize_size: int | None) -> None:
  """Checks `load_image`'s sizes: positive ints or None, resize >= crop."""
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


def scan_image_folder(root: str | os.PathLike
                      ) -> tuple[list[str], list[str], np.ndarray]:
  """(class names, image paths, labels) of the images in `root`.

  Class subfolders: label = position of the folder in sorted order, images
  found at any depth inside it (torchvision's ImageFolder); the class names
  are the folder names. Images directly in `root`: labels are -1 (unknown)
  and there are no class names. A folder with both is refused as ambiguous.

  Raises:
    DataError: `root` is missing, empty, ambiguous, or a class folder holds
      no images.
  """
  root = pathlib.Path(root)
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
    return _scan_classes(root)
  if not flat:
    raise DataError(f"image folder {root} is empty: expected image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}) directly in it or in "
                    "one subfolder per class")
  paths = [str(root / f) for f in flat]
  return [], paths, np.full(len(paths), -1, dtype=np.int64)


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
