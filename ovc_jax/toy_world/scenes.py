"""Scenes: every random choice behind a batch of toy-world images.

A `Scenes` holds, for a batch of images, all the parameters rendering needs
(class, style, colour, size, pose, background, degradation, ...), one array
row per image. `sample_scenes` draws them from a NumPy generator; `render`
(rendering.py) turns them into pixels. Every draw has a fixed shape that does
not depend on earlier values, so the stream of a seed never shifts: changing one
image's class (as the tests do) changes nothing else about any image.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ovc_jax.errors import ConfigError
from ovc_jax.toy_world import catalog as cat

# Minimum RGB distance between a shape's colour and its background's mean
# colour; closer backgrounds are pushed darker or lighter. Low enough that
# shapes are sometimes hard to see, as in real photos.
_MIN_CONTRAST = 0.35


@dataclasses.dataclass(frozen=True)
class Scenes:
  """The parameters of `n` images (every field has leading axis n).

  Attributes:
    label: int64 `[n]`, class index into `catalog.TOY_CLASSES`.
    style: int64 `[n]`, index into `catalog.STYLES`.
    colour: int64 `[n]`, the palette colour the shape is drawn with (always
      valid, also where the style hides it; see `colour_attribute`).
    size: int64 `[n]`, index into `catalog.SIZES`.
    background: int64 `[n]`, index into `catalog.BACKGROUNDS`.
    radius: float32 `[n]`, the shape's circumradius in pixels.
    center: float32 `[n, 2]`, the shape's centre (x right, y down) in pixels.
    angle: float32 `[n]`, rotation in radians (counter-clockwise), within
      +-`catalog.MAX_TILT`.
    shape_param: float32 `[n]`, in [0, 1]: variation within the class.
    fg_rgb: float32 `[n, 3]`, the shape's jittered colour.
    bg_rgb: float32 `[n, 2, 3]`, the background pattern's two colours.
    bg_angle: float32 `[n]`, direction of gradient, stripes and checks.
    bg_period: float32 `[n]`, stripe and check period in pixels.
    bg_phase: float32 `[n]`, in [0, 1): offset of stripes, checks, hatching.
    bg_grid: float32 `[n, 4, 4]`, in [0, 1]: the coarse field a textured
      background interpolates.
    shade: float32 `[n]`, lighting gradient strength across the shape.
    shade_angle: float32 `[n]`, direction of that gradient.
    stroke: float32 `[n]`, outline width in pixels (line art and cartoons).
    effect: float32 `[n]`, the style's degradation strength: blur sigma
      (pixels), dark gain, contrast factor or pixelation cells per side.
    noise_std: float32 `[n]`, std of the Gaussian pixel noise.
  """

  label: np.ndarray
  style: np.ndarray
  colour: np.ndarray
  size: np.ndarray
  background: np.ndarray
  radius: np.ndarray
  center: np.ndarray
  angle: np.ndarray
  shape_param: np.ndarray
  fg_rgb: np.ndarray
  bg_rgb: np.ndarray
  bg_angle: np.ndarray
  bg_period: np.ndarray
  bg_phase: np.ndarray
  bg_grid: np.ndarray
  shade: np.ndarray
  shade_angle: np.ndarray
  stroke: np.ndarray
  effect: np.ndarray
  noise_std: np.ndarray

  def __len__(self) -> int:
    return int(self.label.shape[0])

  @property
  def colour_attribute(self) -> np.ndarray:
    """int64 `[n]`: the visible colour, `catalog.NO_COLOUR` where none shows."""
    hidden = np.isin(self.style, cat.COLOURLESS_STYLES)
    return np.where(hidden, cat.NO_COLOUR, self.colour)

  def replace(self, **changes) -> "Scenes":
    return dataclasses.replace(self, **changes)

  def attributes(self) -> dict[str, np.ndarray]:
    """What captions may mention, plus the pose (for analysis)."""
    return {
        "style": self.style.copy(),
        "colour": self.colour_attribute,
        "size": self.size.copy(),
        "background": self.background.copy(),
        "radius": self.radius.copy(),
        "center": self.center.copy(),
        "angle": self.angle.copy(),
    }


def _pick(options: Sequence[int], u: np.ndarray) -> np.ndarray:
  """Maps uniforms in [0, 1) to one of `options`, uniformly."""
  options = np.asarray(options, np.int64)
  return options[np.minimum((u * len(options)).astype(np.int64),
                            len(options) - 1)]


def _luminance(rgb: np.ndarray) -> np.ndarray:
  return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def sample_scenes(rng: np.random.Generator, n: int,
                  labels: np.ndarray | None = None) -> Scenes:
  """Draws the parameters of `n` images.

  Args:
    rng: the generator (see seeds.py); it is advanced.
    n: number of images.
    labels: int `[n]` classes to use; None draws them uniformly. The same
      number of draws is made either way.

  Returns:
    The scenes, with the class, style, colour, size and background of each
    image drawn independently (style by `catalog.STYLE_WEIGHTS`, the rest
    uniformly among what the style allows).
  """
  if n < 0:
    raise ConfigError(f"the number of images must be >= 0; got {n}")
  f32 = np.float32
  drawn_labels = rng.integers(0, cat.NUM_CLASSES, n)
  if labels is None:
    labels = drawn_labels
  else:
    labels = np.asarray(labels, np.int64)
    if labels.shape != (n,) or (n and (labels.min() < 0 or
                                       labels.max() >= cat.NUM_CLASSES)):
      raise ConfigError(f"labels must be {n} ints in [0, {cat.NUM_CLASSES})")
  style = rng.choice(len(cat.STYLES), n, p=cat.STYLE_WEIGHTS).astype(np.int64)

  # Colour: uniform among the colours the style allows (argmax of random keys
  # over the allowed set keeps the draw shape fixed).
  allowed = np.ones((n, len(cat.COLOURS)), bool)
  allowed[style == cat.DRAWING] = np.isin(np.arange(len(cat.COLOURS)),
                                          cat.DRAWING_COLOURS)
  colour = np.argmax(np.where(allowed, rng.random((n, len(cat.COLOURS))), -1),
                     axis=1).astype(np.int64)

  size = rng.integers(0, len(cat.SIZES), n)
  lo, hi = cat.SIZE_RADIUS[size, 0], cat.SIZE_RADIUS[size, 1]
  radius = (lo + (hi - lo) * rng.random(n, f32)).astype(f32)
  # Keep the centre far enough in for most of the shape to show.
  margin = 0.85 * radius
  center = (margin[:, None] + (cat.IMAGE_SIZE - 2 * margin[:, None])
            * rng.random((n, 2), f32)).astype(f32)
  angle = (cat.MAX_TILT * (2 * rng.random(n, f32) - 1)).astype(f32)
  shape_param = rng.random(n, f32)

  gain = 0.85 + 0.25 * rng.random((n, 1), f32)
  fg_rgb = np.clip(cat.COLOUR_RGB[colour] * gain
                   + 0.04 * rng.standard_normal((n, 3), f32), 0, 1)

  line_art = np.isin(style, (cat.DRAWING, cat.SKETCH))
  cartoon = style == cat.CARTOON
  u_bg = rng.random(n)
  background = np.where(
      line_art, cat.PAPER,
      np.where(cartoon, _pick(cat.CARTOON_BACKGROUNDS, u_bg),
               _pick(cat.PHOTO_BACKGROUNDS, u_bg)))

  # Photo backgrounds: any colour, second pattern colour nearby.
  c1 = rng.random((n, 3), f32)
  c2 = np.clip(c1 + 0.22 * rng.standard_normal((n, 3), f32), 0, 1)
  # Cartoons: pastel grounds. Paper: warm off-white, no pattern.
  c1 = np.where(cartoon[:, None], 0.72 + 0.28 * c1, c1)
  c2 = np.where(cartoon[:, None], np.clip(0.72 + 0.28 * c2, 0, 1), c2)
  paper = (0.88 + 0.1 * rng.random((n, 1), f32)) * np.array(
      [1.0, 0.985, 0.95], f32)
  c1 = np.where(line_art[:, None], paper, c1)
  c2 = np.where(line_art[:, None], paper, c2)
  # Push backgrounds too close to the shape's colour away from it.
  close = np.linalg.norm(0.5 * (c1 + c2) - fg_rgb, axis=1) < _MIN_CONTRAST
  close &= ~line_art
  light_fg = (_luminance(fg_rgb) > 0.5)[:, None]
  for c in (c1, c2):
    pushed = np.where(light_fg, 0.35 * c, 0.6 + 0.4 * c)
    c[...] = np.where(close[:, None], pushed, c)
  bg_rgb = np.stack([c1, c2], axis=1).astype(f32)

  bg_angle = (np.pi * rng.random(n, f32)).astype(f32)
  bg_period = (4.0 + 5.0 * rng.random(n, f32)).astype(f32)
  bg_phase = rng.random(n, f32)
  bg_grid = rng.random((n, 4, 4), f32)

  photo = np.isin(style, cat.PHOTO_STYLES)
  shade = np.where(photo, 0.35 * rng.random(n, f32), 0).astype(f32)
  shade_angle = (2 * np.pi * rng.random(n, f32)).astype(f32)

  u_stroke = rng.random(n, f32)
  stroke = np.select(
      [style == cat.DRAWING, style == cat.SKETCH, cartoon],
      [1.0 + 0.8 * u_stroke, 0.8 + 0.6 * u_stroke, 1.1 + 0.9 * u_stroke],
      0).astype(f32)

  u_fx = rng.random(n, f32)
  effect = np.select(
      [style == cat.BLURRY, style == cat.DARK, style == cat.LOW_CONTRAST,
       style == cat.HIGH_CONTRAST, style == cat.PIXELATED],
      [0.7 + 0.5 * u_fx, 0.3 + 0.15 * u_fx, 0.3 + 0.15 * u_fx,
       1.8 + 0.8 * u_fx, np.floor(12 + 5 * u_fx)],
      1).astype(f32)

  u_noise = rng.random(n, f32)
  noise_std = np.select(
      [style == cat.NOISY, photo, line_art],
      [0.06 + 0.05 * u_noise, 0.005 + 0.025 * u_noise, 0.01 + 0.015 * u_noise],
      0.01 * u_noise).astype(f32)

  return Scenes(
      label=labels, style=style, colour=colour, size=size,
      background=background.astype(np.int64), radius=radius, center=center,
      angle=angle, shape_param=shape_param, fg_rgb=fg_rgb.astype(f32),
      bg_rgb=bg_rgb, bg_angle=bg_angle, bg_period=bg_period,
      bg_phase=bg_phase, bg_grid=bg_grid, shade=shade,
      shade_angle=shade_angle, stroke=stroke, effect=effect,
      noise_std=noise_std)
