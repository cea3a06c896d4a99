"""Cached-OVC (paper Alg. 3): certify a new prompt from cached noisy embeddings.

The image embeddings of an input's noisy samples do not depend on the prompt.
Certifying the first prompt with the standard certifier keeps them: the
selection embeddings E0 [n0, d] and the estimation embeddings E [n, d], drawn
with the input's key. A new prompt with class matrix U* is then certified with
no image-encoder pass at all:

  counts0 = bincount(argmax(E0 U*^T)),  counts = bincount(argmax(E U*^T))

followed by CERTIFY's last lines. Predictions come from the same
`predict_from_embeddings` on the same embedding bits as in standard RS, so the
certificate is identical to standard RS with the same key: same prediction,
same counts, same radius. Unlike the paper's pseudocode, the selection counts
come from their own n0 draws, disjoint from the n estimation draws, as Cohen
et al.'s theorem requires.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import Certificate
from ovc_jax.classifiers import check_class_embeddings, predict_from_embeddings
from ovc_jax.errors import ConfigError, InputError


class EmbeddingDraws(NamedTuple):
  """The cached embeddings of one input at one sigma."""

  selection: jax.Array   # [n0, d]
  estimation: jax.Array  # [n, d]


def embeddings_from_draws(draws: sampler.Draws) -> EmbeddingDraws:
  """The embeddings kept by a standard certification run with "embeddings"."""
  return EmbeddingDraws(draws.selection["embeddings"],
                        draws.estimation["embeddings"])


@functools.partial(jax.jit, static_argnames=("num_classes", "batch_size"))
def _count(embeddings, class_embeddings, *, num_classes, batch_size):
  m = embeddings.shape[0]
  chunk = min(batch_size, m)
  num_chunks = math.ceil(m / chunk)
  padded = jnp.pad(embeddings, ((0, num_chunks * chunk - m), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk, -1)

  def add_chunk(counts, c):
    preds = predict_from_embeddings(chunks[c], class_embeddings)
    valid = (c * chunk + jnp.arange(chunk)) < m
    return counts + sampler.count_classes(preds, valid, num_classes), None

  counts0 = jnp.zeros(class_embeddings.shape[:-2] + (num_classes,), jnp.int32)
  counts, _ = jax.lax.scan(add_chunk, counts0, jnp.arange(num_chunks))
  return counts


def count_predictions(embeddings: jax.Array, class_embeddings: jax.Array, *,
                      batch_size: int = 10_000) -> jax.Array:
  """Histogram of argmax(E U^T): `[C]` for U [C, d], `[P, C]` for U [P, C, d].

  One read of the embeddings serves all P prompts. A non-finite embedding
  (a sample the encoder gave no number for) counts for no class, exactly as
  in standard RS.
  """
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim != 2:
    raise InputError(f"cached embeddings must be [m, d]; got shape "
                     f"{embeddings.shape}")
  class_embeddings = check_class_embeddings(
      class_embeddings, embedding_size=int(embeddings.shape[1]),
      embeddings_name="the cached embeddings")
  if batch_size < 1:
    raise ConfigError(f"batch size must be >= 1; got {batch_size}")
  return _count(embeddings, class_embeddings,
                num_classes=int(class_embeddings.shape[-2]),
                batch_size=int(batch_size))


def certify_cached_many(cache: EmbeddingDraws, class_embeddings: jax.Array, *,
                        sigma: float, alpha: float = certificates.DEFAULT_ALPHA,
                        batch_size: int = 10_000) -> list[Certificate]:
  """Certificates of P prompts (U [P, C, d]) from one read of the cache."""
  if not 0.0 < alpha < 1.0:
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")
  class_embeddings = jnp.asarray(class_embeddings)  # checked when counted
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  return certificates.certificates_from_counts(
      count_predictions(cache.selection, class_embeddings,
                        batch_size=batch_size),
      count_predictions(cache.estimation, class_embeddings,
                        batch_size=batch_size),
      n=int(cache.estimation.shape[0]), sigma=sigma, alpha=alpha)


def certify_cached(cache: EmbeddingDraws, class_embeddings: jax.Array, *,
                   sigma: float, alpha: float = certificates.DEFAULT_ALPHA,
                   batch_size: int = 10_000) -> Certificate:
  """The certificate of one prompt (U [C, d]); no image-encoder pass."""
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_cached takes one prompt's [C, d] class matrix; "
                     "use certify_cached_many for [P, C, d]")
  return certify_cached_many(cache, class_embeddings, sigma=sigma, alpha=alpha,
                             batch_size=batch_size)[0]
