"""CLIP zero-shot classifiers: class embeddings from prompts, and predictions.

For a prompt template t (e.g. "a photo of a {}.") and class names c_1..c_C,

    U_t[c] = T(t.format(c_c)) / ||T(t.format(c_c))||        [C, d]
    f_t(x) = argmax_c (U_t z(x))[c],   z(x) = I(x) / ||I(x)||

CLIP's prompt ensemble averages the normalised rows over templates and
renormalises. The logit scale exp(s) is left out: it does not change argmax.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.classifiers import l2_normalize, predict_from_embeddings, prompt_logits
from ovc_jax.errors import InputError
from ovc_jax.prompts import validate_class_names, validate_templates
from ovc_jax.models import ClipModel, LoadedClip

# Texts per text-encoder call; the last chunk is padded so one shape compiles.
TEXT_BATCH = 256


def _embed_texts_fn(model: ClipModel, params, token_ids: jax.Array) -> jax.Array:
  return l2_normalize(model.embed_texts(params, token_ids))


_embed_texts = jax.jit(_embed_texts_fn, static_argnums=0)


def embed_prompts(loaded: LoadedClip, texts: Sequence[str]) -> jax.Array:
  """L2-normalised text embeddings of `texts`: `[N, d]` float32."""
  ids = loaded.tokenizer(list(texts))
  n = ids.shape[0]
  batch = min(TEXT_BATCH, n)
  pad = (-n) % batch
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
  chunks = [_embed_texts(loaded.model, loaded.params, ids[i:i + batch])
            for i in range(0, ids.shape[0], batch)]
  return jnp.concatenate(chunks)[:n]


def class_embeddings(loaded: LoadedClip, template: str,
                     class_names: Sequence[str]) -> jax.Array:
  """One prompt's class matrix U_t: `[C, d]`, L2-normalised rows.

  Raises:
    ConfigError: an empty or '{}'-less template, or an empty class list.
  """
  template, = validate_templates([template])
  # Duplicate names are allowed: CLIP's published ImageNet list has two pairs.
  names = validate_class_names(class_names, allow_duplicates=True)
  return embed_prompts(loaded, [template.format(c) for c in names])


def stack_prompts(loaded: LoadedClip, templates: Sequence[str],
                  class_names: Sequence[str]) -> jax.Array:
  """The class matrices of P prompts: `[P, C, d]`, L2-normalised rows."""
  templates = validate_templates(templates)
  names = validate_class_names(class_names, allow_duplicates=True)
  texts = [t.format(c) for t in templates for c in names]
  return embed_prompts(loaded, texts).reshape(len(templates), len(names), -1)


def ensemble_class_embeddings(loaded: LoadedClip, templates: Sequence[str],
                              class_names: Sequence[str]) -> jax.Array:
  """CLIP's prompt ensemble: mean of the normalised rows over templates,
  renormalised. `[C, d]`."""
  return l2_normalize(stack_prompts(loaded, templates, class_names).mean(axis=0))


def _check_embeddings(image_embeddings: jax.Array, class_matrix: jax.Array) -> None:
  if image_embeddings.ndim != 2:
    raise InputError(f"image embeddings must be [B, d]; got {image_embeddings.shape}")
  if class_matrix.ndim not in (2, 3):
    raise InputError(f"class embeddings must be [C, d] or [P, C, d]; got "
                     f"{class_matrix.shape}")
  if image_embeddings.shape[-1] != class_matrix.shape[-1]:
    raise InputError(
        f"image embeddings have dimension {image_embeddings.shape[-1]} but the "
        f"class embeddings {class_matrix.shape[-1]}")


def zero_shot_logits(image_embeddings: jax.Array,
                     class_matrix: jax.Array) -> jax.Array:
  """U z with z the L2-normalised image embedding (no logit scale).

  Args:
    image_embeddings: `[B, d]`, normalised or not.
    class_matrix: `[C, d]` or `[P, C, d]` (from `class_embeddings` or
      `stack_prompts`).

  Returns:
    `[B, C]` or `[B, P, C]` float32 cosine similarities.
  """
  _check_embeddings(image_embeddings, class_matrix)
  return prompt_logits(l2_normalize(image_embeddings), class_matrix)


def zero_shot_predict(image_embeddings: jax.Array,
                      class_matrix: jax.Array) -> jax.Array:
  """argmax_c (U z)[c]: int32 `[B]` or `[B, P]`."""
  _check_embeddings(image_embeddings, class_matrix)
  return predict_from_embeddings(l2_normalize(image_embeddings), class_matrix)
