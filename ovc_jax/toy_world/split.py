"""The toy world's held-out test split, written in the CIFAR-10 layout.

`write_test_split(out)` renders `num_images` images (default 1,000, classes
balanced) from `seeds.heldout_rng(seed)`, a stream training never draws from,
and writes

    <out>/cifar-10-batches-py/test_batch    the images, as CIFAR-10's test_batch
    <out>/cifar-10-batches-py/batches.meta  the class names
    <out>/metadata.npz                      per-image attributes (no pickle)
    <out>/split.json                        what was made, how, and checksums
    <out>/examples.png                      a montage: one row per class

The batches are written by `ovc_jax.datasets.cifar`, which defines the layout;
any CIFAR-10 reader, including `ovc_jax.datasets.load_toy`, reads them. The
command line is `python -m experiments.write_toy_split` (`--export_to_checkpoints`
to replace the shipped split).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovc_jax.datasets import cifar
from ovc_jax.errors import ConfigError, DataError
from ovc_jax.toy_world import captions as captions_lib
from ovc_jax.toy_world import catalog as cat
from ovc_jax.toy_world import rendering as render_lib
from ovc_jax.toy_world import scenes as scenes_lib
from ovc_jax.toy_world import seeds

METADATA = "metadata.npz"
RECORD = "split.json"
MONTAGE = "examples.png"

# Short style names for the montage's cells.
_STYLE_LABELS = ("photo", "blurry", "dark", "b/w", "low contrast",
                 "high contrast", "pixelated", "noisy", "drawing", "sketch",
                 "cartoon")


def balanced_labels(rng: np.random.Generator, num_images: int) -> np.ndarray:
  """int64 `[N]`: each class N // C or N // C + 1 times, in random order."""
  return rng.permutation(np.arange(num_images) % cat.NUM_CLASSES)


def sample_test_split(num_images: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, scenes_lib.Scenes,
                                 list[str]]:
  """Renders the held-out split made with `seed`.

  Returns:
    images: uint8 `[N, 32, 32, 3]`, channels last.
    labels: int64 `[N]`, balanced over the classes.
    scenes: every image's parameters.
    captions: one true caption per image (for inspection, not training).
  """
  if int(num_images) != num_images or num_images < 1:
    raise ConfigError(f"num_images must be a positive int; got {num_images!r}")
  rng = seeds.heldout_rng(seed)
  labels = balanced_labels(rng, int(num_images))
  scenes = scenes_lib.sample_scenes(rng, int(num_images), labels)
  texts = captions_lib.sample_captions(rng, labels, scenes.attributes())
  images = render_lib.to_uint8(render_lib.render(scenes, rng))
  return images, labels, scenes, texts


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes through a temporary file, so readers never see half a file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are data files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def pickle_test_batch(images: np.ndarray, labels: np.ndarray,
                      batch_label: str) -> bytes:
  """The pickled CIFAR-10 `test_batch` of uint8 `images [N, H, W, 3]`."""
  names = [f"toy_{cat.TOY_CLASSES[k]}_{i:06d}.png"
           for i, k in enumerate(labels.tolist())]
  return cifar.pickle_cifar_batch(images, labels, batch_label, names)


def pickle_meta(num_cases: int, num_vis: int) -> bytes:
  """The pickled CIFAR-10 `batches.meta` with the toy class names."""
  return cifar.pickle_cifar_meta(cat.TOY_CLASSES, num_cases, num_vis)


def _counts(values: np.ndarray, names: Sequence[str],
            missing: str | None = None) -> dict[str, int]:
  counter = collections.Counter(np.asarray(values).tolist())
  out = {name: int(counter.get(i, 0)) for i, name in enumerate(names)}
  if missing is not None:
    out[missing] = int(counter.get(cat.NO_COLOUR, 0))
  return out


def montage(images: np.ndarray, labels: np.ndarray, styles: np.ndarray,
            per_class: int = 8, scale: int = 3) -> Image.Image:
  """A grid image: one row per class, its first `per_class` images.

  Each cell is an image enlarged `scale` times (nearest neighbour, so the
  real pixels show) with its style written under it; rows are labelled with
  the class name.
  """
  font = ImageFont.load_default()
  side = images.shape[1] * scale
  label_w, text_h, pad = 72, 12, 4
  cell_w, cell_h = side + pad, side + text_h + pad
  canvas = Image.new("RGB", (label_w + per_class * cell_w,
                             cat.NUM_CLASSES * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  for k, name in enumerate(cat.TOY_CLASSES):
    y = k * cell_h
    draw.text((4, y + side // 2 - 6), name, fill="black", font=font)
    for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
      x = label_w + j * cell_w
      cell = Image.fromarray(images[i]).resize((side, side),
                                                 Image.Resampling.NEAREST)
      canvas.paste(cell, (x, y))
      draw.text((x, y + side), _STYLE_LABELS[styles[i]], fill="black",
                font=font)
  return canvas


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """An `.npz` archive of `arrays`, byte-reproducible (unlike `np.savez`).

  `np.savez` stamps each member with the current time; here every member has
  a fixed timestamp, so the same arrays always give the same bytes (and the
  same checksum in split.json). Loads with `np.load(..., allow_pickle=False)`.
  """
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
    for name, array in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      with archive.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
  return buffer.getvalue()


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def write_test_split(out_dir: str | os.PathLike, num_images: int = 1000,
                     seed: int = 0, write_montage: bool = True
                     ) -> dict[str, Any]:
  """Renders the held-out split and writes it under `out_dir` (see module doc).

  Args:
    out_dir: the folder to write (created if missing; files replaced).
    num_images: N, balanced over the classes.
    seed: the split's seed (`seeds.heldout_rng(seed)`).
    write_montage: also write `examples.png`.

  Returns:
    The record written to `split.json`.
  """
  out = pathlib.Path(out_dir)
  images, labels, scenes, texts = sample_test_split(num_images, seed)
  n = len(labels)
  batch_name = f"{cifar.CIFAR10_DIRNAME}/{cifar.CIFAR10_TEST_BATCH}"
  meta_name = f"{cifar.CIFAR10_DIRNAME}/{cifar.CIFAR10_META}"
  try:
    (out / cifar.CIFAR10_DIRNAME).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create {out / cifar.CIFAR10_DIRNAME}: {e}") from e

  batch = pickle_test_batch(
      images, labels,
      f"testing batch 1 of 1 ({cat.GENERATOR_VERSION}, seed {seed})")
  meta = pickle_meta(n, cifar.cifar_rows(images[:1]).shape[1])
  attributes = scenes.attributes()
  matches = captions_lib.template_matches(attributes)
  arrays = {
      "label": labels,
      "style": attributes["style"],
      "colour": attributes["colour"],
      "size": attributes["size"],
      "background": attributes["background"],
      "radius": attributes["radius"],
      "center": attributes["center"],
      "angle": attributes["angle"],
      "template_matches": matches,
      "caption": np.array(texts),
      "class_names": np.array(cat.TOY_CLASSES),
      "style_names": np.array(cat.STYLES),
      "colour_names": np.array(cat.COLOURS),
      "size_names": np.array(cat.SIZES),
      "background_names": np.array(cat.BACKGROUNDS),
      "templates": np.array(captions_lib.TOY_TEMPLATES),
  }
  metadata = npz_bytes(arrays)
  _write_atomic(out / batch_name, batch)
  _write_atomic(out / meta_name, meta)
  _write_atomic(out / METADATA, metadata)

  record = {
      "generator_version": cat.GENERATOR_VERSION,
      "split": "test",
      "seed": int(seed),
      "seed_scheme": (
          "numpy Generator(PCG64(SeedSequence((tag, seed, index)))), every "
          "word in [0, 2**32); test split: tag TEST_TAG=0x54455354, index 0; "
          "training batch `step`: tag TRAIN_TAG=0x54524149, index step; so "
          "the two streams never share a seed (ovc_jax/toy_world/seeds.py)"),
      "num_images": n,
      "image_size": cat.IMAGE_SIZE,
      "class_names": list(cat.TOY_CLASSES),
      "class_counts": _counts(labels, cat.TOY_CLASSES),
      "style_counts": _counts(attributes["style"], cat.STYLES),
      "colour_counts": _counts(attributes["colour"], cat.COLOURS, "none"),
      "size_counts": _counts(attributes["size"], cat.SIZES),
      "background_counts": _counts(attributes["background"],
                                   cat.BACKGROUNDS),
      "templates": list(captions_lib.TOY_TEMPLATES),
      "template_support": dict(zip(captions_lib.TOY_TEMPLATES,
                                   matches.sum(axis=0).tolist())),
      "files": {
          batch_name: _sha256(batch),
          meta_name: _sha256(meta),
          METADATA: _sha256(metadata),
      },
      "pickle_protocol": cifar.PICKLE_PROTOCOL,
      "numpy_version": np.__version__,
  }
  if write_montage:
    picture = montage(images, labels, attributes["style"])
    picture.save(out / MONTAGE)
  _write_atomic(out / RECORD,
                (json.dumps(record, indent=2) + "\n").encode("utf-8"))
  return record
