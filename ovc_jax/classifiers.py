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
once (their predictions are then `[B, P]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ovc_jax import preprocessing


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


def predict_from_embeddings(embeddings: jax.Array,
                            class_embeddings: jax.Array) -> jax.Array:
  """`argmax_c (U z)[c]` per sample: int32 `[B]` or `[B, P]`."""
  return jnp.argmax(prompt_logits(embeddings, class_embeddings),
                    axis=-1).astype(jnp.int32)


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
    """This classifier's params: the encoder's and a class matrix [C, d] or [P, C, d]."""
    return {"encoder": encoder_params, "class_embeddings": class_embeddings}

  @staticmethod
  def class_embeddings(params: Any) -> jax.Array:
    return params["class_embeddings"]

  @staticmethod
  def num_classes(params: Any) -> int:
    return int(params["class_embeddings"].shape[-2])

  def embed(self, encoder_params: Any, inputs: jax.Array) -> jax.Array:
    if self.preprocess is not None:
      inputs = preprocessing.preprocess(inputs, self.preprocess)
    z = self.encoder(encoder_params, inputs).astype(jnp.float32)
    return l2_normalize(z) if self.normalize else z

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
