"""Base classifiers in the form the sampler evaluates.

A zero-shot CLIP classifier is an image encoder followed by a prompt's class
matrix: f_t(x) = argmax_c (U_t z(x))[c], z the L2-normalised image embedding.
Every certifier sees it through the same two pieces:

  - `EmbeddingClassifier`, the base classifier the sampler runs: encoder, then
    `predict_from_embeddings`; it also hands back the embeddings, so the first
    prompt's certification can fill the Cached-OVC cache with the very vectors
    its predictions came from.
  - `predict_from_embeddings`, the one function that turns embeddings into
    predictions, used by standard RS and by Cached-OVC alike: the same function
    on the same embeddings gives the same bits, which is what makes Cached-OVC
    exact.

Class matrices are `[C, d]` for one prompt or `[P, C, d]` for P prompts at
once (their predictions are then `[B, P]`). `check_class_embeddings` is the one
validation every class matrix passes where it enters (here, in the sampler,
in Cached-OVC and in MVN-OVC).

Bad numbers: a noisy sample whose embedding is not finite (NaN or inf, e.g. a
bfloat16 overflow in the encoder) has no class: its prediction is ABSTAIN
(-1), which the counts drop. That only lowers pA, so it stays sound, as long
as the bound divides by the number of draws (see
`certificates.certificate_from_counts`). The embedding itself is kept as NaN,
so Cached-OVC gives the same predictions from the stored bits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import preprocessing
from ovc_jax import tracing
from ovc_jax.errors import InputError

# A sample with no class (non-finite embedding or logits); the same value as
# `certificates.ABSTAIN`, and dropped by `sampler.count_classes`.
NO_CLASS = -1


def _is_traced(x: Any) -> bool:
  return tracing.is_traced(x)


def check_class_embeddings(class_embeddings: Any, *,
                           ndims: Sequence[int] = (2, 3),
                           embedding_size: int | None = None,
                           embeddings_name: str = "the model's embeddings"
                           ) -> jax.Array:
  """Validates a class matrix `[C, d]` (or `[P, C, d]`); returns it as an array.

  Raises InputError (naming the problem) for a non-numeric matrix, another
  rank, no classes, NaN or infinite entries (a NaN row would win every
  argmax), or an embedding size other than `embedding_size`. Traced values
  (inside jit or vmap) are checked for shape only; concrete ones for their
  values too, on the host with NumPy (see `ovc_jax.tracing`), also inside
  jit, where `jnp` would stage the check into the trace.
  """
  dtype = getattr(class_embeddings, "dtype", None)
  if dtype is None:
    dtype = np.asarray(class_embeddings).dtype
  if not (jnp.issubdtype(dtype, jnp.floating)
          or jnp.issubdtype(dtype, jnp.integer)):
    raise InputError(f"class matrix must hold real numbers; got dtype {dtype}")
  u = jnp.asarray(class_embeddings)
  if u.ndim not in tuple(ndims):
    shapes = " or ".join({2: "[C, d]", 3: "[P, C, d]"}.get(k, f"{k}-d")
                         for k in ndims)
    raise InputError(f"class matrix must be {shapes}; got shape {u.shape}")
  if u.shape[-2] < 1 or u.shape[-1] < 1:
    raise InputError(f"class matrix has no classes or no columns: shape {u.shape}")
  if embedding_size is not None and u.shape[-1] != embedding_size:
    raise InputError(
        f"class matrix {tuple(u.shape)} has embedding size {u.shape[-1]} but "
        f"{embeddings_name} have size {embedding_size}")
  if tracing.all_finite(class_embeddings) is False:
    raise InputError("class matrix contains NaN or infinite values")
  return u


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of `z` scaled to unit L2 norm."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def prompt_logits(embeddings: jax.Array, class_embeddings: jax.Array) -> jax.Array:
  """Zero-shot logits `U z` (without CLIP's logit scale, which keeps argmax).

  Args:
    embeddings: `[B, d]`.
    class_embeddings: `[C, d]` or `[P, C, d]`.

  Returns:
    `[B, C]` or `[B, P, C]` float32 logits.
  """
  spec = "bd,cd->bc" if class_embeddings.ndim == 2 else "bd,pcd->bpc"
  return jnp.einsum(spec, embeddings.astype(jnp.float32),
                    class_embeddings.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def argmax_or_no_class(logits: jax.Array) -> jax.Array:
  """`argmax` over the last axis, int32; NO_CLASS (-1) where a logit is not
  finite (the sample then counts for no class)."""
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  return jnp.where(finite, jnp.argmax(logits, axis=-1),
                   NO_CLASS).astype(jnp.int32)


def predict_from_embeddings(embeddings: jax.Array,
                            class_embeddings: jax.Array) -> jax.Array:
  """`argmax_c (U z)[c]` per sample: int32 `[B]` or `[B, P]`.

  A sample whose embedding (or logits) is not finite gets NO_CLASS (-1).
  """
  return argmax_or_no_class(prompt_logits(embeddings, class_embeddings))


@functools.lru_cache(maxsize=256)
def _embedding_shape(classifier, encoder_struct, input_struct):
  treedef, leaves = encoder_struct
  params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d)
                                        for s, d in leaves])
  return jax.eval_shape(classifier.embed, params, input_struct).shape


@dataclasses.dataclass(frozen=True)
class EmbeddingClassifier:
  """f(x) = argmax(U @ z(x)), z = encoder(x) (L2-normalised if `normalize`).

  Hashable, so it can be the sampler's static `apply_fn`.

  Attributes:
    encoder: `(encoder_params, inputs [B, ...]) -> [B, d]`, hashable (e.g. the
      bound method `ClipModel.embed_images`).
    normalize: L2-normalise the embeddings (CLIP: yes; it does not change the
      argmax, but it is what the caches store).
    preprocess: if set, CLIP preprocessing is applied to the noisy inputs first
      (noise in native [0, 1] pixel space); if None the inputs are already
      normalised (noise in normalised space, the default).

  Params: `EmbeddingClassifier.params(encoder_params, class_embeddings)`.
  """

  encoder: Callable[[Any, jax.Array], jax.Array]
  normalize: bool = True
  preprocess: preprocessing.PreprocessSpec | None = None

  @staticmethod
  def params(encoder_params: Any, class_embeddings: jax.Array) -> dict[str, Any]:
    """This classifier's params: the encoder's and a class matrix [C, d] or
    [P, C, d] (validated: see `check_class_embeddings`)."""
    return {"encoder": encoder_params,
            "class_embeddings": check_class_embeddings(class_embeddings)}

  def embedding_size(self, encoder_params: Any, input_shape: Sequence[int],
                     dtype: Any = jnp.float32) -> int:
    """d, the size of the embedding of one input of `input_shape` (traced
    once per shapes, nothing is computed)."""
    leaves, treedef = jax.tree.flatten(encoder_params)
    struct = (treedef, tuple((tuple(np.shape(a)), jnp.result_type(a))
                             for a in leaves))
    shape = _embedding_shape(
        self, struct, jax.ShapeDtypeStruct((1,) + tuple(input_shape), dtype))
    return int(shape[-1])

  def check_params(self, params: Any, input_shape: Sequence[int]) -> None:
    """Raises InputError for a class matrix with bad values or of another
    embedding size than the encoder's (the sampler calls this first)."""
    d = None
    if not any(_is_traced(a) for a in jax.tree.leaves(params["encoder"])):
      try:
        d = self.embedding_size(params["encoder"], input_shape)
      except (TypeError, ValueError):
        pass  # The encoder cannot take such inputs: its own call will say so.
    check_class_embeddings(params["class_embeddings"], embedding_size=d)

  @staticmethod
  def class_embeddings(params: Any) -> jax.Array:
    return params["class_embeddings"]

  @staticmethod
  def num_classes(params: Any) -> int:
    return int(params["class_embeddings"].shape[-2])

  def embed(self, encoder_params: Any, inputs: jax.Array) -> jax.Array:
    """Float32 `[B, d]` embeddings; a row that is not finite (NaN or inf in the
    encoder's output, or a norm that overflows) is all NaN."""
    if self.preprocess is not None:
      inputs = preprocessing.preprocess(inputs, self.preprocess)
    z = self.encoder(encoder_params, inputs).astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(z), axis=-1, keepdims=True)
    if self.normalize:
      norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
      finite = finite & jnp.isfinite(norm)
      z = z / jnp.maximum(norm, 1e-12)  # = l2_normalize(z)
    return jnp.where(finite, z, jnp.nan)

  def __call__(self, params: Any, inputs: jax.Array) -> dict[str, jax.Array]:
    z = self.embed(params["encoder"], inputs)
    # The barrier pins z as computed, so XLA cannot fold the normalisation into
    # the logits: predictions are then a function of the stored embedding bits
    # alone, exactly as Cached-OVC recomputes them.
    z = jax.lax.optimization_barrier(z)
    return {"embeddings": z,
            "predictions": predict_from_embeddings(z, params["class_embeddings"])}


@dataclasses.dataclass(frozen=True)
class LinearEncoder:
  """z = A x + c: an encoder whose noisy embeddings are exactly Gaussian.

  With it, an `EmbeddingClassifier(LinearEncoder(), normalize=False)` is a
  linear classifier argmax((U A) x + U c), for which P[f(x + e) = c] and the
  robust radius have closed forms: the test oracle of every certifier.

  Params: `{"A": [d, D], "c": [d]}`, D the flattened input size.
  """

  def __call__(self, params: Any, inputs: jax.Array) -> jax.Array:
    flat = inputs.reshape(inputs.shape[0], -1)
    return jnp.einsum("bD,dD->bd", flat, params["A"],
                      precision=jax.lax.Precision.HIGHEST) + params["c"]
