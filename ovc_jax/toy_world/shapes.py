"""Signed distance functions of the ten toy-world shapes, vectorised in NumPy.

Each function takes local coordinates `x, y` (any broadcastable shapes, usually
`[n, H, W]`; x right, y up, in units of the shape's circumradius, so that every
shape roughly fills the unit disc) and a per-image shape parameter `t` in
[0, 1] (broadcastable, usually `[n, 1, 1]`) that varies the shape within its
class. It returns the signed distance to the outline in the same units:
negative inside, positive outside. Distances are exact (or exact near the
outline, which is all that anti-aliasing and outlines need).

The formulas are the standard 2-D SDFs (Inigo Quilez's catalogue), written with
`np.where` in place of branches so that a whole batch is one array expression.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ovc_jax.toy_world import catalog

ShapeSdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

_SQRT3 = np.float32(np.sqrt(3.0))


def _lerp(lo_hi: tuple[float, float], t: np.ndarray) -> np.ndarray:
  lo, hi = lo_hi
  return np.float32(lo) + np.float32(hi - lo) * t


def _length(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return np.sqrt(x * x + y * y)


def _box(x: np.ndarray, y: np.ndarray, bx, by) -> np.ndarray:
  """Axis-aligned box of half extents (bx, by) centred at the origin."""
  dx = np.abs(x) - bx
  dy = np.abs(y) - by
  outside = _length(np.maximum(dx, 0), np.maximum(dy, 0))
  inside = np.minimum(np.maximum(dx, dy), 0)
  return outside + inside


def _polygon(x: np.ndarray, y: np.ndarray,
             vertices: list[tuple[Any, Any]]) -> np.ndarray:
  """Exact signed distance to a simple polygon (vertices in order).

  The distance is the minimum over edges; the sign comes from the crossing
  number of a ray towards +x (Quilez's sdPolygon). Vertex coordinates may be
  arrays broadcastable with x and y (per-image shapes).
  """
  vx0, vy0 = vertices[0]
  d2 = (x - vx0) ** 2 + (y - vy0) ** 2
  inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), bool)
  n = len(vertices)
  for i in range(n):
    vxi, vyi = vertices[i]
    vxj, vyj = vertices[i - 1]
    ex, ey = vxj - vxi, vyj - vyi
    wx, wy = x - vxi, y - vyi
    h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
    d2 = np.minimum(d2, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
    up, down = y >= vyi, y < vyj
    left = ex * wy > ey * wx
    inside ^= (up & down & left) | (~up & ~down & ~left)
  d = np.sqrt(d2)
  return np.where(inside, -d, d)


def circle(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  del t  # every circle is the same circle
  return _length(x, y) - 1


def square(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  # Half side 0.78: a square of circumradius 1 looks much smaller than a disc.
  corner = _lerp(catalog.SQUARE_CORNER, t)
  half = np.float32(0.78) - corner
  return _box(x, y, half, half) - corner


def triangle(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Equilateral triangle, apex up, centroid at the origin."""
  del t
  r = np.float32(0.95)  # half side; circumradius 2r/sqrt(3) = 1.1
  px = np.abs(x) - r
  py = y + r / _SQRT3
  fold = px + _SQRT3 * py > 0
  px, py = (np.where(fold, (px - _SQRT3 * py) * 0.5, px),
            np.where(fold, (-_SQRT3 * px - py) * 0.5, py))
  px = px - np.clip(px, -2 * r, 0)
  return -_length(px, py) * np.sign(py)


def star(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Five-pointed star of outer radius 1.05; `t` sets the inner radius."""
  scale = np.float32(1.05)
  inner = _lerp(catalog.STAR_INNER, t)
  px, py = np.abs(x) / scale, y / scale
  k1x, k1y = np.float32(0.809016994375), np.float32(-0.587785252292)
  for kx, ky in ((k1x, k1y), (-k1x, k1y)):  # fold into one spike's wedge
    m = 2 * np.maximum(kx * px + ky * py, 0)
    px, py = px - m * kx, py - m * ky
  px = np.abs(px)
  py = py - 1
  bax, bay = inner * -k1y, inner * k1x - 1
  h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, 1)
  return (_length(px - bax * h, py - bay * h)
          * np.sign(py * bax - px * bay) * scale)


def cross(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Plus sign with arms of half length 0.95; `t` sets the arm width."""
  w = _lerp(catalog.CROSS_ARM_HALF_WIDTH, t)
  arm = np.float32(0.95)
  return _polygon(x, y, [(w, arm), (-w, arm), (-w, w), (-arm, w), (-arm, -w),
                         (-w, -w), (-w, -arm), (w, -arm), (w, -w), (arm, -w),
                         (arm, w), (w, w)])


def heart(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Heart, lobes up, roughly centred; height about 1.9."""
  del t
  s = np.float32(1.75)
  px = np.abs(x) / s
  py = y / s + np.float32(0.55)
  lobe = _length(px - 0.25, py - 0.75) - np.float32(np.sqrt(2.0) / 4)
  m = 0.5 * np.maximum(px + py, 0)
  body = np.sqrt(np.minimum(px * px + (py - 1) ** 2,
                            (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
  return np.where(py + px > 1, lobe, body) * s


def hexagon(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Regular hexagon of circumradius 1 (apothem 0.866)."""
  del t
  r = np.float32(0.866)
  kx, ky = np.float32(-0.866025404), np.float32(0.5)  # (-cos 30, sin 30)
  kz = np.float32(0.577350269)  # tan 30
  px, py = np.abs(x), np.abs(y)
  m = 2 * np.minimum(kx * px + ky * py, 0)
  px, py = px - m * kx, py - m * ky
  px = px - np.clip(px, -kz * r, kz * r)
  py = py - r
  return _length(px, py) * np.sign(py)


def ring(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Annulus of outer radius 1; `t` sets its thickness."""
  half = 0.5 * _lerp(catalog.RING_THICKNESS, t)
  return np.abs(_length(x, y) - (1 - half)) - half


def arrow(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Arrow pointing up: a triangular head on a bar; `t` sets the bar width."""
  w = np.float32(0.14) + np.float32(0.08) * t
  head, base, tip, tail = (np.float32(0.58), np.float32(0.15), np.float32(1.0),
                           np.float32(-1.02))
  # One polygon, not a union of a bar and a triangle: a union's distance is
  # wrong inside, where the parts overlap, and outlines would cross there.
  return _polygon(x, y, [(0, tip), (-head, base), (-w, base), (-w, tail),
                         (w, tail), (w, base), (head, base)])


def crescent(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
  """A unit disc minus an offset disc; `t` sets the offset (the thickness).

  Exact distance (Quilez's moon): max(disc, -cut) alone is wrong outside the
  disc on the cut side, where outlines would show a ghost of the cut-away arc.
  """
  off = _lerp(catalog.CRESCENT_CUT_OFFSET, t)
  rb = np.float32(0.88)  # radius of the cut disc
  # Shift so that the crescent's visible mass, not the disc, is centred.
  px = x - 0.3 * off
  py = np.abs(y)
  # (a, b): where the two circles meet (the horn tips).
  a = (1 - rb * rb + off * off) / (2 * off)
  b = np.sqrt(np.maximum(1 - a * a, 0))
  horn = off * (px * b - py * a) > off * off * np.maximum(b - py, 0)
  body = np.maximum(_length(px, py) - 1, rb - _length(px - off, py))
  return np.where(horn, _length(px - a, py - b), body)


# In label order, matching `catalog.TOY_CLASSES`.
SHAPE_SDFS: tuple[ShapeSdf, ...] = (
    circle, square, triangle, star, cross, heart, hexagon, ring, arrow,
    crescent)
assert tuple(f.__name__ for f in SHAPE_SDFS) == catalog.TOY_CLASSES
