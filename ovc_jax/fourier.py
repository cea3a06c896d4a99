"""Fourier heat maps of errors (Yin et al. 2019, "A Fourier perspective on
model robustness"; applied to CLIP by Galindo & Faria, "Understanding CLIP
Robustness").

For every frequency (k, l) of a map, each test image X is perturbed along one
Fourier basis image U_kl and the classifier's error rate on the perturbed
images is recorded:

    X' = clip(X + r * v * U_kl, 0, 1),   r in {-1, +1}^3 (one sign per channel)

The map shows that error rate per frequency, the lowest frequency in the
middle. The conventions, each chosen once here:

Basis (gatheluck/FourierHeatmap v0.2's construction, "half-plane one-hot"):
  The spectrum is a real one-hot on the rfft2 half-plane, index (k, l) with
  k in [0, H) and l in [0, W//2]; `jnp.fft.irfft2(one_hot, s=(H, W))` reads it
  as the conjugate-symmetric full spectrum with ones at (k, l) and its mirror
  (-k mod H, -l mod W), and returns a real image, which is then scaled to
  unit L2 norm. The result is the cosine

      U_kl[y, x] = c * cos(2 pi (k y / H + l x / W)),

  c = sqrt(2 / (H W)), or 1 / sqrt(H W) where (k, l) is its own mirror
  (k, l in {0, H/2} x {0, W/2}). The same U_kl goes into all three channels.
  Distinct half-plane entries give orthonormal images except for the mirrored
  pairs the half-plane holds twice, (k, 0) ~ (-k, 0) and (k, W/2) ~ (-k, W/2)
  (W even), which give the same image (cos is even). Google-research's
  `_get_fourier_basis` instead puts 0.5+0.5j / 0.5-0.5j at the point and its
  mirror (a cosine shifted by pi/4, same frequencies); not used here.

Perturbation (gatheluck's choice of sign, "random sign per image and channel"):
  r_c = +-1, drawn independently for each image and each of the 3 channels,
  added in native [0, 1] pixel space BEFORE CLIP's preprocessing (resize, crop,
  Normalize); the result is clipped to [0, 1]. v is the L2 norm of each
  channel's perturbation: 4.0 for CIFAR-10 (32x32), 15.7 for ImageNet (224);
  a parameter everywhere.

Keys (so that any image's sign, and a smoothed classifier's noise, can be
regenerated alone, in any batch size):
  frequency key  = fold_in(key, k * (W//2 + 1) + l)   (flat half-plane index)
  clean key      = fold_in(key, H * (W//2 + 1))        (the unperturbed pass)
  image key      = fold_in(frequency key, image index)
  signs          = rademacher(fold_in(image key, 0), (3,))
  classifier key = fold_in(image key, 1)   (the smoothed classifier's PREDICT)

Error matrix and map (gatheluck's layout):
  The error matrix is (H, W//2 + 1) in rfft2 index order: E[k, l] is the error
  rate at U_kl (NaN where not evaluated). Write a frequency signed, ky = k for
  k < H/2 and k - H otherwise, and kx = l. The centred map M is
  (2K + 1) x (2K + 1) with M[K + ky, K + kx] the error at (ky, kx), for
  |ky|, |kx| <= K; for kx < 0 it is read from the mirror, E[-ky, -kx], the
  same basis image. For 32x32 images K = 15: the map is 31 x 31, exactly
  gatheluck's (their matrix's first row, the Nyquist ky = -16, and last column,
  kx = 16, are dropped and the rest mirrored about the origin). For 224x224
  images K = 31: Yin et al.'s 63 x 63 low-frequency crop. In general
  K = min(31, (min(H, W) - 1) // 2) unless given, and only the half-plane
  frequencies that the map shows are evaluated: ky in [-K, K], kx in [0, K]
  ((2K + 1)(K + 1) of them: 496 for 32x32, 2016 for 224x224). The (ky, 0) and
  (-ky, 0) entries are the same image; both are evaluated, with their own
  signs, as gatheluck does.

Classifiers (each hashable, a function from pixel images [B, H, W, 3] in
[0, 1] to labels):
  - `PlainClassifier`: any base classifier of the sampler's form (e.g. an
    `EmbeddingClassifier` with `preprocess` set); built by
    `zeroshot_classifier` (CLIP zero-shot) and `clipure_classifier`
    (CLIPure-Cos, from `ovc_jax.clipure`).
  - `SmoothedClassifier`: Cohen et al.'s PREDICT (`standard.predict`) at sigma,
    with n draws, per perturbed image, keyed by the image's classifier key.
    Its draws are the sampler's, so each prediction equals
    `standard.predict(classifier key, base, params, x', smoothing)`.
    Abstentions count as errors and are also reported on their own.

Evaluation is one jit-compiled program per (classifier, image batch shape):
the frequency (k, l), v and keys are traced arguments, the images of one
frequency run in fixed-size chunks under `lax.map` (vmap inside a chunk), and
the host reads the outputs back once per frequency.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ovc_jax import sampler
from ovc_jax import tracing
from ovc_jax.certificates import ABSTAIN
from ovc_jax.errors import ConfigError, InputError

# Yin et al.'s perturbation norms.
DEFAULT_V = {"cifar10": 4.0, "toy": 4.0, "imagenet": 15.7}
# The largest |frequency| of Yin et al.'s 63 x 63 ImageNet crop.
YIN_MAX_FREQUENCY = 31
MIN_IMAGE_SIZE = 4
# The two sub-keys of an image key.
SIGN_STREAM, CLASSIFIER_STREAM = 0, 1


# ---------------------------------------------------------------------------
# Checks


def _is_real(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool))


def check_v(v: Any) -> float:
  """v, the perturbation's L2 norm: a finite number > 0."""
  if not _is_real(v) or not np.isfinite(v) or v <= 0:
    raise ConfigError(f"v (the L2 norm of the Fourier perturbation) must be a "
                      f"finite number > 0; got {v!r}")
  return float(v)


def check_image_size(height: Any, width: Any) -> tuple[int, int]:
  """(H, W), each an integer >= 4."""
  for v in (height, width):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ConfigError(f"image sides must be integers; got {height!r} x "
                        f"{width!r}")
  if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
    raise ConfigError(
        f"a Fourier heat map needs images of at least {MIN_IMAGE_SIZE}x"
        f"{MIN_IMAGE_SIZE} pixels; got {height}x{width}")
  return int(height), int(width)


def check_images(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Images float32 [N, H, W, 3] in [0, 1] (H, W >= 4) and int labels [N]."""
  arr = np.asarray(images)
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise InputError(f"images must have shape [N, H, W, 3]; got {arr.shape}")
  check_image_size(arr.shape[1], arr.shape[2])
  if arr.shape[0] < 1:
    raise InputError("no images given")
  if not np.issubdtype(arr.dtype, np.number):
    raise InputError(f"images must be numeric; got dtype {arr.dtype}")
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise InputError("images contain NaN or infinite values")
  if arr.min() < 0.0 or arr.max() > 1.0:
    raise InputError(f"images must lie in [0, 1] pixel space; got values in "
                     f"[{arr.min():g}, {arr.max():g}]")
  lab = np.asarray(labels)
  if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
    raise InputError(f"labels must be integers of shape ({arr.shape[0]},); got "
                     f"{lab.dtype} {lab.shape}")
  return arr, lab.astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int | None) -> None:
  """Raises InputError for a label outside [0, num_classes) (below 0 only,
  when num_classes is None): no prediction could ever match it."""
  labels = np.asarray(labels)
  if labels.size and labels.min() < 0:
    raise InputError(f"labels must be >= 0; got {int(labels.min())}")
  if num_classes is not None and labels.size and labels.max() >= num_classes:
    raise InputError(
        f"labels must lie in [0, {num_classes - 1}] for a classifier of "
        f"{num_classes} classes; got {int(labels.max())}: its error rate "
        "would be 1 at every frequency")


def classifier_classes(classifier: Any) -> int | None:
  """C of a classifier that knows it (`num_classes`), else None."""
  c = getattr(classifier, "num_classes", None)
  return None if c is None else int(c)


def check_batch_size(batch_size: Any) -> int:
  if (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
      or batch_size < 1):
    raise ConfigError(f"the image batch size must be an integer >= 1; got "
                      f"{batch_size!r}")
  return int(batch_size)


def check_smoothing(*, sigma: Any, n: Any, alpha: Any, batch_size: Any) -> None:
  """The smoothed classifier's PREDICT arguments."""
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ConfigError(f"the smoothed classifier's n (noise draws per PREDICT) "
                      f"must be an integer >= 1; got {n!r}")
  if not _is_real(sigma) or not np.isfinite(sigma) or sigma <= 0:
    raise ConfigError(f"the smoothed classifier's sigma must be a finite "
                      f"number > 0; got {sigma!r}")
  if not _is_real(alpha) or not 0.0 < alpha < 1.0:
    raise ConfigError(f"the smoothed classifier's alpha must lie in (0, 1); "
                      f"got {alpha!r}")
  if (not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool)
      or batch_size < 1):
    raise ConfigError(f"the smoothed classifier's noise batch size must be an "
                      f"integer >= 1; got {batch_size!r}")


# ---------------------------------------------------------------------------
# Frequencies and basis images


def half_plane_shape(height: int, width: int) -> tuple[int, int]:
  """(H, W//2 + 1): the rfft2 half-plane, the error matrix's shape."""
  height, width = check_image_size(height, width)
  return height, width // 2 + 1


def signed_frequency(k: int, l: int, height: int) -> tuple[int, int]:
  """(ky, kx) of half-plane index (k, l): ky = k if 2k < H, else k - H (the
  Nyquist row of an even H is ky = -H/2), and kx = l."""
  return (k if 2 * k < height else k - height), l


def half_plane_index(ky: int, kx: int, height: int, width: int) -> tuple[int, int]:
  """The half-plane entry (k, l) holding signed frequency (ky, kx), kx >= 0."""
  if not 0 <= kx <= width // 2:
    raise ConfigError(f"kx must lie in [0, {width // 2}]; got {kx}")
  return ky % height, kx


def mirror(k: int, l: int, height: int, width: int) -> tuple[int, int]:
  """The conjugate-symmetric partner (-k mod H, -l mod W) of (k, l)."""
  return (-k) % height, (-l) % width


def flat_index(k, l, width: int):
  """k * (W//2 + 1) + l: the frequency's id in keys and result rows."""
  return k * (width // 2 + 1) + l


def clean_index(height: int, width: int) -> int:
  """The id of the unperturbed pass: one past the last half-plane entry."""
  return height * (width // 2 + 1)


def check_frequency(k: Any, l: Any, height: int, width: int) -> None:
  """Raises ConfigError unless (k, l) is an entry of the (H, W//2 + 1)
  half-plane. Concrete values only: traced ones are not checked."""
  if isinstance(k, jax.core.Tracer) or isinstance(l, jax.core.Tracer):
    return
  for v in (k, l):
    if np.ndim(v) != 0 or not np.issubdtype(np.asarray(v).dtype, np.integer):
      raise ConfigError(f"a frequency (k, l) must be two integers; got "
                        f"{(k, l)!r}")
  if not (0 <= int(k) < height and 0 <= int(l) <= width // 2):
    raise ConfigError(f"frequency {(int(k), int(l))} is outside the {height}x"
                      f"{width // 2 + 1} half-plane of {height}x{width} "
                      f"images: k must lie in [0, {height - 1}], l in "
                      f"[0, {width // 2}]")


def basis_image(height: int, width: int, k, l) -> jax.Array:
  """U_kl: float32 [H, W], real, unit L2 norm (see the module docstring).

  Jittable in (k, l): a one-hot on the (H, W//2 + 1) half-plane, irfft2 to
  (H, W), divided by its L2 norm. Concrete (k, l) outside the half-plane
  raise ConfigError (a traced one would give an all-NaN image, so the
  callers check first).
  """
  check_frequency(k, l, height, width)
  spectrum = jnp.zeros((height, width // 2 + 1), jnp.float32).at[k, l].set(1.0)
  image = jnp.fft.irfft2(spectrum, s=(height, width)).astype(jnp.float32)
  return image / jnp.linalg.norm(image)


def basis_images(height: int, width: int) -> jax.Array:
  """Every half-plane basis image: [H, W//2 + 1, H, W]."""
  height, width = check_image_size(height, width)
  ks, ls = np.meshgrid(np.arange(height), np.arange(width // 2 + 1),
                       indexing="ij")
  fn = jax.jit(jax.vmap(functools.partial(basis_image, height, width)))
  return fn(ks.reshape(-1), ls.reshape(-1)).reshape(
      height, width // 2 + 1, height, width)


def default_max_frequency(height: int, width: int) -> int:
  """K of the map: all non-Nyquist frequencies up to Yin et al.'s 31."""
  height, width = check_image_size(height, width)
  return min(YIN_MAX_FREQUENCY, (min(height, width) - 1) // 2)


def check_max_frequency(max_frequency: int | None, height: int,
                        width: int) -> int:
  """K: None -> `default_max_frequency`; else an integer in [1, (min(H,W)-1)//2]."""
  height, width = check_image_size(height, width)
  if max_frequency is None:
    return default_max_frequency(height, width)
  top = (min(height, width) - 1) // 2
  if (not isinstance(max_frequency, (int, np.integer))
      or isinstance(max_frequency, bool) or not 1 <= max_frequency <= top):
    raise ConfigError(f"max_frequency must be an integer in [1, {top}] for "
                      f"{height}x{width} images; got {max_frequency!r}")
  return int(max_frequency)


def map_shape(height: int, width: int,
              max_frequency: int | None = None) -> tuple[int, int]:
  """(2K + 1, 2K + 1): 31 x 31 for 32x32 images, 63 x 63 for 224x224."""
  k = check_max_frequency(max_frequency, height, width)
  return 2 * k + 1, 2 * k + 1


def map_frequencies(height: int, width: int,
                    max_frequency: int | None = None) -> list[tuple[int, int]]:
  """The half-plane entries (k, l) the map shows: ky in [-K, K], kx in [0, K],
  in that (row-major) order."""
  kmax = check_max_frequency(max_frequency, height, width)
  return [half_plane_index(ky, kx, height, width)
          for ky in range(-kmax, kmax + 1) for kx in range(kmax + 1)]


def heatmap_from_half_plane(matrix: Any, width: int | None = None,
                            max_frequency: int | None = None) -> np.ndarray:
  """The centred map of an (H, W//2 + 1) half-plane matrix.

  Args:
    matrix: E[k, l] in rfft2 index order (see the module docstring).
    width: W (default H: square images); the matrix must have W//2 + 1
      columns.
    max_frequency: K (default `default_max_frequency(H, W)`).

  Returns:
    float64 [2K + 1, 2K + 1]: M[K + ky, K + kx] = E at (ky, kx), read from the
    mirror (-ky, -kx) where kx < 0. Row 0 is ky = -K, column 0 is kx = -K; the
    lowest frequency (0, 0) is the centre [K, K].
  """
  e = np.asarray(matrix, np.float64)
  if e.ndim != 2:
    raise InputError(f"the half-plane matrix must be 2-D; got shape {e.shape}")
  height = e.shape[0]
  width = height if width is None else width
  if e.shape[1] != width // 2 + 1:
    raise InputError(f"a half-plane matrix of {height}x{width} images has "
                     f"{width // 2 + 1} columns; got shape {e.shape}")
  kmax = check_max_frequency(max_frequency, height, width)
  ky, kx = np.meshgrid(np.arange(-kmax, kmax + 1), np.arange(-kmax, kmax + 1),
                       indexing="ij")
  left = kx < 0
  rows = np.where(left, -ky, ky) % height
  cols = np.where(left, -kx, kx)
  return e[rows, cols]


def half_plane_matrix(values: dict[tuple[int, int], float], height: int,
                      width: int) -> np.ndarray:
  """(H, W//2 + 1) float64 from {(k, l): value}; NaN where absent."""
  out = np.full(half_plane_shape(height, width), np.nan)
  for (k, l), value in values.items():
    out[k, l] = value
  return out


# ---------------------------------------------------------------------------
# Keys, signs and the perturbation


def frequency_key(key: jax.Array, k, l, width: int) -> jax.Array:
  return jax.random.fold_in(key, flat_index(k, l, width))


def image_keys(frequency_key_: jax.Array, image_indices: jax.Array) -> jax.Array:
  """fold_in(frequency key, i) for each image index i."""
  return jax.vmap(lambda i: jax.random.fold_in(frequency_key_, i))(image_indices)


def signs_from_image_key(image_key: jax.Array, num_channels: int = 3) -> jax.Array:
  """r: float32 [C] of +-1, the image's per-channel signs."""
  return jax.random.rademacher(jax.random.fold_in(image_key, SIGN_STREAM),
                               (num_channels,), jnp.float32)


def classifier_key(image_key: jax.Array) -> jax.Array:
  """The key a keyed classifier (the smoothed one) gets for this image."""
  return jax.random.fold_in(image_key, CLASSIFIER_STREAM)


def channel_signs(key: jax.Array, k: int, l: int, image_indices: Sequence[int],
                  width: int, num_channels: int = 3) -> np.ndarray:
  """Regenerates the signs r of the given images at frequency (k, l): [N, C]."""
  keys = image_keys(frequency_key(key, k, l, width),
                    jnp.asarray(image_indices, jnp.int32))
  return np.asarray(jax.vmap(
      lambda kk: signs_from_image_key(kk, num_channels))(keys))


def perturb(images: jax.Array, basis: jax.Array, signs: jax.Array,
            v) -> jax.Array:
  """clip(X + r * v * U, 0, 1): images [B, H, W, C] in [0, 1], basis [H, W],
  signs [B, C]; v >= 0 (0: unperturbed).

  Traceable: shapes are always checked, a concrete v's value on the host.
  """
  images, basis, signs = (jnp.asarray(a) for a in (images, basis, signs))
  if (images.ndim != 4 or basis.shape != images.shape[1:3]
      or signs.shape != (images.shape[0], images.shape[3])):
    raise InputError(f"perturb takes images [B, H, W, C], a basis [H, W] and "
                     f"signs [B, C]; got {images.shape}, {basis.shape} and "
                     f"{signs.shape}")
  if jnp.ndim(v) != 0:
    raise ConfigError(f"v must be a scalar; got shape {jnp.shape(v)}")
  v_value = tracing.host_value(v)
  if v_value is not None and (
      not np.issubdtype(v_value.dtype, np.number)
      or not np.isfinite(v_value) or v_value < 0):
    raise ConfigError(f"v (the L2 norm of the Fourier perturbation) must be a "
                      f"finite number >= 0; got {v!r}")
  delta = (jnp.asarray(v, images.dtype) * signs[:, None, None, :]
           * basis[None, :, :, None])
  return jnp.clip(images + delta, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Classifiers


@dataclasses.dataclass(frozen=True)
class PlainClassifier:
  """A deterministic classifier: `apply_fn(params, images)["predictions"]`.

  `apply_fn` is of the sampler's form (hashable, returns a dict with int
  predictions [B]), e.g. an `EmbeddingClassifier` whose `preprocess` is set so
  that it takes [0, 1] pixel images. It never abstains.
  """

  apply_fn: Callable[[Any, jax.Array], Any]
  # C, when known: labels are checked against it (None: not checked).
  num_classes: int | None = None

  keyed = False

  def device_outputs(self, params, images, keys):
    del keys
    return self.apply_fn(params, images)["predictions"].astype(jnp.int32)

  def decide(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predictions [B], abstained [B])."""
    outputs = np.asarray(outputs)
    return outputs.astype(np.int64), np.zeros(outputs.shape, bool)


def predict_from_counts(counts: Any, alpha: float) -> np.ndarray:
  """Cohen et al.'s PREDICT rule on noise-draw histograms [B, C], vectorised.

  The rule and arithmetic of `standard.predict`: the top two counts nA, nB
  (ties to the lower class index), SciPy's two-sided binomial test at p = 0.5,
  which for p = 0.5 is min(1, cdf(nB; nA + nB) + sf(nA - 1; nA + nB)) and 1
  when nA == nB; the top class where p <= alpha, else ABSTAIN. A tie of the
  top two counts (nA == nB, no draws at all included) always ABSTAINs: its p
  is 1, above any alpha in (0, 1), and the lower index is never returned.

  Raises:
    ConfigError: alpha outside (0, 1).
    InputError: counts not [B, C] non-negative integers.
  """
  if not _is_real(alpha) or not 0.0 < alpha < 1.0:
    raise ConfigError(f"PREDICT's alpha must lie in (0, 1); got {alpha!r}")
  raw = np.asarray(counts)
  if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer)
                           or raw.dtype == bool):
    raise InputError(f"counts must be integers [B, C]; got {raw.dtype} shape "
                     f"{raw.shape}")
  counts = raw.astype(np.int64)
  if counts.size and counts.min() < 0:
    raise InputError("counts must be >= 0")
  rows = np.arange(counts.shape[0])
  order = np.argsort(-counts, axis=1, kind="stable")
  n_a = counts[rows, order[:, 0]]
  n_b = (counts[rows, order[:, 1]] if counts.shape[1] > 1
         else np.zeros_like(n_a))
  total = n_a + n_b
  safe = np.maximum(total, 1)
  with np.errstate(all="ignore"):
    p = stats.binom.cdf(n_b, safe, 0.5) + stats.binom.sf(n_a - 1, safe, 0.5)
  p = np.where(n_a == n_b, 1.0, np.minimum(1.0, p))
  decided = (n_a > n_b) & (p <= alpha)
  return np.where(decided, order[:, 0], ABSTAIN).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SmoothedClassifier:
  """Cohen et al.'s PREDICT around a base classifier, per (perturbed) image.

  For image x with key kx, the n draws are the sampler's draws of
  `standard.predict(kx, base, params, x, SmoothingParams(sigma, n=n,
  alpha=alpha, batch_size=batch_size))`: noise sigma * N(0, I) in the space
  the base classifier takes (with an `EmbeddingClassifier` whose preprocess is
  set: [0, 1] pixel space, not clipped), from the key stream
  `sampler.stream_key(kx, "prediction")`. The counts of a chunk of images are
  computed on the device (vmap over images), the PREDICT rule on the host
  (`predict_from_counts`), once per chunk's read-back.

  Attributes:
    base: the base classifier (sampler form, hashable).
    num_classes: C.
    sigma, n, alpha: PREDICT's noise level, draws and test level.
    batch_size: noise draws evaluated at once per image (memory only).
  """

  base: Callable[[Any, jax.Array], Any]
  num_classes: int
  sigma: float
  n: int
  alpha: float = 0.001
  batch_size: int = 100

  keyed = True

  def __post_init__(self):
    check_smoothing(sigma=self.sigma, n=self.n, alpha=self.alpha,
                    batch_size=self.batch_size)
    if self.num_classes < 1:
      raise ConfigError(f"num_classes must be >= 1; got {self.num_classes}")

  def device_outputs(self, params, images, keys):
    def counts(x, key):
      return sampler.sample_under_noise(
          self.base, params, x, sampler.stream_key(key, "prediction"),
          num_samples=self.n, sigma=self.sigma, batch_size=self.batch_size,
          num_classes=self.num_classes)["counts"]
    return jax.vmap(counts)(images, keys)

  def decide(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = predict_from_counts(outputs, self.alpha)
    return predictions, predictions == ABSTAIN


def zeroshot_classifier(loaded, template: str, class_names: Sequence[str]):
  """The plain CLIP zero-shot classifier on [0, 1] pixel images.

  Returns (PlainClassifier, params): an `EmbeddingClassifier` with the model's
  preprocessing and the class matrix `zeroshot.class_embeddings(loaded,
  template, class_names)`.
  """
  from ovc_jax import zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  base = EmbeddingClassifier(loaded.model.embed_images,
                             preprocess=loaded.preprocess)
  params = base.params(loaded.params,
                       zeroshot.class_embeddings(loaded, template, class_names))
  return PlainClassifier(base, len(class_names)), params


CLIPURE_API = ("PurifiedEncoder", "purified_encoder_params", "blank_embedding")


def clipure_module():
  """`ovc_jax.clipure`, or ConfigError naming what is missing."""
  if importlib.util.find_spec("ovc_jax.clipure") is None:
    raise ConfigError("the CLIPure-Cos classifier needs ovc_jax/clipure.py "
                      f"({', '.join(CLIPURE_API)}), which this checkout lacks")
  clipure = importlib.import_module("ovc_jax.clipure")
  missing = [name for name in CLIPURE_API if not hasattr(clipure, name)]
  if missing:
    raise ConfigError(f"ovc_jax/clipure.py lacks {', '.join(missing)}, which "
                      "the CLIPure-Cos classifier needs")
  return clipure


def clipure_classifier(loaded, template: str, class_names: Sequence[str],
                       templates: Sequence[str], *, steps: int = 10,
                       step_size: float = 30.0):
  """CLIPure-Cos (purified image embeddings) on [0, 1] pixel images.

  `EmbeddingClassifier(PurifiedEncoder(loaded.model.embed_images, steps,
  step_size), preprocess=loaded.preprocess)` with encoder params
  `purified_encoder_params(loaded.params, blank_embedding(loaded, templates))`
  and the zero-shot class matrix of `template`. Returns (PlainClassifier,
  params).
  """
  from ovc_jax import zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  clipure = clipure_module()
  encoder = clipure.PurifiedEncoder(loaded.model.embed_images, steps=steps,
                                    step_size=step_size)
  base = EmbeddingClassifier(encoder, preprocess=loaded.preprocess)
  encoder_params = clipure.purified_encoder_params(
      loaded.params, clipure.blank_embedding(loaded, list(templates)))
  params = base.params(encoder_params,
                       zeroshot.class_embeddings(loaded, template, class_names))
  return PlainClassifier(base, len(class_names)), params


def smoothed_classifier(plain: PlainClassifier, params, *, num_classes: int,
                        sigma: float, n: int, alpha: float = 0.001,
                        batch_size: int = 100):
  """Cohen's PREDICT around a plain classifier: (SmoothedClassifier, params)."""
  return SmoothedClassifier(plain.apply_fn, int(num_classes), float(sigma),
                            int(n), float(alpha), int(batch_size)), params


# ---------------------------------------------------------------------------
# Evaluation


class ImageBatches(NamedTuple):
  """The images of a map on the device, in fixed-size chunks.

  Attributes:
    images: float32 [chunks, batch, H, W, 3]; the last chunk is padded with
      copies of the last image.
    indices: int32 [chunks, batch], each image's index (its key); padding
      repeats the last index.
    labels: int64 [N] (host).
    count: N, the real images.
  """

  images: jax.Array
  indices: jax.Array
  labels: np.ndarray
  count: int


def image_batches(images: Any, labels: Any, batch_size: int,
                  image_indices: Sequence[int] | None = None) -> ImageBatches:
  """Validates images [N, H, W, 3] in [0, 1] and puts them on the device.

  `image_indices` (default 0..N-1) are the indices the keys are folded with,
  e.g. the images' dataset indices.
  """
  images, labels = check_images(images, labels)
  batch_size = min(check_batch_size(batch_size), images.shape[0])
  n = images.shape[0]
  idx = (np.arange(n) if image_indices is None
         else np.asarray(image_indices, np.int64))
  if idx.shape != (n,) or (n and idx.min() < 0):
    raise InputError(f"image_indices must be {n} integers >= 0")
  chunks = math.ceil(n / batch_size)
  pad = chunks * batch_size - n
  images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
  idx = np.concatenate([idx, np.repeat(idx[-1:], pad)])
  return ImageBatches(
      jnp.asarray(images.reshape((chunks, batch_size) + images.shape[1:])),
      jnp.asarray(idx.reshape(chunks, batch_size), jnp.int32), labels, n)


@functools.partial(jax.jit, static_argnames=("classifier",))
def _outputs(classifier, params, images, indices, key, k, l, v, perturbed):
  """The classifier's outputs on every chunk at frequency (k, l): [chunks, batch, ...]."""
  height, width, channels = images.shape[-3:]
  basis = basis_image(height, width, k, l)
  flat = jnp.where(perturbed, flat_index(k, l, width),
                   clean_index(height, width))
  freq_key = jax.random.fold_in(key, flat)

  def chunk(args):
    chunk_images, chunk_indices = args
    keys = image_keys(freq_key, chunk_indices)
    signs = jax.vmap(lambda kk: signs_from_image_key(kk, channels))(keys)
    scale = jnp.where(perturbed, v, 0.0)
    x = perturb(chunk_images, basis, signs, scale)
    return classifier.device_outputs(params, x, jax.vmap(classifier_key)(keys))

  return jax.lax.map(chunk, (images, indices))


class FrequencyResult(NamedTuple):
  """One frequency's (or the clean pass's) counts over the images."""

  images: int
  errors: int       # wrong predictions, abstentions included
  abstentions: int  # ABSTAIN (smoothed classifier only)

  @property
  def error_rate(self) -> float:
    return self.errors / self.images

  @property
  def abstention_rate(self) -> float:
    return self.abstentions / self.images


def evaluate(classifier, params, batches: ImageBatches, key: jax.Array,
             frequency: tuple[int, int] | None, v: float) -> FrequencyResult:
  """Errors of `classifier` on the images perturbed at `frequency` (k, l).

  `frequency=None` evaluates the clean images (no perturbation, the clean
  key). One device call and one read-back for all images.
  """
  height, width = batches.images.shape[-3:-1]
  if frequency is None:
    k, l, perturbed, v = 0, 0, False, 0.0
  else:
    v = check_v(v)
    k, l = frequency
    check_frequency(k, l, height, width)
    k, l = int(k), int(l)
    perturbed = True
  check_labels(batches.labels, classifier_classes(classifier))
  out = _outputs(classifier, params, batches.images, batches.indices, key,
                 jnp.int32(k), jnp.int32(l), jnp.float32(v),
                 jnp.asarray(perturbed))
  out = np.asarray(jax.device_get(out))
  out = out.reshape((-1,) + out.shape[2:])[:batches.count]
  predictions, abstained = classifier.decide(out)
  errors = int(np.sum(predictions != batches.labels))
  return FrequencyResult(batches.count, errors, int(np.sum(abstained)))


class Heatmap(NamedTuple):
  """A Fourier heat map and what it was made from.

  Attributes:
    error_map: [2K + 1, 2K + 1] error rate (abstentions counted as errors),
      centred (see `heatmap_from_half_plane`).
    abstention_map: the same layout, the abstention rate (zeros for a plain
      classifier).
    error_matrix: the (H, W//2 + 1) half-plane matrix (NaN where not shown).
    abstention_matrix: likewise.
    clean: the unperturbed images' result.
  """

  error_map: np.ndarray
  abstention_map: np.ndarray
  error_matrix: np.ndarray
  abstention_matrix: np.ndarray
  clean: FrequencyResult


def fourier_heatmap(classifier, params, images: Any, labels: Any,
                    key: jax.Array, *, v: float,
                    max_frequency: int | None = None, batch_size: int = 256,
                    image_indices: Sequence[int] | None = None,
                    frequencies: Iterable[tuple[int, int]] | None = None,
                    callback: Callable[[tuple[int, int], FrequencyResult],
                                       None] | None = None) -> Heatmap:
  """The Fourier heat map of `classifier` on `images` (a loop over frequencies).

  Args:
    classifier: a `PlainClassifier` or `SmoothedClassifier` (or any hashable
      object with `device_outputs` and `decide`).
    params: its params.
    images: float [N, H, W, 3] in [0, 1]; labels: int [N].
    key: the run's key (see the module docstring for what is folded in).
    v: the perturbation's L2 norm.
    max_frequency: K (default `default_max_frequency`).
    batch_size: images per chunk of the compiled step.
    image_indices: the indices folded into the keys (default 0..N-1).
    frequencies: the half-plane entries to evaluate (default: the map's).
    callback: called with ((k, l), result) after each frequency.
  """
  v = check_v(v)
  batches = image_batches(images, labels, batch_size, image_indices)
  check_labels(batches.labels, classifier_classes(classifier))
  height, width = batches.images.shape[-3:-1]
  kmax = check_max_frequency(max_frequency, height, width)
  todo = (map_frequencies(height, width, kmax) if frequencies is None
          else list(frequencies))
  clean = evaluate(classifier, params, batches, key, None, v)
  errors, abstentions = {}, {}
  for freq in todo:
    result = evaluate(classifier, params, batches, key, freq, v)
    errors[freq], abstentions[freq] = result.error_rate, result.abstention_rate
    if callback is not None:
      callback(freq, result)
  e = half_plane_matrix(errors, height, width)
  a = half_plane_matrix(abstentions, height, width)
  return Heatmap(heatmap_from_half_plane(e, width, kmax),
                 heatmap_from_half_plane(a, width, kmax), e, a, clean)
