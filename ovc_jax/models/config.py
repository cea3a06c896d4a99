"""CLIP architecture configs: frozen, hashable, JSON-serialisable.

A `CLIPConfig` names every size the encoders need, so that a `ClipModel` built
from it can be a static argument of `jax.jit`. The presets are the published
OpenAI CLIP architectures; `config_from_hf` / `config_to_hf` translate to and
from a Hugging Face `config.json` (ViT image towers only: Hugging Face has no
ResNet CLIP).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ovc_jax.errors import ConfigError

ARCHITECTURES = ("vit", "resnet")
ACTIVATIONS = ("quick_gelu", "gelu")
POOLINGS = ("argmax", "eos")

# transformers keeps a legacy rule: a text config whose eos_token_id is 2 (the
# value of configs written before transformers PR #24773, e.g. every OpenAI
# checkpoint on the hub) pools at argmax(input_ids); any other id pools at its
# first occurrence.
HF_LEGACY_EOS_TOKEN_ID = 2

# OpenAI's initial logit scale, 1 / 0.07 (as HF's logit_scale_init_value).
LOGIT_SCALE_INIT = math.log(1 / 0.07)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The image tower.

  Attributes:
    architecture: 'vit' (Vision Transformer) or 'resnet' (CLIP's ModifiedResNet).
    image_size: side of the square input image, in pixels.
    width: ViT hidden size; ResNet stem width (64 for RN50, 80 for RN50x4).
    layers: ViT depth (an int); ResNet blocks per stage (4 ints).
    heads: ViT attention heads; ResNet attention-pool heads (width * 32 // 64).
    patch_size: ViT patch side (None for ResNet).
    mlp_dim: ViT MLP hidden size (None for ResNet).
    activation: ViT MLP activation, 'quick_gelu' or 'gelu' (unused by ResNet,
      which uses ReLU).
    layer_norm_eps: epsilon of the ViT layer norms.
    batch_norm_eps: epsilon of the ResNet batch norms.
  """

  architecture: str = "vit"
  image_size: int = 224
  width: int = 768
  layers: int | tuple[int, ...] = 12
  heads: int = 12
  patch_size: int | None = 32
  mlp_dim: int | None = 3072
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  batch_norm_eps: float = 1e-5

  def __post_init__(self):
    if isinstance(self.layers, list):
      object.__setattr__(self, "layers", tuple(self.layers))
    _check(self.architecture in ARCHITECTURES,
           f"vision architecture must be one of {ARCHITECTURES}; "
           f"got {self.architecture!r}")
    _check(self.activation in ACTIVATIONS,
           f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
    _check(self.image_size > 0 and self.width > 0 and self.heads > 0,
           f"image_size, width and heads must be positive: {self}")
    if self.architecture == "vit":
      _check(isinstance(self.layers, int) and self.layers > 0,
             f"a ViT needs an integer number of layers; got {self.layers!r}")
      _check(bool(self.patch_size) and self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size "
             f"{self.patch_size}")
      _check(self.width % self.heads == 0,
             f"ViT width {self.width} is not divisible by heads {self.heads}")
      _check(bool(self.mlp_dim) and self.mlp_dim > 0,
             f"a ViT needs mlp_dim > 0; got {self.mlp_dim}")
    else:
      _check(isinstance(self.layers, tuple) and len(self.layers) == 4
             and all(isinstance(n, int) and n > 0 for n in self.layers),
             f"a ResNet needs 4 positive block counts; got {self.layers!r}")
      _check(self.image_size % 32 == 0,
             f"a ResNet's image_size must be a multiple of 32; got {self.image_size}")
      _check((self.width * 32) % self.heads == 0,
             f"attention-pool width {self.width * 32} is not divisible by "
             f"heads {self.heads}")

  @property
  def num_patches(self) -> int:
    """ViT tokens besides the class token."""
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text tower (a causal transformer).

  Attributes:
    vocab_size: token vocabulary size.
    context_length: number of positions (CLIP: 77).
    width, layers, heads, mlp_dim: transformer sizes.
    activation: MLP activation, 'quick_gelu' or 'gelu'.
    layer_norm_eps: epsilon of the layer norms.
    eos_token_id: the end-of-text token, where the text is pooled.
    pooling: 'argmax' pools at the largest token id (OpenAI: the EOT token has
      the largest id); 'eos' pools at the first `eos_token_id`.
  """

  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  pooling: str = "argmax"

  def __post_init__(self):
    _check(self.activation in ACTIVATIONS,
           f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
    _check(self.pooling in POOLINGS,
           f"text pooling must be one of {POOLINGS}; got {self.pooling!r}")
    _check(min(self.vocab_size, self.context_length, self.width, self.layers,
               self.heads, self.mlp_dim) > 0,
           f"text sizes must be positive: {self}")
    _check(self.width % self.heads == 0,
           f"text width {self.width} is not divisible by heads {self.heads}")
    _check(0 <= self.eos_token_id < self.vocab_size,
           f"eos_token_id {self.eos_token_id} is outside the vocabulary "
           f"[0, {self.vocab_size})")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP model: image tower, text tower and their shared embedding size."""

  embed_dim: int = 512
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()

  def __post_init__(self):
    _check(isinstance(self.vision, VisionConfig)
           and isinstance(self.text, TextConfig),
           "CLIPConfig needs a VisionConfig and a TextConfig")
    _check(self.embed_dim > 0, f"embed_dim must be positive; got {self.embed_dim}")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if isinstance(d["vision"]["layers"], tuple):
      d["vision"]["layers"] = list(d["vision"]["layers"])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    def build(kind, values):
      if not isinstance(values, Mapping):
        raise ConfigError(f"{kind.__name__} must be a mapping; got {values!r}")
      names = {f.name for f in dataclasses.fields(kind)}
      unknown = sorted(set(values) - names)
      if unknown:
        raise ConfigError(f"unknown {kind.__name__} fields: {unknown}")
      return kind(**values)

    unknown = sorted(set(d) - {"embed_dim", "vision", "text"})
    if unknown:
      raise ConfigError(f"unknown CLIPConfig fields: {unknown}")
    try:
      return cls(embed_dim=int(d["embed_dim"]),
                 vision=build(VisionConfig, d["vision"]),
                 text=build(TextConfig, d["text"]))
    except KeyError as e:
      raise ConfigError(f"CLIPConfig dict lacks {e}") from e


def _vit(embed_dim, image_size, patch_size, width, layers, text_width,
         activation="quick_gelu") -> CLIPConfig:
  return CLIPConfig(
      embed_dim=embed_dim,
      vision=VisionConfig("vit", image_size, width, layers, width // 64,
                          patch_size, 4 * width, activation),
      text=TextConfig(width=text_width, heads=text_width // 64,
                      mlp_dim=4 * text_width, activation=activation))


def _resnet(embed_dim, image_size, width, layers, text_width) -> CLIPConfig:
  return CLIPConfig(
      embed_dim=embed_dim,
      vision=VisionConfig("resnet", image_size, width, layers, width * 32 // 64,
                          None, None),
      text=TextConfig(width=text_width, heads=text_width // 64,
                      mlp_dim=4 * text_width))


# OpenAI's published architectures (quick_gelu; the sizes of OpenAI's
# build_model). OpenCLIP's names ('ViT-B-32', no '-quickgelu') are the same
# sizes with exact gelu: see `named_config`.
PRESETS: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, 224, 64, (3, 4, 6, 3), 512),
    "RN101": _resnet(512, 224, 64, (3, 4, 23, 3), 512),
    "RN50x4": _resnet(640, 288, 80, (4, 6, 10, 6), 640),
    "RN50x16": _resnet(768, 384, 96, (6, 8, 18, 8), 768),
    "RN50x64": _resnet(1024, 448, 128, (3, 15, 36, 10), 1024),
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 512),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 512),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 768),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 768),
}


def canonical_name(name: str) -> str:
  """'ViT-B/32' -> 'ViT-B-32', 'ViT-L/14@336px' -> 'ViT-L-14-336'."""
  return name.replace("@336px", "-336").replace("/", "-")


def with_activation(config: CLIPConfig, activation: str) -> CLIPConfig:
  """The same sizes with another MLP activation in both towers."""
  return dataclasses.replace(
      config,
      vision=dataclasses.replace(config.vision, activation=activation),
      text=dataclasses.replace(config.text, activation=activation))


def named_config(name: str) -> CLIPConfig:
  """The config of a published architecture.

  OpenAI spellings ('RN50', 'ViT-B/32') and OpenCLIP names with '-quickgelu'
  give quick_gelu; OpenCLIP ViT names without it ('ViT-B-32') give exact gelu,
  as OpenCLIP's own configs do. ResNet CLIP weights are OpenAI's (or trained
  with quick_gelu), so 'RN*' always means quick_gelu.

  Raises:
    ConfigError: for an unknown name.
  """
  base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
  key = canonical_name(base)
  if key not in PRESETS:
    raise ConfigError(
        f"unknown CLIP architecture {name!r}; known: {sorted(PRESETS)} "
        "(OpenAI spellings such as 'ViT-B/32' and a '-quickgelu' suffix are "
        "accepted)")
  config = PRESETS[key]
  openclip_gelu = (config.vision.architecture == "vit" and "/" not in base
                   and not name.endswith("-quickgelu"))
  return with_activation(config, "gelu") if openclip_gelu else config


# ---------------------------------------------------------------------------
# Hugging Face config.json


def config_from_hf(d: Mapping[str, Any]) -> CLIPConfig:
  """Reads a Hugging Face CLIP `config.json` dict (with transformers' defaults).

  Raises:
    ConfigError: if it is not a CLIP config or a value is unusable.
  """
  if d.get("model_type", "clip") != "clip":
    raise ConfigError(
        f"config.json describes a {d.get('model_type')!r} model, not 'clip'")
  t = d.get("text_config") or {}
  v = d.get("vision_config") or {}
  try:
    if int(v.get("num_channels", 3)) != 3:
      raise ConfigError(f"vision num_channels must be 3; got {v['num_channels']}")
    eos = int(t.get("eos_token_id", 49407))
    vocab_size = int(t.get("vocab_size", 49408))
    if eos == HF_LEGACY_EOS_TOKEN_ID:
      # Legacy configs pool at argmax(ids): the EOT token is the largest id.
      pooling, eos = "argmax", vocab_size - 1
    else:
      pooling = "eos"
    return CLIPConfig(
        embed_dim=int(d.get("projection_dim", 512)),
        vision=VisionConfig(
            architecture="vit",
            image_size=int(v.get("image_size", 224)),
            width=int(v.get("hidden_size", 768)),
            layers=int(v.get("num_hidden_layers", 12)),
            heads=int(v.get("num_attention_heads", 12)),
            patch_size=int(v.get("patch_size", 32)),
            mlp_dim=int(v.get("intermediate_size", 3072)),
            activation=str(v.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-5))),
        text=TextConfig(
            vocab_size=vocab_size,
            context_length=int(t.get("max_position_embeddings", 77)),
            width=int(t.get("hidden_size", 512)),
            layers=int(t.get("num_hidden_layers", 12)),
            heads=int(t.get("num_attention_heads", 8)),
            mlp_dim=int(t.get("intermediate_size", 2048)),
            activation=str(t.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(t.get("layer_norm_eps", 1e-5)),
            eos_token_id=eos,
            pooling=pooling))
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"unusable value in config.json: {e}") from e


def config_to_hf(config: CLIPConfig, *, bos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> dict[str, Any]:
  """The Hugging Face `config.json` dict of a ViT CLIP config.

  Raises:
    ConfigError: for a ResNet image tower, or 'eos' pooling at token id 2
      (which transformers would read as argmax pooling).
  """
  v, t = config.vision, config.text
  if v.architecture != "vit":
    raise ConfigError("Hugging Face CLIP has no ResNet image tower; only ViT "
                      "CLIP models can be saved in its layout")
  if t.pooling == "argmax":
    eos = HF_LEGACY_EOS_TOKEN_ID
    if t.eos_token_id != t.vocab_size - 1:
      raise ConfigError(
          "argmax pooling is exported with transformers' legacy "
          f"eos_token_id={HF_LEGACY_EOS_TOKEN_ID}, which reads back with the "
          f"EOT token at vocab_size - 1 = {t.vocab_size - 1}; this config has "
          f"eos_token_id={t.eos_token_id}: use pooling='eos' instead")
  else:
    eos = t.eos_token_id
    if eos == HF_LEGACY_EOS_TOKEN_ID:
      raise ConfigError(
          f"eos pooling at token id {HF_LEGACY_EOS_TOKEN_ID} cannot be saved "
          "for transformers, which reads that id as legacy argmax pooling; "
          "choose another eos token id")
  text = {
      "model_type": "clip_text_model",
      "vocab_size": t.vocab_size,
      "hidden_size": t.width,
      "intermediate_size": t.mlp_dim,
      "projection_dim": config.embed_dim,
      "num_hidden_layers": t.layers,
      "num_attention_heads": t.heads,
      "max_position_embeddings": t.context_length,
      "hidden_act": t.activation,
      "layer_norm_eps": t.layer_norm_eps,
      "eos_token_id": eos,
  }
  if bos_token_id is not None:
    text["bos_token_id"] = int(bos_token_id)
  if pad_token_id is not None:
    text["pad_token_id"] = int(pad_token_id)
  vision = {
      "model_type": "clip_vision_model",
      "hidden_size": v.width,
      "intermediate_size": v.mlp_dim,
      "projection_dim": config.embed_dim,
      "num_hidden_layers": v.layers,
      "num_attention_heads": v.heads,
      "num_channels": 3,
      "image_size": v.image_size,
      "patch_size": v.patch_size,
      "hidden_act": v.activation,
      "layer_norm_eps": v.layer_norm_eps,
  }
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": config.embed_dim,
      "logit_scale_init_value": 2.6592,
      "initializer_factor": 1.0,
      "torch_dtype": "float32",
      "text_config": text,
      "vision_config": vision,
  }
