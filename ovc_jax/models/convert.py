"""Weight names and layouts: Hugging Face and OpenAI state dicts <-> our params.

Two source layouts are read, both as flat dicts of numpy arrays:

  - Hugging Face `CLIPModel` (PyTorch names, e.g.
    'vision_model.encoder.layers.0.self_attn.q_proj.weight'); transformers'
    Flax msgpack is first renamed to these by `hf_flax_to_torch_names`.
  - OpenAI's original model.py, also used by OpenCLIP (e.g.
    'visual.transformer.resblocks.0.attn.in_proj_weight', 'visual.layer1.0.bn1
    .running_var'); `infer_openai_config` reads the sizes from the tensor
    shapes as OpenAI's build_model does.

PyTorch stores a linear layer as `[out, in]` and a convolution as
`[out, in, kh, kw]`; Flax as `[in, out]` and `[kh, kw, in, out]`. Every tensor
is checked against the shape the config implies, and the errors name the
tensor and both shapes.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ovc_jax.errors import CheckpointError
from ovc_jax.models.weights_io import flatten as _flatten
from ovc_jax.models.config import (LOGIT_SCALE_INIT, CLIPConfig, TextConfig,
                                   VisionConfig)

Params = dict[str, Any]

# Buffers some state dicts carry that are not parameters.
_IGNORED_SUFFIXES = ("num_batches_tracked", "position_ids")
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _ignorable(key: str) -> bool:
  return key.endswith(_IGNORED_SUFFIXES) or key in _IGNORED_KEYS


class StateReader:
  """Takes tensors out of a state dict, checking shapes; reports all problems.

  Missing and mismatched tensors are collected (a zero placeholder is returned)
  so that `finish` can report them together instead of one per run.
  """

  def __init__(self, state: Mapping[str, Any], source: str):
    self.state = state
    self.source = source
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

  def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.state:
      self.missing.append(key)
      return np.zeros(shape, np.float32)
    self.used.add(key)
    arr = self.state[key]
    if tuple(arr.shape) != tuple(shape):
      self.mismatched.append((key, tuple(arr.shape), tuple(shape)))
      return np.zeros(shape, np.float32)
    return arr

  def take_optional(self, key: str, shape: tuple[int, ...],
                    default: float) -> np.ndarray:
    if key in self.state:
      return self.take(key, shape)
    return np.full(shape, default, np.float32)

  def finish(self) -> None:
    """Raises `CheckpointError` for mismatched, missing or unexpected tensors."""
    if self.mismatched:
      key, got, want = self.mismatched[0]
      more = (f" ({len(self.mismatched) - 1} more tensors mismatch)"
              if len(self.mismatched) > 1 else "")
      raise CheckpointError(
          f"the weights in {self.source} do not match the config: tensor "
          f"{key!r} has shape {got} in the file but the config needs {want}"
          f"{more}")
    extra = sorted(k for k in self.state
                   if k not in self.used and not _ignorable(k))
    if self.missing or extra:
      parts = []
      if self.missing:
        parts.append(f"{len(self.missing)} missing (e.g. {self.missing[:4]})")
      if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[:4]})")
      raise CheckpointError(
          f"the weights in {self.source} do not fit this model: "
          f"{'; '.join(parts)} weight names; is it the architecture the "
          "config or spec says?")


def _t(x: np.ndarray) -> np.ndarray:
  return np.asarray(x).T


def _conv_to_hwio(w: np.ndarray) -> np.ndarray:
  """PyTorch `[out, in, kh, kw]` -> Flax `[kh, kw, in, out]`."""
  return np.asarray(w).transpose(2, 3, 1, 0)


def _conv_to_oihw(w: Any) -> np.ndarray:
  return np.asarray(w).transpose(3, 2, 0, 1)


# ---------------------------------------------------------------------------
# Hugging Face layout


def _hf_linear(r: StateReader, prefix: str, d_in: int, d_out: int) -> Params:
  return {"kernel": _t(r.take(f"{prefix}.weight", (d_out, d_in))),
          "bias": r.take(f"{prefix}.bias", (d_out,))}


def _hf_norm(r: StateReader, prefix: str, d: int) -> Params:
  return {"scale": r.take(f"{prefix}.weight", (d,)),
          "bias": r.take(f"{prefix}.bias", (d,))}


def _hf_transformer(r: StateReader, prefix: str, layers: int, width: int,
                    mlp_dim: int) -> Params:
  blocks = {}
  for i in range(layers):
    p = f"{prefix}.layers.{i}"
    q, k, v = (_hf_linear(r, f"{p}.self_attn.{n}_proj", width, width)
               for n in "qkv")
    blocks[f"block{i}"] = {
        "ln_1": _hf_norm(r, f"{p}.layer_norm1", width),
        "attn": {
            "qkv": {
                "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], 1),
                "bias": np.concatenate([q["bias"], k["bias"], v["bias"]]),
            },
            "out": _hf_linear(r, f"{p}.self_attn.out_proj", width, width),
        },
        "ln_2": _hf_norm(r, f"{p}.layer_norm2", width),
        "mlp": {"fc": _hf_linear(r, f"{p}.mlp.fc1", width, mlp_dim),
                "proj": _hf_linear(r, f"{p}.mlp.fc2", mlp_dim, width)},
    }
  return blocks


def params_from_hf(state: Mapping[str, Any], config: CLIPConfig,
                   source: str) -> Params:
  """Our params from a Hugging Face `CLIPModel` state dict (PyTorch names).

  Raises:
    CheckpointError: a tensor is missing, unexpected, or has the wrong shape.
  """
  if config.vision.architecture != "vit":
    raise CheckpointError("Hugging Face CLIP checkpoints have ViT image towers")
  r = StateReader(state, source)
  v, t, e = config.vision, config.text, config.embed_dim
  p = v.patch_size
  vision = {
      "patch_embedding": _conv_to_hwio(r.take(
          "vision_model.embeddings.patch_embedding.weight", (v.width, 3, p, p))),
      "class_embedding": r.take("vision_model.embeddings.class_embedding",
                                (v.width,)),
      "positional_embedding": r.take(
          "vision_model.embeddings.position_embedding.weight",
          (v.num_patches + 1, v.width)),
      "ln_pre": _hf_norm(r, "vision_model.pre_layrnorm", v.width),
      "transformer": _hf_transformer(r, "vision_model.encoder", v.layers,
                                     v.width, v.mlp_dim),
      "ln_post": _hf_norm(r, "vision_model.post_layernorm", v.width),
      "proj": {"kernel": _t(r.take("visual_projection.weight", (e, v.width)))},
  }
  text = {
      "token_embedding": {"embedding": r.take(
          "text_model.embeddings.token_embedding.weight", (t.vocab_size, t.width))},
      "positional_embedding": r.take(
          "text_model.embeddings.position_embedding.weight",
          (t.context_length, t.width)),
      "transformer": _hf_transformer(r, "text_model.encoder", t.layers, t.width,
                                     t.mlp_dim),
      "ln_final": _hf_norm(r, "text_model.final_layer_norm", t.width),
      "projection": {"kernel": _t(r.take("text_projection.weight", (e, t.width)))},
  }
  logit_scale = r.take_optional("logit_scale", (), LOGIT_SCALE_INIT)
  r.finish()
  return {"vision": vision, "text": text,
          "logit_scale": np.asarray(logit_scale, np.float32)}


def _hf_transformer_out(blocks: Params, prefix: str, out: dict) -> None:
  for i in range(len(blocks)):
    b = blocks[f"block{i}"]
    p = f"{prefix}.layers.{i}"
    kernel = np.asarray(b["attn"]["qkv"]["kernel"])
    bias = np.asarray(b["attn"]["qkv"]["bias"])
    width = kernel.shape[0]
    for j, n in enumerate("qkv"):
      out[f"{p}.self_attn.{n}_proj.weight"] = _t(kernel[:, j * width:(j + 1) * width])
      out[f"{p}.self_attn.{n}_proj.bias"] = bias[j * width:(j + 1) * width]
    for ours, theirs in (("out", "self_attn.out_proj"), ("fc", "mlp.fc1"),
                         ("proj", "mlp.fc2")):
      layer = b["attn"][ours] if ours == "out" else b["mlp"][ours]
      out[f"{p}.{theirs}.weight"] = _t(layer["kernel"])
      out[f"{p}.{theirs}.bias"] = np.asarray(layer["bias"])
    for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      out[f"{p}.{theirs}.weight"] = np.asarray(b[ours]["scale"])
      out[f"{p}.{theirs}.bias"] = np.asarray(b[ours]["bias"])


def params_to_hf(params: Params) -> dict[str, np.ndarray]:
  """A Hugging Face `CLIPModel` state dict (PyTorch names, float32 numpy)."""
  params = _to_numpy(params)
  v, t = params["vision"], params["text"]
  out = {
      "vision_model.embeddings.patch_embedding.weight":
          _conv_to_oihw(v["patch_embedding"]),
      "vision_model.embeddings.class_embedding": v["class_embedding"],
      "vision_model.embeddings.position_embedding.weight":
          v["positional_embedding"],
      "visual_projection.weight": _t(v["proj"]["kernel"]),
      "text_model.embeddings.token_embedding.weight":
          t["token_embedding"]["embedding"],
      "text_model.embeddings.position_embedding.weight":
          t["positional_embedding"],
      "text_projection.weight": _t(t["projection"]["kernel"]),
      "logit_scale": np.asarray(params["logit_scale"], np.float32),
  }
  for ours, theirs, tree in (("ln_pre", "vision_model.pre_layrnorm", v),
                             ("ln_post", "vision_model.post_layernorm", v),
                             ("ln_final", "text_model.final_layer_norm", t)):
    out[f"{theirs}.weight"] = tree[ours]["scale"]
    out[f"{theirs}.bias"] = tree[ours]["bias"]
  _hf_transformer_out(v["transformer"], "vision_model.encoder", out)
  _hf_transformer_out(t["transformer"], "text_model.encoder", out)
  return {k: np.asarray(a, dtype=np.float32, order="C") for k, a in out.items()}


def hf_flax_to_torch_names(flax_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """transformers' Flax CLIP params -> the PyTorch state-dict names and layouts."""
  out = {}
  for key, value in _flatten(flax_state).items():
    arr = np.asarray(value)
    head, _, leaf = key.rpartition(".")
    if leaf == "kernel":
      arr = _conv_to_oihw(arr) if arr.ndim == 4 else _t(arr)
      key = f"{head}.weight"
    elif leaf in ("scale", "embedding"):
      key = f"{head}.weight"
    out[key] = np.asarray(arr, np.float32)
  return out


# ---------------------------------------------------------------------------
# OpenAI / OpenCLIP layout


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops DistributedDataParallel's leading 'module.' from every key."""
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


def _count(keys, pattern: str) -> int:
  regex = re.compile(pattern)
  return len({m.group(1) for k in keys if (m := regex.match(k))})


def infer_openai_config(shapes: Mapping[str, tuple[int, ...]], activation: str,
                        source: str) -> CLIPConfig:
  """The architecture of an OpenAI/OpenCLIP state dict, from its shapes.

  Follows OpenAI's build_model: a ViT if 'visual.proj' is present, else a
  ModifiedResNet; heads are width // 64 (ResNet attention pool: width * 32 // 64).

  Raises:
    CheckpointError: a key the inference needs is missing.
  """
  def shape(key):
    if key not in shapes:
      raise CheckpointError(
          f"{source} is not an OpenAI/OpenCLIP CLIP state dict: it has no "
          f"{key!r} (first keys: {sorted(shapes)[:5]})")
    return tuple(shapes[key])

  keys = list(shapes)
  if "visual.proj" in shapes:
    width, _, patch, _ = shape("visual.conv1.weight")
    grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
    vision = VisionConfig(
        architecture="vit", image_size=patch * grid, width=width,
        layers=_count(keys, r"visual\.transformer\.resblocks\.(\d+)\."),
        heads=max(width // 64, 1), patch_size=patch,
        mlp_dim=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        activation=activation)
  else:
    layers = tuple(_count(keys, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
    width = shape("visual.layer1.0.conv1.weight")[0]
    grid = round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
    vision = VisionConfig(
        architecture="resnet", image_size=grid * 32, width=width, layers=layers,
        heads=width * 32 // 64, patch_size=None, mlp_dim=None)
  vocab_size, text_width = shape("token_embedding.weight")
  text = TextConfig(
      vocab_size=vocab_size,
      context_length=shape("positional_embedding")[0],
      width=text_width,
      layers=_count(keys, r"transformer\.resblocks\.(\d+)\."),
      heads=max(text_width // 64, 1),
      mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
      activation=activation,
      eos_token_id=vocab_size - 1,
      pooling="argmax")
  return CLIPConfig(embed_dim=shape("text_projection")[1], vision=vision, text=text)


def _oa_norm(r: StateReader, prefix: str, d: int) -> Params:
  return _hf_norm(r, prefix, d)


def _oa_transformer(r: StateReader, prefix: str, layers: int, width: int,
                    mlp_dim: int) -> Params:
  blocks = {}
  for i in range(layers):
    p = f"{prefix}.resblocks.{i}"
    blocks[f"block{i}"] = {
        "ln_1": _oa_norm(r, f"{p}.ln_1", width),
        "attn": {
            "qkv": {"kernel": _t(r.take(f"{p}.attn.in_proj_weight",
                                        (3 * width, width))),
                    "bias": r.take(f"{p}.attn.in_proj_bias", (3 * width,))},
            "out": _hf_linear(r, f"{p}.attn.out_proj", width, width),
        },
        "ln_2": _oa_norm(r, f"{p}.ln_2", width),
        "mlp": {"fc": _hf_linear(r, f"{p}.mlp.c_fc", width, mlp_dim),
                "proj": _hf_linear(r, f"{p}.mlp.c_proj", mlp_dim, width)},
    }
  return blocks


def _oa_conv(r: StateReader, key: str, c_in: int, c_out: int, k: int) -> Params:
  return {"kernel": _conv_to_hwio(r.take(key, (c_out, c_in, k, k)))}


def _oa_bn(r: StateReader, prefix: str, c: int) -> Params:
  return {"scale": r.take(f"{prefix}.weight", (c,)),
          "bias": r.take(f"{prefix}.bias", (c,)),
          "mean": r.take(f"{prefix}.running_mean", (c,)),
          "var": r.take(f"{prefix}.running_var", (c,))}


def _oa_resnet(r: StateReader, v: VisionConfig, embed_dim: int) -> Params:
  w = v.width
  out = {}
  for i, (c_in, c_out) in enumerate(((3, w // 2), (w // 2, w // 2), (w // 2, w)),
                                    start=1):
    out[f"conv{i}"] = _oa_conv(r, f"visual.conv{i}.weight", c_in, c_out, 3)
    out[f"bn{i}"] = _oa_bn(r, f"visual.bn{i}", c_out)
  inplanes = w
  for stage, blocks in enumerate(v.layers):
    planes = w * 2**stage
    for j in range(blocks):
      p = f"visual.layer{stage + 1}.{j}"
      block = {
          "conv1": _oa_conv(r, f"{p}.conv1.weight", inplanes, planes, 1),
          "bn1": _oa_bn(r, f"{p}.bn1", planes),
          "conv2": _oa_conv(r, f"{p}.conv2.weight", planes, planes, 3),
          "bn2": _oa_bn(r, f"{p}.bn2", planes),
          "conv3": _oa_conv(r, f"{p}.conv3.weight", planes, 4 * planes, 1),
          "bn3": _oa_bn(r, f"{p}.bn3", 4 * planes),
      }
      stride = 2 if stage > 0 and j == 0 else 1
      if stride > 1 or inplanes != 4 * planes:
        block["downsample_conv"] = _oa_conv(r, f"{p}.downsample.0.weight",
                                            inplanes, 4 * planes, 1)
        block["downsample_bn"] = _oa_bn(r, f"{p}.downsample.1", 4 * planes)
      out[f"layer{stage + 1}_{j}"] = block
      inplanes = 4 * planes
  c = w * 32
  spatial = v.image_size // 32
  q, k, vv = (_hf_linear(r, f"visual.attnpool.{n}_proj", c, c) for n in "qkv")
  out["attnpool"] = {
      "positional_embedding": r.take("visual.attnpool.positional_embedding",
                                     (spatial**2 + 1, c)),
      "q": q,
      "kv": {"kernel": np.concatenate([k["kernel"], vv["kernel"]], 1),
             "bias": np.concatenate([k["bias"], vv["bias"]])},
      "c": _hf_linear(r, "visual.attnpool.c_proj", c, embed_dim),
  }
  return out


def params_from_openai(state: Mapping[str, Any], config: CLIPConfig,
                       source: str) -> Params:
  """Our params from an OpenAI/OpenCLIP state dict ('module.' already stripped).

  Raises:
    CheckpointError: a tensor is missing, unexpected, or has the wrong shape.
  """
  r = StateReader(state, source)
  v, t, e = config.vision, config.text, config.embed_dim
  if v.architecture == "vit":
    p = v.patch_size
    vision = {
        "patch_embedding": _oa_conv(r, "visual.conv1.weight", 3, v.width,
                                    p)["kernel"],
        "class_embedding": r.take("visual.class_embedding", (v.width,)),
        "positional_embedding": r.take("visual.positional_embedding",
                                       (v.num_patches + 1, v.width)),
        "ln_pre": _oa_norm(r, "visual.ln_pre", v.width),
        "transformer": _oa_transformer(r, "visual.transformer", v.layers,
                                       v.width, v.mlp_dim),
        "ln_post": _oa_norm(r, "visual.ln_post", v.width),
        "proj": {"kernel": r.take("visual.proj", (v.width, e))},
    }
  else:
    vision = _oa_resnet(r, v, e)
  text = {
      "token_embedding": {"embedding": r.take("token_embedding.weight",
                                              (t.vocab_size, t.width))},
      "positional_embedding": r.take("positional_embedding",
                                     (t.context_length, t.width)),
      "transformer": _oa_transformer(r, "transformer", t.layers, t.width,
                                     t.mlp_dim),
      "ln_final": _oa_norm(r, "ln_final", t.width),
      "projection": {"kernel": r.take("text_projection", (t.width, e))},
  }
  logit_scale = r.take_optional("logit_scale", (), LOGIT_SCALE_INIT)
  r.finish()
  return {"vision": vision, "text": text,
          "logit_scale": np.asarray(logit_scale, np.float32)}


# ---------------------------------------------------------------------------


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def check_param_shapes(params: Params, expected: Params, source: str) -> None:
  """Every param has the shape the model expects (our own names).

  A safeguard behind the per-tensor checks above: converted params whose tree
  or shapes differ from `ClipModel.param_shapes()` are a conversion bug or a
  config the converter does not describe.
  """
  got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
  want = {k: tuple(v.shape) for k, v in _flatten(expected).items()}
  if got.keys() != want.keys():
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    raise CheckpointError(
        f"converted weights from {source} do not fit the model: missing "
        f"{missing[:4]}, unexpected {extra[:4]}")
  for k in sorted(want):
    if got[k] != want[k]:
      raise CheckpointError(
          f"converted weights from {source} do not fit the model: {k} has "
          f"shape {got[k]}, the model needs {want[k]}")
