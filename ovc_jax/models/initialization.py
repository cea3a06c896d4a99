"""Random CLIP params, following OpenAI's `CLIP.initialize_parameters`.

The values are chosen here by parameter name, from one normal draw for the
whole model: XLA compiles one random-number op quickly, while one per
parameter (what per-module initialisers give) takes tens of seconds to compile
on CPU.

  token embedding          N(0, 0.02)        text positional    N(0, 0.01)
  attention qkv            N(0, w^-1/2)      attention out      N(0, w^-1/2 (2L)^-1/2)
  MLP fc                   N(0, (2w)^-1/2)   MLP proj           N(0, w^-1/2 (2L)^-1/2)
  ViT class/pos/proj       N(0, w^-1/2)      text projection    N(0, w^-1/2)
  convolutions             N(0, (2/fan_in)^1/2) (He; ResNet) or N(0, fan_in^-1/2) (patches)
  attention pool           N(0, c^-1/2)      batch norm         identity; bn3 scale 0
  biases 0, norm scales 1
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ovc_jax.models.config import LOGIT_SCALE_INIT, CLIPConfig

Params = Any


def _rule(path: tuple[str, ...], shape: tuple[int, ...],
          config: CLIPConfig) -> tuple[str, float]:
  """('normal', std), ('const', value) for the param at `path`."""
  name = path[-1]
  parent = path[-2] if len(path) > 1 else ""
  tower = config.vision if path[0] == "vision" else config.text
  if path[0] == "logit_scale":
    return "const", LOGIT_SCALE_INIT
  if name in ("bias", "mean"):
    return "const", 0.0
  if name == "var":
    return "const", 1.0
  if name == "scale":
    # OpenAI zero-initialises bn3: each residual block starts as the identity.
    return "const", 0.0 if parent == "bn3" else 1.0
  if "transformer" in path:
    width = tower.width
    proj_std = width**-0.5 * (2 * tower.layers)**-0.5
    return "normal", {"qkv": width**-0.5, "out": proj_std,
                      "fc": (2 * width)**-0.5, "proj": proj_std}[parent]
  if path[0] == "text":
    if name == "embedding":
      return "normal", 0.02
    if name == "positional_embedding":
      return "normal", 0.01
    return "normal", tower.width**-0.5  # projection
  if "attnpool" in path:
    return "normal", (tower.width * 32)**-0.5
  if name == "patch_embedding":
    return "normal", math.prod(shape[:-1])**-0.5
  if len(shape) == 4:  # ResNet convolution, HWIO.
    return "normal", (2 / math.prod(shape[:-1]))**0.5
  return "normal", config.vision.width**-0.5  # ViT class, positions, proj.


def init_params(config: CLIPConfig, shapes: Params, key: jax.Array) -> Params:
  """Params with the tree and shapes of `shapes`, values by OpenAI's scheme."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  rules = []
  for path, leaf in leaves:
    names = tuple(getattr(p, "key", str(p)) for p in path)
    rules.append(_rule(names, tuple(leaf.shape), config))
  total = sum(math.prod(leaf.shape) for (_, leaf), (kind, _) in zip(leaves, rules)
              if kind == "normal")
  noise = jax.random.normal(key, (total,), jnp.float32)
  values, offset = [], 0
  for (_, leaf), (kind, value) in zip(leaves, rules):
    if kind == "normal":
      size = math.prod(leaf.shape)
      values.append(value * noise[offset:offset + size].reshape(leaf.shape))
      offset += size
    else:
      values.append(jnp.full(leaf.shape, value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, values)
