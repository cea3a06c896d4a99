"""CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64).

Differences from a torchvision ResNet, as in OpenAI's model.py: a 3-convolution
stem followed by an average pool; anti-aliased strides (an average pool before
the strided part instead of a strided convolution); an attention pool in place
of global average pooling. Batch norms run in inference mode: they apply the
running statistics stored with the weights (`mean`, `var` params).

Channels-last throughout (`[B, H, W, C]`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovc_jax.models.config import VisionConfig
from ovc_jax.models.layers import Dtype, attention

EXPANSION = 4  # Bottleneck output channels per `planes`.


class FrozenBatchNorm(nn.Module):
  """Inference-mode batch norm: (x - mean) / sqrt(var + eps) * scale + bias."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    # One multiply-add per element, folded per channel the way PyTorch's
    # inference batch norm computes it.
    mul = scale * jax.lax.rsqrt(var + self.eps)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def avg_pool(x: jax.Array, stride: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H // s, W // s, C]`, as torch's AvgPool2d(s)."""
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> (avgpool) -> 1x1 residual block, expansion 4."""

  planes: int
  stride: int = 1
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(features, kernel, name):
      pad = kernel // 2
      return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                     use_bias=False, dtype=self.dtype, name=name)

    def bn(name):
      return FrozenBatchNorm(self.eps, self.dtype, name=name)

    out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1")(x)))
    out = nn.relu(bn("bn2")(conv(self.planes, 3, "conv2")(out)))
    if self.stride > 1:
      out = avg_pool(out, self.stride)
    out = bn("bn3")(conv(self.planes * EXPANSION, 1, "conv3")(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      if self.stride > 1:
        identity = avg_pool(identity, self.stride)
      identity = bn("downsample_bn")(
          conv(self.planes * EXPANSION, 1, "downsample_conv")(identity))
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Attention pooling: the mean token attends over all positions.

  Tokens are the spatial mean followed by the H*W positions, plus a learned
  positional embedding; only the mean token is a query, so its projection is
  computed alone, while keys and values share one fused projection.
  """

  num_heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, output_dim]`."""
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param("positional_embedding", nn.initializers.zeros, (h * w + 1, c))
    x = x + pos.astype(x.dtype)
    q = nn.Dense(c, dtype=self.dtype, name="q")(x[:, :1])
    kv = nn.Dense(2 * c, dtype=self.dtype, name="kv")(x)
    k, v = kv.reshape(b, h * w + 1, 2, self.num_heads, head_dim).transpose(
        2, 0, 3, 1, 4)  # Each [B, heads, HW + 1, head_dim].
    q = q.reshape(b, self.num_heads, 1, head_dim)
    out = attention(q, k, v).reshape(b, c)
    return nn.Dense(self.output_dim, dtype=self.dtype, name="c")(out)


class ModifiedResNet(nn.Module):
  """Images `[B, S, S, 3]` (CLIP-normalised) -> embeddings `[B, embed_dim]`."""

  config: VisionConfig
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    width, eps = cfg.width, cfg.batch_norm_eps
    x = images.astype(self.dtype)
    stem = ((width // 2, 2), (width // 2, 1), (width, 1))
    for i, (features, stride) in enumerate(stem, start=1):
      x = nn.Conv(features, (3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  name=f"conv{i}")(x)
      x = nn.relu(FrozenBatchNorm(eps, self.dtype, name=f"bn{i}")(x))
    x = avg_pool(x, 2)
    for stage, blocks in enumerate(cfg.layers):
      planes = width * 2**stage
      for j in range(blocks):
        stride = 2 if stage > 0 and j == 0 else 1
        x = Bottleneck(planes, stride, eps, self.dtype,
                       name=f"layer{stage + 1}_{j}")(x)
    return AttentionPool2d(cfg.heads, self.embed_dim, self.dtype,
                           name="attnpool")(x)
