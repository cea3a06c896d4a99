"""`ClipModel`: CLIP's two encoders as pure functions of params.

`ClipModel` is a frozen, hashable dataclass (config and compute dtype only), so
it and its bound methods can be static arguments of `jax.jit`; the params are
always an argument, never closed over:

  model = ClipModel(config)
  params = model.init(jax.random.key(0))
  z = jax.jit(model.embed_images)(params, images)      # [B, embed_dim]

Params: `{'vision': ..., 'text': ..., 'logit_scale': []}`, float32 whatever
the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import preprocessing
from ovc_jax.errors import ConfigError, InputError
from ovc_jax.models import initialization
from ovc_jax.models.config import CLIPConfig
from ovc_jax.models.resnet import ModifiedResNet
from ovc_jax.models.text import TextTransformer
from ovc_jax.models.vit import VisionTransformer

Params = Any
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BoundEncoder:
  """`model.embed_images` / `model.embed_texts`, comparing by value.

  Python's bound methods compare and hash their `self` by identity, so the
  bound methods of two equal models would differ as static jit arguments (and
  retrace). This one compares (model, function) by value.
  """

  model: Any
  fn: Callable[..., Any]

  def __call__(self, params: Params, inputs: jax.Array) -> jax.Array:
    return self.fn(self.model, params, inputs)

  @property
  def __name__(self) -> str:  # For jit's and the profiler's labels.
    return self.fn.__name__


class encoder_method:  # pylint: disable=invalid-name
  """Decorator: instance access gives a `BoundEncoder`, class access the function."""

  def __init__(self, fn: Callable[..., Any]):
    self.fn = fn
    self.__doc__ = fn.__doc__

  def __get__(self, obj: Any, objtype: Any = None) -> Any:
    return self.fn if obj is None else BoundEncoder(obj, self.fn)


@dataclasses.dataclass(frozen=True)
class ClipModel:
  """CLIP's image and text encoders.

  Attributes:
    config: the architecture.
    dtype: compute dtype, 'float32' (default) or 'bfloat16' (for accelerators;
      params stay float32 and outputs are float32).
  """

  config: CLIPConfig
  dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.config, CLIPConfig):
      raise ConfigError(f"ClipModel needs a CLIPConfig; got {type(self.config)}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  def _vision(self) -> nn.Module:
    cls = (VisionTransformer if self.config.vision.architecture == "vit"
           else ModifiedResNet)
    return cls(self.config.vision, self.config.embed_dim, jnp.dtype(self.dtype))

  def _text(self) -> nn.Module:
    return TextTransformer(self.config.text, self.config.embed_dim,
                           jnp.dtype(self.dtype))

  def init(self, key: jax.Array) -> Params:
    """Random params (OpenAI's initialisation scheme), built by one jitted call."""
    return _jit_init(self, key)

  def _init(self, key: jax.Array) -> Params:
    return initialization.init_params(self.config, self.param_shapes(), key)

  def param_shapes(self) -> Params:
    """The params' `jax.ShapeDtypeStruct`s, without allocating them."""
    s = self.image_size

    def shapes(key):
      images = jnp.zeros((1, s, s, 3), jnp.float32)
      tokens = jnp.zeros((1, self.config.text.context_length), jnp.int32)
      k_vision, k_text = jax.random.split(key)
      return {
          "vision": self._vision().init(k_vision, images)["params"],
          "text": self._text().init(k_text, tokens)["params"],
          "logit_scale": jnp.zeros((), jnp.float32),
      }

    return jax.eval_shape(shapes, jax.random.key(0))

  @encoder_method
  def embed_images(self, params: Params, images: jax.Array) -> jax.Array:
    """Projected image features (not L2-normalised).

    Args:
      params: this model's params.
      images: `[B, S, S, 3]` float32, channels last, CLIP-normalised,
        S = config.vision.image_size.

    Returns:
      `[B, embed_dim]` float32.

    Raises:
      InputError: at trace time, for images of another shape.
    """
    s = self.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
      raise InputError(f"images must have shape [B, {s}, {s}, 3] (CLIP-"
                       f"preprocessed, channels last); got {images.shape}")
    z = self._vision().apply({"params": params["vision"]}, images)
    return z.astype(jnp.float32)

  @encoder_method
  def embed_texts(self, params: Params, token_ids: jax.Array) -> jax.Array:
    """Projected text features (not L2-normalised).

    Args:
      params: this model's params.
      token_ids: `[B, L]` int32, L <= config.text.context_length, each row
        holding its end-of-text token (see `ClipTokenizer`).

    Returns:
      `[B, embed_dim]` float32.

    Raises:
      InputError: at trace time, for ids of another rank or a longer context.
    """
    length = self.config.text.context_length
    if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= length:
      raise InputError(f"token ids must have shape [B, L] with L <= {length}; "
                       f"got {token_ids.shape}")
    z = self._text().apply({"params": params["text"]}, token_ids)
    return z.astype(jnp.float32)

  # Checked entry points: validate host arrays, then call the jitted encoder.

  def embed_images_checked(self, params: Params, images: Any) -> jax.Array:
    """`embed_images` on a host array, validated first.

    Raises:
      InputError: wrong rank, channel count, spatial size, or non-finite values.
    """
    arr = check_model_images(images, self.image_size)
    return _jit_embed_images(self, params, arr)

  def embed_texts_checked(self, params: Params, token_ids: Any) -> jax.Array:
    """`embed_texts` on a host array of token ids, validated first.

    Raises:
      InputError: wrong rank or dtype, too long, or ids outside the vocabulary.
    """
    t = self.config.text
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise InputError(f"token ids must be an integer array [B, L]; got "
                       f"shape {ids.shape}, dtype {ids.dtype}")
    if not 1 <= ids.shape[1] <= t.context_length:
      raise InputError(f"token ids have length {ids.shape[1]}; the model takes "
                       f"1 to {t.context_length}")
    if ids.size and (ids.min() < 0 or ids.max() >= t.vocab_size):
      raise InputError(f"token ids must lie in [0, {t.vocab_size}); got "
                       f"[{ids.min()}, {ids.max()}]")
    return _jit_embed_texts(self, params, ids.astype(np.int32))


def check_model_images(images: Any, image_size: int) -> np.ndarray:
  """`preprocessing.check_images`, plus the encoder's spatial size."""
  arr = preprocessing.check_images(images)
  if arr.shape[1:3] != (image_size, image_size):
    raise InputError(
        f"images must be {image_size}x{image_size} (the model's input size, "
        f"after CLIP preprocessing); got shape {arr.shape}")
  return arr


_jit_init = jax.jit(ClipModel._init, static_argnums=0)  # pylint: disable=protected-access
_jit_embed_images = jax.jit(ClipModel.embed_images, static_argnums=0)
_jit_embed_texts = jax.jit(ClipModel.embed_texts, static_argnums=0)
