"""CLIP zero-shot classifiers: class embeddings from prompts.

For a prompt template t (e.g. "a photo of a {}.") and class names c_1..c_C,

    U_t[c] = T(t.format(c_c)) / ||T(t.format(c_c))||        [C, d]
    f_t(x) = argmax_c (U_t z(x))[c],   z(x) = I(x) / ||I(x)||

CLIP's prompt ensemble averages the normalised rows over templates and
renormalises. The logit scale exp(s) is left out: it does not change argmax.
The predictions f_t are `ovc_jax.classifiers.predict_from_embeddings`.

Every function takes a CLIP's text side, `clip`: a `LoadedClip`, or a
`TextTower(model, params, tokenizer)` for a model in hand (e.g. one being
trained), which has the same three fields.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.classifiers import l2_normalize
from ovc_jax.prompts import validate_class_names, validate_templates
from ovc_jax.models import ClipModel, LoadedClip

# Texts per text-encoder call; the last chunk is padded so one shape compiles.
TEXT_BATCH = 256


class TextTower(NamedTuple):
  """A CLIP's text side: what zero-shot class embeddings need of it.

  A `LoadedClip` has these fields too and may be passed wherever a TextTower
  is taken.

  Attributes:
    model: the hashable `ClipModel`.
    params: its params.
    tokenizer: `list[str] -> np.int32 [B, context_length]`.
  """

  model: ClipModel
  params: Any
  tokenizer: Callable[[Sequence[str]], np.ndarray]


Clip = LoadedClip | TextTower


def embed_in_batches(embed_fn: Callable[[np.ndarray], jax.Array],
                     inputs: np.ndarray, batch_size: int) -> jax.Array:
  """`embed_fn` over `inputs` `[N, ...]` in batches of one shape: `[N, d]`.

  Batches hold `min(batch_size, N)` rows; the last one is padded with copies
  of its last row (and those rows dropped), so one shape compiles whatever N.
  """
  inputs = np.asarray(inputs)
  n = inputs.shape[0]
  batch = min(batch_size, n)
  pad = (-n) % batch
  inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
  chunks = [embed_fn(inputs[i:i + batch])
            for i in range(0, inputs.shape[0], batch)]
  return jnp.concatenate(chunks)[:n]


def _embed_texts_fn(model: ClipModel, params, token_ids: jax.Array) -> jax.Array:
  return l2_normalize(model.embed_texts(params, token_ids))


_embed_texts = jax.jit(_embed_texts_fn, static_argnums=0)


def embed_prompts(clip: Clip, texts: Sequence[str]) -> jax.Array:
  """L2-normalised text embeddings of `texts`: `[N, d]` float32."""
  return embed_in_batches(
      lambda ids: _embed_texts(clip.model, clip.params, ids),
      clip.tokenizer(list(texts)), TEXT_BATCH)


def class_embeddings(clip: Clip, template: str,
                     class_names: Sequence[str]) -> jax.Array:
  """One prompt's class matrix U_t: `[C, d]`, L2-normalised rows.

  Raises:
    ConfigError: an empty or '{}'-less template, or an empty class list.
  """
  template, = validate_templates([template])
  # Duplicate names are allowed: CLIP's published ImageNet list has two pairs.
  names = validate_class_names(class_names, allow_duplicates=True)
  return embed_prompts(clip, [template.format(c) for c in names])


def stack_prompts(clip: Clip, templates: Sequence[str],
                  class_names: Sequence[str]) -> jax.Array:
  """The class matrices of P prompts: `[P, C, d]`, L2-normalised rows."""
  templates = validate_templates(templates)
  names = validate_class_names(class_names, allow_duplicates=True)
  texts = [t.format(c) for t in templates for c in names]
  return embed_prompts(clip, texts).reshape(len(templates), len(names), -1)


def ensemble(class_matrices: jax.Array) -> jax.Array:
  """CLIP's prompt ensemble of stacked class matrices `[P, C, d]` (from
  `stack_prompts`): the mean over prompts, rows renormalised. `[C, d]`."""
  return l2_normalize(jnp.mean(jnp.asarray(class_matrices), axis=0))


def ensemble_class_embeddings(clip: Clip, templates: Sequence[str],
                              class_names: Sequence[str]) -> jax.Array:
  """CLIP's prompt ensemble of `templates`: `[C, d]`."""
  return ensemble(stack_prompts(clip, templates, class_names))
