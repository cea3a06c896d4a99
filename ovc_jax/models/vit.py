"""CLIP's Vision Transformer image tower.

Patches -> linear embedding, a class token, learned positional embedding,
'ln_pre', pre-LN residual blocks, 'ln_post' on the class token, then a
projection without bias to the joint embedding space.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovc_jax.models.config import VisionConfig
from ovc_jax.models.layers import Dtype, Transformer


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, (H/p) * (W/p), p * p * C]`, patches in row-major order.

  Each patch is flattened in (row, column, channel) order, matching a
  `[p, p, C, D]` (HWIO) convolution kernel reshaped to `[p * p * C, D]`.
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionTransformer(nn.Module):
  """Images `[B, S, S, 3]` (CLIP-normalised) -> embeddings `[B, embed_dim]`."""

  config: VisionConfig
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    p, width = cfg.patch_size, cfg.width
    # A stride-p convolution with a p x p kernel is one matmul over the
    # flattened patches.
    kernel = self.param("patch_embedding", nn.initializers.lecun_normal(),
                        (p, p, 3, width))  # HWIO, as a Flax convolution's.
    patches = patchify(images.astype(self.dtype), p)
    x = jnp.einsum("bnk,kd->bnd", patches,
                   kernel.reshape(p * p * 3, width).astype(self.dtype))
    cls = self.param("class_embedding", nn.initializers.zeros, (width,))
    pos = self.param("positional_embedding", nn.initializers.zeros,
                     (cfg.num_patches + 1, width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))
    x = jnp.concatenate([cls, x], axis=1) + pos
    # float32 out, so that the residual stream stays float32 under bfloat16
    # compute (as in the text tower); the blocks compute in `dtype`.
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                     name="ln_pre")(x)
    x = Transformer(cfg.layers, cfg.heads, cfg.mlp_dim, cfg.activation,
                    cfg.layer_norm_eps, self.dtype, last_num_queries=1,
                    name="transformer")(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     name="ln_post")(x[:, 0])
    return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                    name="proj")(x)
