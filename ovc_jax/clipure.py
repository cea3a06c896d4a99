"""CLIPure-Cos: purification of CLIP image embeddings in latent space.

Zhang et al., "CLIPure: Purification in Latent Space via CLIP for
Adversarially Robust Zero-Shot Classification" (ICLR 2025). CLIPure-Cos moves
an image embedding z towards the embedding of a *blank* prompt ("a photo of a
.") by normalised gradient steps on the unit sphere, keeping its norm:

    r = ||z||,  u = z / r
    repeat `steps` times:
      g = r * d/dz [-cos(z, blank)] at z = r u
      u = u - step_size * g / ||g||
      u = u / ||u||
    return r u

then classifies the purified embedding zero-shot as usual. Here that is one
more encoder: `PurifiedEncoder(loaded.model.embed_images)` is an image encoder
like any other, so

    classifier = EmbeddingClassifier(PurifiedEncoder(loaded.model.embed_images))
    encoder_params = purified_encoder_params(loaded.params, blank)

is the CLIPure-Cos base classifier of the smoothing framework: every certifier
and `ovc_jax.ovc` take it unchanged, and the "embeddings" it hands back are the
(normalised) purified embeddings, which is what Cached-OVC then caches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.errors import ConfigError, InputError

DEFAULT_STEPS = 10
DEFAULT_STEP_SIZE = 30.0

# The paper's blank prompt; `blank_embedding(loaded, [SINGLE_BLANK_TEMPLATE])`
# embeds it alone (a template without '{}' formats to itself).
SINGLE_BLANK_TEMPLATE = "a photo of a ."

# ||g|| is sin(angle(z, blank)) whatever ||z|| (see `purify`). Below this it is
# float32 rounding, not a direction: the step is skipped.
GRADIENT_TOLERANCE = 1e-6

_TINY = 1e-30

# How an attack differentiates through the purification (`PurifiedEncoder`):
#   full      the exact gradient, through each step's inner gradient too;
#   official  each step's direction treated as a constant, as the official
#             code's `torch.autograd.grad` without `create_graph` does;
#   bpda      the purification taken as the identity on the backward pass
#             (BPDA, Athalye et al. 2018); its forward pass is the real one.
# The forward pass is the same for all three. Purification draws no random
# numbers, so BPDA needs no expectation over transformations (EOT).
ATTACK_GRADIENTS = ("full", "official", "bpda")
DEFAULT_ATTACK_GRADIENT = "full"


def check_purification_args(*, steps: Any, step_size: Any) -> None:
  """Raises ConfigError for a step count or step size out of range."""
  if (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
      or steps < 0):
    raise ConfigError(
        f"purification steps must be an integer >= 0; got {steps!r}")
  if isinstance(step_size, jax.core.Tracer):  # known inside the program only
    if step_size.shape:
      raise ConfigError(f"purification step_size must be a scalar; got shape "
                        f"{step_size.shape}")
    return
  if (isinstance(step_size, bool)
      or not isinstance(step_size, (int, float, np.integer, np.floating))
      or not np.isfinite(step_size) or step_size <= 0):
    raise ConfigError(
        f"purification step_size must be a finite number > 0; got {step_size!r}")


def check_attack_gradient(name: Any, *, purifies: bool = True) -> None:
  """Raises ConfigError for an unknown attack-gradient name, or for one other
  than "full" asked of a classifier that does not purify (`purifies` False:
  no `PurifiedEncoder`, or one of 0 steps)."""
  if not isinstance(name, str) or name not in ATTACK_GRADIENTS:
    raise ConfigError(f"attack gradient must be one of {ATTACK_GRADIENTS}; "
                      f"got {name!r}")
  if name != "full" and not purifies:
    raise ConfigError(f"attack gradient {name!r} needs a purified classifier "
                      "(a PurifiedEncoder of at least 1 step); this classifier "
                      "does not purify")


def _safe_norm(x: jax.Array) -> jax.Array:
  """Row norms [..., 1] with a gradient that is finite at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return jnp.sqrt(jnp.maximum(sq, _TINY))


def _negative_cosine(z: jax.Array, blank: jax.Array) -> jax.Array:
  """-cos(z_i, blank) per row: [B]."""
  dots = jnp.sum(z * blank, axis=-1)
  return -dots / (_safe_norm(z)[..., 0] * _safe_norm(blank)[0])


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_blank(blank: Any) -> None:
  """Raises InputError for a blank that has no direction: NaN, infinite or
  zero. Checked on the host, and only for a concrete array: under jit the
  blank is a tracer and `purify` guards in the graph instead."""
  if _is_traced(blank):
    return
  b = np.asarray(jax.device_get(blank), np.float64)
  if b.ndim != 1 or b.size == 0:
    return  # purify names the shape
  if not np.all(np.isfinite(b)):
    raise InputError("the blank embedding holds NaN or infinite values: it "
                     "has no direction to purify towards")
  if not np.any(b != 0):
    raise InputError("the blank embedding is zero: it has no direction to "
                     "purify towards")


def purify(z: jax.Array, blank: jax.Array, *, steps: int = DEFAULT_STEPS,
           step_size: float = DEFAULT_STEP_SIZE,
           gradient: str = DEFAULT_ATTACK_GRADIENT) -> jax.Array:
  """CLIPure-Cos purification of image embeddings (jittable, differentiable).

  Each step is the official `purify_zi` update (ClassificationModel in
  CLIP_eval/CLIPure_Cos.py of TMLResearchGroup-CAS/CLIPure, L2 branch with
  momentum 0): g = r * grad_z(-cos(z, blank)) at z = r u, then
  u <- normalise(u - step_size * g / ||g||), and finally r u.

  Deviation from the official code, on purpose: there ||g|| is the norm of
  the whole batch's gradient tensor (`torch.norm(grad, p=2)`), so one image's
  step length depends on which other images share its batch (each row moves
  by step_size * ||g_i|| / ||G||, about step_size / sqrt(B) for B similar
  images). Here g is normalised per image (row): an image's purification is a
  function of that image alone, which the smoothed classifier needs (its
  counts, certificates and Cached-OVC's exactness must not depend on the
  sampler's batch size). Per-image normalisation equals the official update at
  batch size 1.

  Geometry (useful when choosing step_size): g = -(b - cos(u, b) u) with b the
  unit blank, so ||g|| = sin(angle(u, b)) and g is tangent to the sphere; the
  update keeps u in the plane of (u, b) and turns it by atan(step_size)
  radians towards b. With step_size 30 that turn is alpha = 88.1 degrees: an
  embedding less than alpha from the blank overshoots it, and the next step
  turns it back exactly, so an even number of steps returns it to where it
  started (up to rounding). One more than alpha from the blank (angle theta)
  is not mirrored across the blank: the first two steps turn it by 2 alpha
  = 176.2 degrees towards and past the blank, to 176.2 - theta degrees from
  it on the other side (for theta < 176.2; 3.8 degrees from -z), and later
  pairs of steps leave it there. After an even number of steps (the default 10) it is z turned by
  2 alpha in the plane of (z, blank), near the opposite direction (measured
  on the toy model: docs/CLIPURE.md).

  Gradients (`gradient`; the values are the same for all three): "full"
  differentiates through everything, the inner gradient included (second
  order). "official" stops the gradient at each step's direction g / ||g||,
  as the official code does (`torch.autograd.grad` without `create_graph`):
  each step is then u -> (u - s d) / sqrt(1 + s^2) with d constant, and what
  remains of d purified / d z is the radial part plus the tangent part
  shrunk by (1 + s^2)^(-steps/2) across the plane of (z, blank) and by
  (1 + s^2)^(-steps) within it, where the exact Jacobian keeps 1 within the
  plane and sin(theta_out) / sin(theta_in) across it (docs/CLIPURE.md
  derives it). "bpda" passes the cotangent through unchanged (the identity on
  the backward pass).

  Args:
    z: `[B, d]` image embeddings (any norm; the norm is kept).
    blank: `[d]` blank-prompt embedding (any norm; only its direction counts).
    steps: number of updates, an integer >= 0 (0: z unchanged).
    step_size: finite, > 0.
    gradient: one of ATTACK_GRADIENTS: how the result is differentiated.

  Returns:
    `[B, d]` purified embeddings, ||output_i|| = ||z_i||, float32 (float64
    for float64 z, with x64 enabled). A row with ||g|| below
    GRADIENT_TOLERANCE (z parallel to the blank) is not moved by that step; a
    zero row stays zero. A row with a NaN or infinite entry comes out all NaN
    (a classifier counts it for no class, as it would the row unpurified),
    and so does every row when a traced blank is NaN, infinite or zero.

  Raises:
    ConfigError: steps or step_size out of range; an unknown gradient.
    InputError: shapes that are not [B, d] and [d] of the same d; a concrete
      blank that is NaN, infinite or zero (not checked under tracing).
  """
  check_purification_args(steps=steps, step_size=step_size)
  check_attack_gradient(gradient)
  check_blank(blank)
  z = jnp.asarray(z)
  z = z if z.dtype == jnp.float64 else z.astype(jnp.float32)
  blank = jnp.asarray(blank).astype(z.dtype)
  if z.ndim != 2 or blank.ndim != 1 or z.shape[-1] != blank.shape[-1]:
    raise InputError(f"purify takes embeddings [B, d] and a blank [d]; got "
                     f"{z.shape} and {blank.shape}")
  if not steps:
    return jnp.where(_finite_rows(z, blank), z, jnp.nan)
  if gradient == "bpda":
    return _purify_identity_backward(z, blank, jnp.asarray(step_size, z.dtype),
                                     int(steps))
  return _purify_rows(z, blank, steps, step_size, gradient == "official")


def _finite_rows(z: jax.Array, blank: jax.Array) -> jax.Array:
  """bool [B, 1]: rows that are finite, with a blank that has a direction.
  In the graph, so that it holds under jit too: a non-finite row (or a blank
  without direction) must count for no class, never for class 0."""
  finite = jnp.all(jnp.isfinite(z), axis=-1, keepdims=True)
  return finite & jnp.all(jnp.isfinite(blank)) & jnp.any(blank != 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _purify_identity_backward(z, blank, step_size, steps):
  """The purification, differentiated as the identity in z (BPDA)."""
  return _purify_rows(z, blank, steps, step_size, False)


def _purify_identity_backward_fwd(z, blank, step_size, steps):
  return _purify_rows(z, blank, steps, step_size, False), (blank, step_size)


def _purify_identity_backward_bwd(steps, residuals, cotangent):
  del steps
  blank, step_size = residuals
  return cotangent, jnp.zeros_like(blank), jnp.zeros_like(step_size)


_purify_identity_backward.defvjp(_purify_identity_backward_fwd,
                                 _purify_identity_backward_bwd)


def _purify_rows(z: jax.Array, blank: jax.Array, steps: int, step_size: Any,
                 detach_directions: bool) -> jax.Array:
  """`purify`'s steps on checked inputs; `detach_directions`: each step's
  direction is a constant to differentiation (the official gradient)."""
  finite = _finite_rows(z, blank)
  # Zero and non-finite rows are purified as ones and replaced again, so
  # that neither the result nor its gradient sees a 0 / 0 or a NaN.
  nonzero = jnp.sum(jnp.where(finite, z * z, 0.0), axis=-1, keepdims=True) > 0
  usable = nonzero & finite
  z_safe = jnp.where(usable, z, 1.0)
  r = _safe_norm(z_safe)
  u = z_safe / r
  # The rows of the summed loss are independent: its gradient is each row's own.
  loss_grad = jax.grad(lambda v: jnp.sum(_negative_cosine(v, blank)))

  def step(u, _):
    g = r * loss_grad(r * u)
    g_sq = jnp.sum(g * g, axis=-1, keepdims=True)
    moves = g_sq > GRADIENT_TOLERANCE**2
    g_norm = jnp.sqrt(jnp.where(moves, g_sq, 1.0))
    direction = jnp.where(moves, g / g_norm, 0.0)
    if detach_directions:
      direction = jax.lax.stop_gradient(direction)
    u = u - step_size * direction
    return u / _safe_norm(u), None

  u, _ = jax.lax.scan(step, u, None, length=int(steps))
  return jnp.where(finite, jnp.where(nonzero, r * u, 0.0), jnp.nan)


def _has_text_tower(loaded: Any) -> bool:
  model = getattr(loaded, "model", None)
  params = getattr(loaded, "params", None)
  if getattr(loaded, "tokenizer", None) is None or model is None:
    return False
  if not callable(getattr(model, "embed_texts", None)):
    return False
  return not (isinstance(params, Mapping) and params.get("text") is None)


def blank_embedding(loaded: Any,
                    templates: Sequence[str] | str = (SINGLE_BLANK_TEMPLATE,)
                    ) -> jax.Array:
  """The blank-prompt embedding CLIPure-Cos purifies towards: `[d]`.

  Each template is formatted with an empty class name (`t.format("")`, e.g.
  "a bad photo of a {}." -> "a bad photo of a ."), embedded by the text tower
  and L2-normalised; the mean over templates is returned (not renormalised:
  only its direction matters). With a dataset's templates this is the official
  code's `t_blank`; the default, [SINGLE_BLANK_TEMPLATE], is the paper's
  single blank prompt "a photo of a .".

  Args:
    loaded: a `LoadedClip` (its tokenizer and text tower are used).
    templates: templates with one '{}', or already blank texts; or one string.

  Raises:
    ConfigError: no text tower, no templates, or a template that cannot be
      formatted with one positional argument.
  """
  from ovc_jax import zeroshot  # pylint: disable=g-import-not-at-top
  if not _has_text_tower(loaded):
    raise ConfigError(
        "purification needs a text tower to embed the blank templates")
  if isinstance(templates, str):
    templates = [templates]
  templates = list(templates)
  if not templates:
    raise ConfigError("blank_embedding needs at least one template")
  texts = []
  for t in templates:
    if not isinstance(t, str) or not t.strip():
      raise ConfigError(f"a blank template must be a non-empty string; got {t!r}")
    try:
      texts.append(t.format(""))
    except (IndexError, KeyError, ValueError) as e:
      raise ConfigError(f"blank template {t!r} cannot be formatted with an "
                        f"empty class name: {e}") from e
  blank = jnp.mean(zeroshot.embed_prompts(loaded, texts), axis=0)
  if not float(jnp.linalg.norm(blank)) > 0:
    raise ConfigError("the blank templates' embeddings average to zero")
  return blank


def purified_encoder_params(encoder_params: Any,
                            blank: jax.Array) -> dict[str, Any]:
  """`PurifiedEncoder`'s params: the wrapped encoder's and the blank [d].

  Raises:
    InputError: a concrete blank that is NaN, infinite or zero.
  """
  check_blank(blank)
  return {"encoder": encoder_params, "blank": jnp.asarray(blank, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class PurifiedEncoder:
  """An image encoder followed by CLIPure-Cos purification.

  Hashable (the wrapped encoder must be too), so it can sit inside an
  `EmbeddingClassifier` that is the sampler's static `apply_fn`.

  Attributes:
    encoder: `(encoder_params, inputs [B, ...]) -> [B, d]`, e.g.
      `loaded.model.embed_images`.
    steps: purification steps (the official default, 10).
    step_size: purification step size (the official default, 30).
    attack_gradient: how an attack differentiates through the purification,
      one of ATTACK_GRADIENTS (see `purify`); it changes no value, only
      gradients. "full" (exact) unless an attack asks for another.

  Params: `purified_encoder_params(encoder_params, blank)`.
  """

  encoder: Callable[[Any, jax.Array], jax.Array]
  steps: int = DEFAULT_STEPS
  step_size: float = DEFAULT_STEP_SIZE
  attack_gradient: str = DEFAULT_ATTACK_GRADIENT

  def __post_init__(self):
    check_purification_args(steps=self.steps, step_size=self.step_size)
    check_attack_gradient(self.attack_gradient, purifies=self.steps > 0)

  def __call__(self, params: Any, inputs: jax.Array) -> jax.Array:
    # float32 throughout, as the official code runs.
    z = self.encoder(params["encoder"], inputs).astype(jnp.float32)
    return purify(z, params["blank"], steps=self.steps,
                  step_size=self.step_size, gradient=self.attack_gradient)


def with_attack_gradient(classifier: Any, gradient: str) -> Any:
  """`classifier` with its purification differentiated by `gradient`.

  Takes an `EmbeddingClassifier` (or any frozen dataclass with an `encoder`
  field) whose encoder is a `PurifiedEncoder`, and returns a copy whose
  encoder has `attack_gradient=gradient`; "full" returns any classifier
  unchanged.

  Raises:
    ConfigError: an unknown gradient; a gradient other than "full" for a
      classifier that does not purify.
  """
  encoder = getattr(classifier, "encoder", None)
  purifies = isinstance(encoder, PurifiedEncoder) and encoder.steps > 0
  check_attack_gradient(gradient, purifies=purifies)
  if not isinstance(encoder, PurifiedEncoder):
    return classifier
  return dataclasses.replace(
      classifier, encoder=dataclasses.replace(encoder, attack_gradient=gradient))
