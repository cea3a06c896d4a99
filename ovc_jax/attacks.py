"""PGD attacks (Madry et al. 2018) on zero-shot classifiers, in L-inf and L2.

The threat model is the image in [0, 1] pixel space, before CLIP's
preprocessing: the attacked model is an `EmbeddingClassifier` whose
`preprocess` is set (so `classifier.embed(params, pixels)` resizes, crops and
normalises, then encodes, then purifies if its encoder is a
`clipure.PurifiedEncoder`), and PGD differentiates through all of it, end to
end. It maximises the cross-entropy of

    logits = logit_scale * (U z(x))      (U: [C, d] class matrix)

over the eps-ball around each image, from a random start, for `steps` steps,
`restarts` times. Every step and restart is run (no early stop when an attack
fails, none when it succeeds); each image keeps its worst point over all
iterates of all restarts and the clean image itself, so it counts as robust
only if no restart fooled it at any step, and robust accuracy never exceeds
clean accuracy.

Cross-entropy saturates: where the true logit leads every other by more than
about 87 (float32's exp underflow), its gradient is exactly 0 and PGD cannot
move. CLIP's cosine logits at scale 100 stay far below that in practice; for
other classifiers, lower `logit_scale`.

One compiled program per (classifier, batch shape, norm, steps, restarts);
the images of a batch are attacked at once (batched model calls, per-image
gradient directions, projections and random starts), never in a Python loop.
Image i's random start of restart k is keyed by fold_in(key_i, k), with
key_i the i-th of the given per-image keys (or fold_in(key, i) for one key):
with per-image keys, an image's attack does not depend on its batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.classifiers import prompt_logits
from ovc_jax.errors import ConfigError, InputError

NORMS = ("linf", "l2")
# CLIP's trained logit scale is exp(4.6052) = 100.
DEFAULT_LOGIT_SCALE = 100.0

_TINY = 1e-30


class AttackResult(NamedTuple):
  """The outcome of attacking a batch of images.

  Attributes:
    adversarial: `[B, H, W, 3]` the worst point found per image (a fooling one
      where any fooled the classifier), within eps and [0, 1].
    correct: bool `[B]`: classified correctly at every point tried (robust).
    clean_correct: bool `[B]`: classified correctly without perturbation.
    margin: float `[B]`: max_{c != y} logit_c - logit_y at `adversarial`
      (> 0 fooled; ties go to the lower class index, as argmax does).
  """

  adversarial: jax.Array
  correct: jax.Array
  clean_correct: jax.Array
  margin: jax.Array


def _is_number(v: Any) -> bool:
  return (not isinstance(v, bool)
          and isinstance(v, (int, float, np.integer, np.floating)))


def _is_count(v: Any, minimum: int) -> bool:
  return (not isinstance(v, bool) and isinstance(v, (int, np.integer))
          and v >= minimum)


def check_attack_args(*, norm: Any, eps: Any, steps: Any, step_size: Any,
                      restarts: Any = 1,
                      logit_scale: Any = DEFAULT_LOGIT_SCALE) -> None:
  """Raises ConfigError, naming the parameter, for an argument out of range."""
  if norm not in NORMS:
    raise ConfigError(f"attack norm must be one of {NORMS}; got {norm!r}")
  if not _is_number(eps) or not np.isfinite(eps) or eps < 0:
    raise ConfigError(f"attack eps must be a finite number >= 0; got {eps!r}")
  if not _is_count(steps, 0):
    raise ConfigError(f"attack steps must be an integer >= 0; got {steps!r}")
  if not _is_number(step_size) or not np.isfinite(step_size) or step_size <= 0:
    raise ConfigError(
        f"attack step size must be a finite number > 0; got {step_size!r}")
  if not _is_count(restarts, 1):
    raise ConfigError(f"attack restarts must be an integer >= 1; got {restarts!r}")
  if not _is_number(logit_scale) or not np.isfinite(logit_scale) or logit_scale <= 0:
    raise ConfigError(
        f"logit scale must be a finite number > 0; got {logit_scale!r}")


def _row_norm(x: jax.Array) -> jax.Array:
  """Per-image L2 norms, shaped to broadcast against `x`: [B, 1, ..., 1]."""
  axes = tuple(range(1, x.ndim))
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axes, keepdims=True), _TINY))


def project(x: jax.Array, x0: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """The point of {||x' - x0|| <= eps} ∩ [0, 1]^D used by PGD, per image.

  L-inf: clip to the eps-box around x0, then to [0, 1]; that is the exact
  Euclidean projection onto the intersection (both are boxes).
  L2: scale x - x0 into the eps-ball, then clip to [0, 1]. Clipping after the
  projection keeps the L2 norm <= eps: x0 lies in [0, 1], so clipping moves
  each coordinate of x0 + delta towards x0 and shrinks |delta_i| or keeps it
  (up to float rounding of the scaling, ~1e-7 relative).
  """
  if norm == "linf":
    x = jnp.clip(x, x0 - eps, x0 + eps)
  else:
    delta = x - x0
    n = _row_norm(delta)
    delta = jnp.where(n > eps, delta * (eps / n), delta)
    x = x0 + delta
  return jnp.clip(x, 0.0, 1.0)


def _direction(g: jax.Array, norm: str) -> jax.Array:
  """Steepest ascent direction of unit norm: sign(g), or g / ||g||_2 per image."""
  if norm == "linf":
    return jnp.sign(g)
  sq = jnp.sum(g * g, axis=tuple(range(1, g.ndim)), keepdims=True)
  nonzero = sq > 0
  return jnp.where(nonzero, g / jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _random_start(key: jax.Array, shape, eps: jax.Array, norm: str) -> jax.Array:
  """One image's random start offset: uniform in the eps-box or the eps-ball."""
  if norm == "linf":
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * eps
  k_dir, k_rad = jax.random.split(key)
  d = jax.random.normal(k_dir, shape, jnp.float32)
  d = d / jnp.sqrt(jnp.maximum(jnp.sum(d * d), _TINY))
  size = float(np.prod(shape))
  radius = jax.random.uniform(k_rad, (), jnp.float32) ** (1.0 / size)
  return d * radius * eps


def _margin(logits: jax.Array, labels: jax.Array):
  """(wrong [B], margin [B]): argmax != y, and max_{c != y} l_c - l_y."""
  num_classes = logits.shape[-1]
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf,
                     logits)
  wrong = jnp.argmax(logits, axis=-1).astype(jnp.int32) != labels
  return wrong, jnp.max(others, axis=-1) - true


@functools.partial(jax.jit, static_argnames=("classifier", "norm", "steps",
                                             "restarts", "random_start"))
def _pgd(classifier, params, images, labels, class_embeddings, keys, eps,
         step_size, logit_scale, *, norm, steps, restarts, random_start):
  x0 = images

  def logits_of(x):
    z = classifier.embed(params, x)
    return logit_scale * prompt_logits(z, class_embeddings)

  def loss(x):
    logits = logits_of(x)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                              labels[:, None], axis=-1)[:, 0]
    # Images are independent: the gradient of the sum is each image's own.
    return jnp.sum(ce), logits

  loss_and_grad = jax.value_and_grad(loss, has_aux=True)

  def keep_worst(best, x, logits):
    best_x, best_wrong, best_margin = best
    wrong, margin = _margin(logits, labels)
    worse = (wrong & ~best_wrong) | ((wrong == best_wrong) & (margin > best_margin))
    pick = worse.reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.where(pick, x, best_x), best_wrong | wrong,
            jnp.where(worse, margin, best_margin))

  clean_wrong, clean_margin = _margin(logits_of(x0), labels)
  best = (x0, clean_wrong, clean_margin)

  def one_restart(best, restart):
    if random_start:
      starts = jax.vmap(lambda k: _random_start(
          jax.random.fold_in(k, restart), x0.shape[1:], eps, norm))(keys)
      x = project(x0 + starts, x0, eps, norm)
    else:
      x = x0

    def one_step(carry, _):
      x, best = carry
      (_, logits), g = loss_and_grad(x)
      best = keep_worst(best, x, logits)
      x = project(x + step_size * _direction(g, norm), x0, eps, norm)
      return (x, best), None

    (x, best), _ = jax.lax.scan(one_step, (x, best), None, length=steps)
    return keep_worst(best, x, logits_of(x)), None

  best, _ = jax.lax.scan(one_restart, best, jnp.arange(restarts))
  best_x, best_wrong, best_margin = best
  return AttackResult(best_x, ~best_wrong, ~clean_wrong, best_margin)


def _image_keys(key: jax.Array, batch: int) -> jax.Array:
  """Per-image keys: the given [B] keys, or fold_in(key, i) for one key."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if key.ndim == single_ndim:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
  if key.ndim == single_ndim + 1 and key.shape[0] == batch:
    return key
  raise InputError(f"attack key must be one key or one per image ({batch}); "
                   f"got shape {key.shape}")


def pgd_attack(classifier: Any, encoder_params: Any, images: Any, labels: Any,
               class_embeddings: Any, key: jax.Array, *, norm: str, eps: float,
               steps: int, step_size: float, restarts: int = 1,
               logit_scale: float = DEFAULT_LOGIT_SCALE,
               random_start: bool = True) -> AttackResult:
  """Untargeted PGD on a batch of images.

  Args:
    classifier: a hashable object with `embed(encoder_params, images) -> [B,
      d]`, e.g. an `EmbeddingClassifier` with `preprocess` set (pixels in,
      preprocessing and any purification inside).
    encoder_params: its encoder's params.
    images: `[B, H, W, 3]` (or any `[B, ...]`) in [0, 1].
    labels: int `[B]` true classes.
    class_embeddings: `[C, d]`, the prompt's class matrix.
    key: one PRNG key (image i uses fold_in(key, i)) or one key per image.
    norm: "linf" or "l2".
    eps: the radius, >= 0 (0: the clean images are returned).
    steps: PGD steps per restart, >= 0 (0: the random start only).
    step_size: the step length (in the norm's own units), > 0.
    restarts: random restarts, >= 1; an image must survive all of them.
    logit_scale: the logits' scale in the cross-entropy (CLIP's: 100).
    random_start: start each restart at a random point of the eps-ball
      (uniform in the box for L-inf, in the ball for L2); else at the image.

  Returns:
    An `AttackResult` (device arrays).

  Raises:
    ConfigError: an argument out of range.
    InputError: images outside [0, 1] or not finite, or mismatched shapes.
  """
  check_attack_args(norm=norm, eps=eps, steps=steps, step_size=step_size,
                    restarts=restarts, logit_scale=logit_scale)
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  class_embeddings = jnp.asarray(class_embeddings, jnp.float32)
  if images.ndim < 2 or labels.shape != images.shape[:1]:
    raise InputError(f"images [B, ...] and labels [B] do not match: "
                     f"{images.shape} and {labels.shape}")
  if class_embeddings.ndim != 2:
    raise InputError(f"class embeddings must be [C, d]; got {class_embeddings.shape}")
  lo, hi = float(jnp.min(images)), float(jnp.max(images))
  if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
    raise InputError(f"attacked images must lie in [0, 1] (pixel space, before "
                     f"preprocessing); got values in [{lo}, {hi}]")
  num_classes = class_embeddings.shape[0]
  if bool(jnp.any((labels < 0) | (labels >= num_classes))):
    raise InputError(f"labels must lie in [0, {num_classes})")
  return _pgd(classifier, encoder_params, images, labels, class_embeddings,
              _image_keys(key, images.shape[0]),
              jnp.float32(eps), jnp.float32(step_size),
              jnp.float32(logit_scale), norm=norm, steps=int(steps),
              restarts=int(restarts), random_start=bool(random_start))


def predict_correct(classifier: Any, encoder_params: Any, images: Any,
                    labels: Any, class_embeddings: Any) -> jax.Array:
  """bool [B]: argmax_c (U z(x))[c] == y, on the images as given."""
  return _correct(classifier, encoder_params, jnp.asarray(images, jnp.float32),
                  jnp.asarray(labels, jnp.int32),
                  jnp.asarray(class_embeddings, jnp.float32))


@functools.partial(jax.jit, static_argnames=("classifier",))
def _correct(classifier, params, images, labels, class_embeddings):
  logits = prompt_logits(classifier.embed(params, images), class_embeddings)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32) == labels
