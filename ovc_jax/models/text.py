"""CLIP's text tower: a causal transformer pooled at the end-of-text token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovc_jax.models.config import TextConfig
from ovc_jax.models.layers import Dtype, Transformer


def pool_positions(token_ids: jax.Array, config: TextConfig) -> jax.Array:
  """Where each sequence is pooled: `[B, L]` int -> `[B]` int.

  'argmax' is OpenAI's rule (the EOT token has the largest id); 'eos' is the
  first occurrence of `eos_token_id` (position 0 if there is none, as in
  transformers).
  """
  if config.pooling == "argmax":
    return jnp.argmax(token_ids, axis=-1)
  return jnp.argmax(token_ids == config.eos_token_id, axis=-1)


class TextTransformer(nn.Module):
  """Token ids `[B, L]` (L <= context_length) -> embeddings `[B, embed_dim]`."""

  config: TextConfig
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = token_ids.shape[1]
    x = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")(token_ids)
    pos = self.param("positional_embedding", nn.initializers.zeros,
                     (cfg.context_length, cfg.width))
    # The residual stream stays float32; blocks compute in `dtype`.
    x = x + pos[:length]
    x = Transformer(cfg.layers, cfg.heads, cfg.mlp_dim, cfg.activation,
                    cfg.layer_norm_eps, self.dtype, causal=True,
                    name="transformer")(x)
    # The final layer norm is per position, so pooling first is the same
    # computation on one position instead of L.
    x = x[jnp.arange(x.shape[0]), pool_positions(token_ids, cfg)]
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     name="ln_final")(x)
    return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                    name="projection")(x)
