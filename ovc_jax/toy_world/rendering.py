"""Renders toy-world scenes into images, a whole batch per array expression.

For a batch of `Scenes` the pixels are made in five steps, each a NumPy
expression over `[n, H, W]` coordinate grids (no loop over images):

  1. pose: every pixel centre is moved into each shape's local frame
     (translate, rotate, scale by the circumradius);
  2. shape: the class's signed distance function gives the distance of every
     pixel to the outline, in pixels; coverage `clip(0.5 - d, 0, 1)` is a
     one-pixel box filter across the edge (anti-aliasing without
     supersampling), and `clip(w/2 + 0.5 - |d|, 0, 1)` an outline of width w;
  3. background: a pattern in [0, 1] (flat, ramp, stripes, checks, smooth
     noise) blends the background's two colours;
  4. style: photos paint the shaded fill, drawings and sketches an outline on
     paper, cartoons a flat fill and a black outline; photo degradations
     (blur, pixelation: separable linear filters as batched matrix products;
     darkness, grey scale, contrast: per-pixel maps) follow;
  5. Gaussian pixel noise (quantised to 256 levels: `pixel_noise`), then
     clipping to [0, 1].

Rendering is deterministic: all randomness is in the scenes, except the pixel
noise, drawn from the generator passed in with a fixed size (`pixel_noise`).
Internally images are channel-planar `[n, 3, H, W]` (the CIFAR layout), which
keeps NumPy's broadcasting fast; `render` returns them channels last.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from ovc_jax.toy_world import catalog as cat
from ovc_jax.toy_world import shapes
from ovc_jax.toy_world.scenes import Scenes

_F32 = np.float32
_LUMA = np.array([0.299, 0.587, 0.114], _F32)
_INK_BLACK = _F32(0.05)
_PENCIL_GREY = _F32(0.28)


def _pixel_centres(size: int) -> np.ndarray:
  return np.arange(size, dtype=_F32) + _F32(0.5)


def _signed_distance(scenes: Scenes, size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Distance of every pixel to its image's shape outline, and local coords.

  Returns:
    d: float32 `[n, size, size]`, signed distance in pixels (negative inside).
    u, v: float32 `[n, size, size]`, local coordinates in circumradii (u
      along the shape's rotated x axis, v along its y axis, y pointing up).
  """
  c = _pixel_centres(size)
  dx = c[None, None, :] - scenes.center[:, 0, None, None]  # [n, 1, W]
  dy = scenes.center[:, 1, None, None] - c[None, :, None]  # [n, H, 1], y up
  cos = np.cos(scenes.angle)[:, None, None]
  sin = np.sin(scenes.angle)[:, None, None]
  inv_r = (1 / scenes.radius)[:, None, None]
  # Rotate the pixel offsets by -angle, i.e. the shape by +angle.
  u = (cos * dx + sin * dy) * inv_r
  v = (cos * dy - sin * dx) * inv_r
  d = np.empty_like(u)
  # One SDF evaluation per class, on that class's images only.
  for k, sdf in enumerate(shapes.SHAPE_SDFS):
    idx = np.flatnonzero(scenes.label == k)
    if idx.size:
      t = scenes.shape_param[idx, None, None]
      d[idx] = sdf(u[idx], v[idx], t) * scenes.radius[idx, None, None]
  return d, u, v


def _square_wave(s: np.ndarray, period: np.ndarray) -> np.ndarray:
  """Anti-aliased 0/1 wave of phase `s` (in periods); `period` in pixels."""
  tri = np.abs(s - np.floor(s) - _F32(0.5))  # 0 .. 0.5, edges at 0.25
  return np.clip(_F32(0.5) + (tri - _F32(0.25)) * period, 0, 1)


def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
  """`[size, cells]` bilinear weights from a coarse grid to pixel centres."""
  pos = (_pixel_centres(size) / size) * (cells - 1)
  w = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(cells)[None, :]))
  return w.astype(_F32)


def _background_pattern(scenes: Scenes, size: int) -> np.ndarray:
  """float32 `[n, size, size]` in [0, 1]: how much of `bg_rgb[:, 1]` shows."""
  n = len(scenes)
  c = _pixel_centres(size) - _F32(size / 2)  # from the image centre
  t = np.zeros((n, size, size), _F32)
  kind = scenes.background

  def along(idx, angle_offset=0.0):
    """Pixel position along each image's pattern direction, in pixels."""
    a = scenes.bg_angle[idx, None, None] + _F32(angle_offset)
    return c[None, None, :] * np.cos(a) + c[None, :, None] * np.sin(a)

  idx = np.flatnonzero(kind == cat.GRADIENT)
  if idx.size:
    # 0 -> 1 across the image's diagonal extent.
    t[idx] = np.clip(_F32(0.5) + along(idx) / _F32(size * np.sqrt(2)), 0, 1)
  idx = np.flatnonzero(kind == cat.STRIPED)
  if idx.size:
    period = scenes.bg_period[idx, None, None]
    t[idx] = _square_wave(
        along(idx) / period + scenes.bg_phase[idx, None, None], period)
  idx = np.flatnonzero(kind == cat.CHECKERED)
  if idx.size:
    period = scenes.bg_period[idx, None, None]
    phase = scenes.bg_phase[idx, None, None]
    a = _square_wave(along(idx) / period + phase, period)
    b = _square_wave(along(idx, np.pi / 2) / period + phase, period)
    t[idx] = a + b - 2 * a * b  # soft xor
  idx = np.flatnonzero(kind == cat.TEXTURED)
  if idx.size:
    m = _interpolation_matrix(size, scenes.bg_grid.shape[1])
    t[idx] = m @ scenes.bg_grid[idx] @ m.T
  return t


def _separable_filter(planes: np.ndarray, k: np.ndarray) -> np.ndarray:
  """`k[i] @ plane @ k[i].T` for every plane: `[n, 3, S, S]`, `[n, S, S]`."""
  k = k[:, None]  # the same filter for the three channels
  return k @ planes @ np.swapaxes(k, -1, -2)


def _gaussian_matrices(sigma: np.ndarray, size: int) -> np.ndarray:
  """`[n, size, size]` row-normalised Gaussian blur matrices."""
  i = np.arange(size, dtype=_F32)
  d2 = (i[:, None] - i[None, :]) ** 2
  k = np.exp(-d2[None] / (2 * sigma[:, None, None] ** 2))
  return (k / k.sum(axis=2, keepdims=True)).astype(_F32)


def _pixelation_matrices(cells: np.ndarray, size: int) -> np.ndarray:
  """`[n, size, size]`: average over each of `cells` blocks, then repeat."""
  i = np.arange(size)
  block = (i[None, :] * cells[:, None].astype(np.int64)) // size  # [n, size]
  same = (block[:, :, None] == block[:, None, :]).astype(_F32)
  return same / same.sum(axis=2, keepdims=True)


def _per_image(values: np.ndarray) -> np.ndarray:
  """`[n]` or `[n, 3]` -> broadcastable against planes `[n, 3, H, W]`."""
  values = np.asarray(values, _F32)
  return values.reshape(values.shape[0], -1, 1, 1)


def _paint(scenes: Scenes, d: np.ndarray, u: np.ndarray, v: np.ndarray,
           pattern: np.ndarray) -> np.ndarray:
  """Background plus the shape in each image's style: planes `[n, 3, H, W]`.

  Planar (channel-first) layout keeps NumPy's inner loops long and contiguous
  when per-image colours `[n, 3, 1, 1]` meet per-pixel maps `[n, 1, H, W]`;
  channels-last broadcasting of a length-3 axis is an order of magnitude
  slower.
  """
  style = scenes.style
  photo = np.isin(style, cat.PHOTO_STYLES)
  cartoon = style == cat.CARTOON
  drawing = style == cat.DRAWING
  sketch = style == cat.SKETCH
  d4, u4, v4 = d[:, None], u[:, None], v[:, None]

  bg0 = _per_image(scenes.bg_rgb[:, 0])
  bg1 = _per_image(scenes.bg_rgb[:, 1])
  planes = bg0 + pattern[:, None] * (bg1 - bg0)

  # Fill: photos (with a linear lighting gradient) and cartoons (flat).
  fill = np.clip(_F32(0.5) - d4, 0, 1)
  fill *= _per_image(photo | cartoon)
  light = (u4 * _per_image(np.cos(scenes.shade_angle))
           + v4 * _per_image(np.sin(scenes.shade_angle)))
  light = 1 + _per_image(scenes.shade) * light
  fg = _per_image(scenes.fg_rgb) * light  # may pass 1; clipped at the end
  planes += fill * (fg - planes)

  # Outlines: ink for drawings, black for cartoons, grey pencil for sketches.
  half = _per_image(scenes.stroke / 2 + _F32(0.5))
  line = np.clip(half - np.abs(d4), 0, 1)
  line *= _per_image(drawing | cartoon | sketch)
  ink = np.where(drawing[:, None], scenes.fg_rgb,
                 np.where(sketch[:, None], _PENCIL_GREY, _INK_BLACK))
  idx = np.flatnonzero(sketch)
  if idx.size:
    # Pencil: uneven pressure along the stroke, a fainter second pass just
    # outside it, and light diagonal hatching inside.
    phase = _per_image(_F32(2 * np.pi) * scenes.bg_phase[idx])
    ui, vi, di = u4[idx], v4[idx], d4[idx]
    pressure = _F32(0.6) + _F32(0.4) * np.sin(7 * ui + 5 * vi + phase)
    second = np.clip(half[idx] - np.abs(di - _F32(1.2)), 0, 1) * _F32(0.4)
    c = _pixel_centres(d.shape[1])
    hatch = np.sin((c[None, :] - c[:, None]) * _F32(2.2) + phase)
    hatch = np.clip(_F32(0.5) - di, 0, 1) * _F32(0.16) * (hatch > 0.2)
    line[idx] = np.clip(line[idx] * pressure + second + hatch, 0, 1)
  planes += line * (_per_image(ink) - planes)
  return planes


def _degrade(scenes: Scenes, planes: np.ndarray) -> np.ndarray:
  """Applies each photo style's degradation in place; returns the planes."""
  style, fx = scenes.style, scenes.effect
  size = planes.shape[-1]
  idx = np.flatnonzero(style == cat.BLURRY)
  if idx.size:
    planes[idx] = _separable_filter(planes[idx],
                                    _gaussian_matrices(fx[idx], size))
  idx = np.flatnonzero(style == cat.PIXELATED)
  if idx.size:
    planes[idx] = _separable_filter(planes[idx],
                                    _pixelation_matrices(fx[idx], size))
  idx = np.flatnonzero(style == cat.DARK)
  if idx.size:
    planes[idx] *= _per_image(fx[idx])
  idx = np.flatnonzero(style == cat.BLACK_AND_WHITE)
  if idx.size:
    planes[idx] = np.einsum("c,nchw->nhw", _LUMA, planes[idx])[:, None]
  idx = np.flatnonzero(style == cat.LOW_CONTRAST)
  if idx.size:
    mean = planes[idx].mean(axis=(1, 2, 3), keepdims=True)
    # Wash towards a light grey, as haze does, not just towards the mean.
    target = _F32(0.5) * mean + _F32(0.3)
    planes[idx] = target + (planes[idx] - mean) * _per_image(fx[idx])
  idx = np.flatnonzero(style == cat.HIGH_CONTRAST)
  if idx.size:
    planes[idx] = _F32(0.5) + (planes[idx] - _F32(0.5)) * _per_image(fx[idx])
  return planes


def _gaussian_table() -> np.ndarray:
  """256 standard-normal quantiles at equal-probability bin midpoints."""
  z = ndtri((np.arange(256) + 0.5) / 256)
  return (z / z.std()).astype(_F32)  # unit variance after quantisation


_NOISE_TABLE = _gaussian_table()


def pixel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Unit-variance, 256-level quantised Gaussian noise of `shape`.

  One random byte per value, mapped through the normal quantile function: a
  third of the cost of `standard_normal` (which would be a quarter of all
  rendering time) and, as image noise, indistinguishable from it.
  """
  count = int(np.prod(shape))
  codes = np.frombuffer(rng.bytes(count), np.uint8)
  return _NOISE_TABLE[codes].reshape(shape)


def render_planar(scenes: Scenes, rng: np.random.Generator) -> np.ndarray:
  """Like `render`, but returns channel-planar float32 `[n, 3, 32, 32]`."""
  n, size = len(scenes), cat.IMAGE_SIZE
  noise = pixel_noise(rng, (n, 3, size, size))
  d, u, v = _signed_distance(scenes, size)
  planes = _paint(scenes, d, u, v, _background_pattern(scenes, size))
  planes = _degrade(scenes, planes)
  planes += _per_image(scenes.noise_std) * noise
  return np.clip(planes, 0, 1, out=planes)


def render(scenes: Scenes, rng: np.random.Generator) -> np.ndarray:
  """Draws the images of `scenes`.

  Args:
    scenes: the batch's parameters (see `sample_scenes`).
    rng: generator of the pixel noise; one `rng.bytes` draw of
      `n * 3 * 32 * 32` bytes is made, whatever the scenes.

  Returns:
    float32 `[n, 32, 32, 3]` in [0, 1], channels last.
  """
  planes = render_planar(scenes, rng)
  return np.ascontiguousarray(planes.transpose(0, 2, 3, 1))


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[0, 1] float images -> uint8, rounding to the nearest level."""
  return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)
