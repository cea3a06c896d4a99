"""CLIP's image preprocessing as pure, jittable functions.

CLIP resizes the shorter side of an image to the model's input size (bicubic),
crops the centre square and normalises each channel with CLIP's mean and std.
Here those steps are JAX functions of static shapes, so a certifier can put them
inside a jitted computation: noise can then be added either after normalisation
(the default, radius measured in normalised space) or in native [0, 1] pixel
space before resizing (Cohen et al.'s convention).

Images are channels-last, `[..., H, W, 3]`, float, in [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.errors import CheckpointError, ConfigError, InputError

# OpenAI's published normalisation constants (CLIPImageProcessor uses the same).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

NOISE_SPACES = ("normalized", "pixel")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """What CLIP's preprocessing does to an image before the encoder.

  Attributes:
    image_size: side of the square the encoder takes (the centre crop).
    resize_size: the shorter side is resized to this before cropping.
    mean: per-channel mean subtracted after scaling to [0, 1].
    std: per-channel std divided by after subtracting the mean.
    interpolation: `jax.image.resize` method used for resizing.
  """

  image_size: int = 224
  resize_size: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  interpolation: str = "bicubic"

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessSpec":
    return cls(
        image_size=int(d["image_size"]),
        resize_size=int(d["resize_size"]),
        mean=tuple(float(v) for v in d["mean"]),
        std=tuple(float(v) for v in d["std"]),
        interpolation=str(d.get("interpolation", "bicubic")),
    )


def spec_from_hf_preprocessor_config(path: str) -> PreprocessSpec:
  """Reads a Hugging Face `preprocessor_config.json` into a `PreprocessSpec`."""
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read preprocessor config {path}: {e}") from e

  def _size(v, key):
    if isinstance(v, Mapping):
      v = v.get(key, v.get("height"))
    return int(v)

  try:
    crop = _size(cfg.get("crop_size", cfg.get("size")), "height")
    resize = _size(cfg.get("size", crop), "shortest_edge")
    return PreprocessSpec(
        image_size=crop,
        resize_size=resize,
        mean=tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN)),
        std=tuple(float(v) for v in cfg.get("image_std", CLIP_STD)),
    )
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(
        f"preprocessor config {path} has no usable size/crop_size: {e}"
    ) from e


def check_images(images: Any, *, name: str = "images") -> np.ndarray:
  """Validates a host array of images `[N, H, W, 3]` (or one `[H, W, 3]`).

  Returns it as float32 with a leading batch axis. Raises `InputError` for a
  wrong rank or channel count and for NaN or infinite values, so that the
  problem is reported where the user handed the array in, not deep inside JAX.
  """
  arr = np.asarray(images)
  if arr.ndim == 3:
    arr = arr[None]
  if arr.ndim != 4:
    raise InputError(
        f"{name} must have shape [N, H, W, 3] or [H, W, 3]; got {arr.shape}")
  if arr.shape[-1] != 3:
    raise InputError(
        f"{name} must have 3 channels (RGB, channels last); got shape {arr.shape}"
    )
  if arr.shape[1] < 1 or arr.shape[2] < 1:
    raise InputError(f"{name} has an empty spatial size: {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number):
    raise InputError(f"{name} must be numeric; got dtype {arr.dtype}")
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    raise InputError(f"{name} contain {bad} NaN or infinite values")
  return arr


def resize_and_crop(images: jax.Array, spec: PreprocessSpec) -> jax.Array:
  """Resizes the shorter side to `spec.resize_size`, then centre-crops.

  Args:
    images: `[..., H, W, C]` float images.
    spec: the preprocessing to apply.

  Returns:
    `[..., spec.image_size, spec.image_size, C]` images, same value scale.
  """
  h, w = images.shape[-3], images.shape[-2]
  scale = spec.resize_size / min(h, w)
  new_h = max(spec.image_size, int(round(h * scale)))
  new_w = max(spec.image_size, int(round(w * scale)))
  if (new_h, new_w) != (h, w):
    shape = images.shape[:-3] + (new_h, new_w, images.shape[-1])
    images = jax.image.resize(
        images, shape, method=spec.interpolation, antialias=True)
  top = (new_h - spec.image_size) // 2
  left = (new_w - spec.image_size) // 2
  return images[..., top:top + spec.image_size, left:left + spec.image_size, :]


def normalize(images: jax.Array, spec: PreprocessSpec) -> jax.Array:
  """Subtracts CLIP's channel mean and divides by its std."""
  mean = jnp.asarray(spec.mean, images.dtype)
  std = jnp.asarray(spec.std, images.dtype)
  return (images - mean) / std


def preprocess(images: jax.Array, spec: PreprocessSpec) -> jax.Array:
  """[0, 1] images of any size -> the encoder's normalised input."""
  return normalize(resize_and_crop(images, spec), spec)


def check_noise_space(noise_space: str) -> str:
  if noise_space not in NOISE_SPACES:
    raise ConfigError(
        f"noise space must be one of {NOISE_SPACES}; got {noise_space!r}")
  return noise_space
