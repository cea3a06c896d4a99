"""Saving a CLIP model in the Hugging Face layout.

`save_hf_checkpoint` writes config.json (transformers' CLIPConfig layout),
model.safetensors (the PyTorch `CLIPModel` key names and shapes), a
preprocessor_config.json and the tokenizer files, so that `load_clip(dir)`,
`transformers.CLIPModel.from_pretrained(dir)` and
`FlaxCLIPModel.from_pretrained(dir, from_pt=True)` all read it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ovc_jax.errors import ConfigError
from ovc_jax.models import convert
from ovc_jax.models import weights_io
from ovc_jax.models.clip import ClipModel, Params
from ovc_jax.models.config import config_to_hf
from ovc_jax.models.loading import LoadedClip
from ovc_jax.models.tokenizer import SOT, TOKENIZER_FILES, ClipTokenizer
from ovc_jax.preprocessing import PreprocessSpec


def preprocessor_config(spec: PreprocessSpec) -> dict[str, Any]:
  """transformers' CLIPImageProcessor config for a `PreprocessSpec`."""
  return {
      "image_processor_type": "CLIPImageProcessor",
      "do_resize": True,
      "size": {"shortest_edge": spec.resize_size},
      "resample": 3,  # PIL bicubic.
      "do_center_crop": True,
      "crop_size": {"height": spec.image_size, "width": spec.image_size},
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "image_mean": list(spec.mean),
      "image_std": list(spec.std),
      "do_convert_rgb": True,
  }


def _save_tokenizer(tokenizer: Any, directory: str) -> tuple[int | None, int | None]:
  """Writes the tokenizer files; returns its (bos, pad) ids when known."""
  if isinstance(tokenizer, ClipTokenizer):
    tokenizer.save(directory)
    return tokenizer.token_to_id(SOT), tokenizer.pad_token_id
  if isinstance(tokenizer, (str, os.PathLike)):
    copied = False
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer, name)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(directory, name))
        copied = True
    if not copied:
      raise ConfigError(f"no tokenizer files {TOKENIZER_FILES} in {tokenizer}")
    return None, None
  if hasattr(tokenizer, "save_pretrained"):  # A transformers tokenizer.
    tokenizer.save_pretrained(directory)
    return None, getattr(tokenizer, "pad_token_id", None)
  if hasattr(tokenizer, "to_str"):  # A `tokenizers.Tokenizer`.
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return tokenizer.token_to_id(SOT), None
  raise ConfigError(f"cannot save a tokenizer of type {type(tokenizer).__name__}")


def save_hf_checkpoint(source: LoadedClip | ClipModel | tuple[ClipModel, Params],
                       directory: str, *, params: Params | None = None,
                       tokenizer: Any = None,
                       preprocess: PreprocessSpec | None = None) -> str:
  """Writes a ViT CLIP model as a Hugging Face CLIP directory.

  Args:
    source: a `LoadedClip` (model, params, tokenizer and preprocessing all
      taken from it), a `(model, params)` pair, or a `ClipModel` with `params=`.
    directory: created if needed; existing files of the same names are replaced.
    params: the params, when `source` is a `ClipModel`.
    tokenizer: a `ClipTokenizer`, a `tokenizers.Tokenizer`, a transformers
      tokenizer, or a folder whose tokenizer files are copied; None for none
      (or the `LoadedClip`'s).
    preprocess: the image preprocessing (default: the `LoadedClip`'s, else
      resize and crop to the model's image size with CLIP's mean and std).

  Returns:
    `directory`.

  Raises:
    ConfigError: a ResNet model (Hugging Face has no ResNet CLIP), missing
      params, or a tokenizer that cannot be saved.
  """
  if isinstance(source, LoadedClip):
    model, params = source.model, source.params
    tokenizer = source.tokenizer if tokenizer is None else tokenizer
    preprocess = preprocess or source.preprocess
  elif isinstance(source, tuple):
    model, params = source
  else:
    model = source
  if not isinstance(model, ClipModel) or params is None:
    raise ConfigError("save_hf_checkpoint needs a LoadedClip, (model, params), "
                      "or a ClipModel with params=")
  config = model.config
  s = config.vision.image_size
  preprocess = preprocess or PreprocessSpec(image_size=s, resize_size=s)
  hf_config = config_to_hf(config)  # Raises ConfigError for ResNets first.
  os.makedirs(directory, exist_ok=True)
  bos = pad = None
  if tokenizer is not None:
    bos, pad = _save_tokenizer(tokenizer, directory)
  hf_config = config_to_hf(config, bos_token_id=bos, pad_token_id=pad)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(preprocess), f, indent=2)
  weights_io.write_safetensors(convert.params_to_hf(params),
                               os.path.join(directory, "model.safetensors"))
  return directory
