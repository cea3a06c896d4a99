"""`load_clip(spec)`: a CLIP model, its params, tokenizer and preprocessing.

Specs:
  'toy'                                  checkpoints/toy_clip/ (Hugging Face layout)
  '/path/to/dir'                         a Hugging Face CLIP directory: config.json,
                                         model.safetensors or flax_model.msgpack,
                                         tokenizer files, preprocessor_config.json
  'openai/clip-vit-base-patch32'         a hub id: checkpoints/downloads/<id>/, then
                                         the HF cache, then a download when online
  'openclip:RN50:/path/model.safetensors'  an OpenAI/OpenCLIP state dict in
                                         safetensors form; the architecture name
                                         decides quick_gelu vs gelu
  'openai:ViT-B/32:/path/model.safetensors'  OpenAI weights (always quick_gelu)

No PyTorch is needed: safetensors and msgpack are read directly.

Weights integrity: `load_clip(spec, sha256=HEX)` refuses a weights file whose
sha256 differs (Hugging Face shows the sha256 of every LFS file), and a
weights file with a `<file>.sha256` beside it (the committed toy CLIP has
checkpoints/toy_clip/model.safetensors.sha256) is checked against it on every
load. `LoadedClip.weights_sha256` is the hash of the file(s) loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, NamedTuple

import jax
import numpy as np

from ovc_jax.errors import CheckpointError, ConfigError
from ovc_jax.models import convert
from ovc_jax.models import weights_io
from ovc_jax.models.clip import DTYPES, ClipModel, Params
from ovc_jax.models.config import (PRESETS, CLIPConfig, canonical_name,
                                   config_from_hf, named_config,
                                   with_activation)
from ovc_jax.models.tokenizer import (BPE_FILENAME, ClipTokenizer,
                                      backend_from_openai_bpe,
                                      has_tokenizer_files, load_tokenizer,
                                      packaged_bpe_path)
from ovc_jax.preprocessing import PreprocessSpec, spec_from_hf_preprocessor_config

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt")
_WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")
# OpenAI's ViT weights on the Hugging Face hub.
_OPENAI_HUB_IDS = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
    "ViT-L-14-336": "openai/clip-vit-large-patch14-336",
}


class LoadedClip(NamedTuple):
  """Everything needed to run a CLIP zero-shot classifier.

  Attributes:
    model: the hashable `ClipModel` (config and compute dtype).
    params: its params (float32 device arrays).
    tokenizer: `list[str] -> np.int32 [B, context_length]`.
    preprocess: the image preprocessing the model was trained with.
    name: a short name of the model ('toy', a hub id, 'openclip:RN50', ...).
    fingerprint: sha256 of the config and weights, to tag caches.
    weights_sha256: sha256 of the weights file's bytes, as `sha256sum` and
      Hugging Face give it (for sharded weights, `weights_io.files_sha256`
      of the shards); what to record to know which file a run used.
  """

  model: ClipModel
  params: Params
  tokenizer: ClipTokenizer
  preprocess: PreprocessSpec
  name: str
  fingerprint: str
  weights_sha256: str = ""


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkpoints_dir() -> str:
  """Where checkpoints live: $OVC_JAX_CHECKPOINTS, else the repo's checkpoints/."""
  env = os.environ.get("OVC_JAX_CHECKPOINTS")
  if env:
    return env
  candidate = os.path.join(_REPO, "checkpoints")
  return candidate if os.path.isdir(candidate) else os.path.abspath("checkpoints")


def _resolve(path: str) -> str:
  """A relative path as given (from the working directory), else from the repo."""
  path = os.path.expanduser(path)
  if os.path.exists(path) or os.path.isabs(path):
    return path
  in_repo = os.path.join(_REPO, path)
  return in_repo if os.path.exists(in_repo) else path


def load_clip(spec: str, *, dtype: str = "float32",
              tokenizer_path: str | None = None,
              sha256: str | None = None) -> LoadedClip:
  """Loads a CLIP model from a spec (see the module docstring).

  Args:
    spec: 'toy', a Hugging Face directory, a hub id, or 'openclip:ARCH:FILE'.
    dtype: compute dtype, 'float32' or 'bfloat16'.
    tokenizer_path: a tokenizer directory (tokenizer.json, or vocab.json +
      merges.txt) or OpenAI's bpe_simple_vocab_16e6.txt.gz, overriding the
      checkpoint's own.
    sha256: the expected sha256 hex digest of the weights file (for sharded
      weights, of `weights_io.files_sha256` of the shards); checked before the
      weights are read.

  Raises:
    CheckpointError: missing, corrupted or mismatched files (a sha256 other
      than the one given or recorded beside the file); unknown spec; a hub id
      that is not available offline.
    ConfigError: a bad dtype, architecture name or sha256 string.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f"model spec must be a non-empty string; got {spec!r}")
  if dtype not in DTYPES:  # Before any file is read.
    raise ConfigError(f"dtype must be one of {DTYPES}; got {dtype!r}")
  if sha256 is not None:
    digest = sha256.strip().lower() if isinstance(sha256, str) else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
      raise ConfigError(f"sha256 must be a 64-digit hex digest; got {sha256!r}")
    sha256 = digest
  spec = spec.strip()
  if spec == "toy":
    directory = os.path.join(checkpoints_dir(), "toy_clip")
    if not os.path.isdir(directory):
      raise CheckpointError(
          f"the toy CLIP is not at {directory}: train and export it there "
          "first (see checkpoints/README.md)")
    return _load_hf_dir(directory, "toy", dtype, tokenizer_path, sha256)
  if spec.startswith(("openclip:", "openai:")):
    return _load_openclip(spec, dtype, tokenizer_path, sha256)
  path = _resolve(spec)
  if os.path.isdir(path):
    return _load_hf_dir(path, os.path.basename(os.path.normpath(path)), dtype,
                        tokenizer_path, sha256)
  if os.path.isfile(path):
    raise CheckpointError(
        f"{spec} is a file; a Hugging Face checkpoint is given by its directory, "
        f"and an OpenAI/OpenCLIP state dict as 'openclip:ARCH:{spec}' "
        "(e.g. ARCH = RN50, ViT-B-32)")
  if canonical_name(spec) in PRESETS:
    hub_id = _OPENAI_HUB_IDS.get(canonical_name(spec))
    hint = f"the hub id {hub_id!r}, or " if hub_id else ""
    raise CheckpointError(
        f"{spec!r} names an architecture, not weights: use {hint}"
        f"'openclip:{spec}:FILE' for a state dict in safetensors form")
  if _HUB_ID.fullmatch(spec):
    return _load_hub(spec, dtype, tokenizer_path, sha256)
  raise CheckpointError(
      f"unknown model {spec!r}: expected 'toy', a Hugging Face CLIP directory, "
      "a hub id such as 'openai/clip-vit-base-patch32', or "
      "'openclip:ARCH:/path/to/open_clip_model.safetensors'")


# ---------------------------------------------------------------------------
# Hugging Face directories and hub ids


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e


def check_weights(files: list[str], source: str,
                  sha256: str | None = None) -> str:
  """The content hash of weights `files` (see `LoadedClip.weights_sha256`),
  checked against `sha256` if given and against `<source>.sha256` if that
  file exists; raises CheckpointError (one line) where they differ."""
  for path in files:
    if not os.path.isfile(path):
      raise CheckpointError(f"weights file {path} does not exist")
  digest = weights_io.files_sha256(files)
  if sha256 is not None:
    weights_io.check_sha256(source, digest, sha256, "given as sha256=")
  recorded = source + ".sha256"
  if os.path.isfile(recorded):
    weights_io.check_sha256(
        source, digest, weights_io.read_sha256_file(recorded),
        f"recorded in {recorded}; if you replaced the file on purpose, write "
        "its new sha256 there")
  return digest


def _read_hf_weights(directory: str, sha256: str | None = None
                     ) -> tuple[dict[str, np.ndarray], str, str]:
  """The state dict (PyTorch names) of a HF directory, the file it came from
  and the weights' sha256 (checked first: see `check_weights`)."""
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  msgpack = os.path.join(directory, "flax_model.msgpack")
  if os.path.isfile(single) or os.path.isfile(index):
    if os.path.isfile(single):
      digest = check_weights([single], single, sha256)
      state, source = weights_io.read_safetensors(single), single
    else:
      shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
      digest = check_weights([os.path.join(directory, s) for s in shards],
                             index, sha256)
      state, source = {}, index
      for shard in shards:
        state.update(weights_io.read_safetensors(os.path.join(directory, shard)))
    if any(k.endswith((".kernel", ".scale", ".embedding")) for k in state):
      # FlaxCLIPModel.save_pretrained(safe_serialization=True) names.
      state = convert.hf_flax_to_torch_names(state)
    return state, source, digest
  if os.path.isfile(msgpack):
    digest = check_weights([msgpack], msgpack, sha256)
    flax_state = weights_io.read_flax_msgpack(msgpack)
    return convert.hf_flax_to_torch_names(flax_state), msgpack, digest
  if os.path.isfile(os.path.join(directory, "pytorch_model.bin")):
    raise CheckpointError(
        f"{directory} has only pytorch_model.bin, which needs PyTorch to read; "
        "convert it once with: python -c \"from transformers import CLIPModel; "
        f"CLIPModel.from_pretrained('{directory}').save_pretrained('{directory}', "
        "safe_serialization=True)\"")
  raise CheckpointError(
      f"no weights in {directory}: expected model.safetensors (or "
      "flax_model.msgpack)")


def _load_hf_dir(directory: str, name: str, dtype: str,
                 tokenizer_path: str | None,
                 sha256: str | None = None) -> LoadedClip:
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(
        f"{directory} is not a Hugging Face CLIP directory: it has no config.json")
  try:
    config = config_from_hf(_read_json(config_path))
  except ConfigError as e:
    raise CheckpointError(f"{config_path}: {e}") from e
  state, source, digest = _read_hf_weights(directory, sha256)
  params = convert.params_from_hf(state, config, source)
  del state
  pp_path = os.path.join(directory, "preprocessor_config.json")
  preprocess = (spec_from_hf_preprocessor_config(pp_path)
                if os.path.isfile(pp_path) else _default_preprocess(config))
  if preprocess.image_size != config.vision.image_size:
    raise CheckpointError(
        f"{pp_path} crops to {preprocess.image_size} pixels but the model "
        f"takes {config.vision.image_size}")
  tokenizer = _tokenizer(tokenizer_path or directory, config)
  return _finish(config, params, dtype, tokenizer, preprocess, name, source,
                 digest)


def _hub_instructions(repo_id: str) -> str:
  local = os.path.join(checkpoints_dir(), "downloads", repo_id)
  return (
      f"place the Hugging Face files of {repo_id!r} (config.json, "
      "model.safetensors or flax_model.msgpack, tokenizer.json or vocab.json + "
      f"merges.txt, preprocessor_config.json) in {local}/ and pass the same "
      "spec again (that folder is looked up first), or pass the folder path "
      f"itself as the spec; e.g. on a machine with network: huggingface-cli "
      f"download {repo_id} config.json model.safetensors tokenizer.json "
      f"preprocessor_config.json --local-dir {local}")


def _is_offline() -> bool:
  value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
  if value in ("1", "ON", "YES", "TRUE"):
    return True
  try:
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
    return bool(constants.HF_HUB_OFFLINE)
  except ImportError:
    return True


def _complete_hf_dir(directory: str | None) -> bool:
  return bool(directory) and os.path.isfile(
      os.path.join(directory, "config.json")) and any(
          os.path.isfile(os.path.join(directory, f)) for f in _WEIGHT_FILES)


def _hf_cache_dir(repo_id: str) -> str | None:
  """The HF cache's snapshot folder of `repo_id`, if config.json is cached."""
  try:
    from huggingface_hub import try_to_load_from_cache  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    found = try_to_load_from_cache(repo_id, "config.json")
  except Exception:  # An invalid repo id or cache layout: not cached.
    return None
  return os.path.dirname(found) if isinstance(found, str) else None


def _load_hub(repo_id: str, dtype: str, tokenizer_path: str | None,
              sha256: str | None = None) -> LoadedClip:
  local = os.path.join(checkpoints_dir(), "downloads", repo_id)
  for directory in (local, _hf_cache_dir(repo_id)):
    if _complete_hf_dir(directory):
      return _load_hf_dir(directory, repo_id, dtype, tokenizer_path, sha256)
  if _is_offline():
    raise CheckpointError(
        f"no local directory {repo_id!r} exists and the hub is offline "
        f"(HF_HUB_OFFLINE is set), so hub model {repo_id!r} cannot be "
        f"downloaded: {_hub_instructions(repo_id)}")
  try:
    _download(repo_id, local)
  except CheckpointError:
    raise
  except Exception as e:  # Network, HTTP and unknown-repo errors.
    raise CheckpointError(
        f"cannot download {repo_id!r} ({type(e).__name__}: {e}); "
        f"{_hub_instructions(repo_id)}") from e
  return _load_hf_dir(local, repo_id, dtype, tokenizer_path, sha256)


def _download(repo_id: str, local: str) -> None:
  """Fetches config, one weights file and the tokenizer into `local`."""
  from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
  from huggingface_hub import list_repo_files  # pylint: disable=g-import-not-at-top
  files = set(list_repo_files(repo_id))
  if "config.json" not in files:
    raise CheckpointError(f"hub repo {repo_id!r} has no config.json: not a "
                          "Hugging Face CLIP model")
  weights = next((f for f in _WEIGHT_FILES if f in files), None)
  if weights is None:
    raise CheckpointError(f"hub repo {repo_id!r} has neither of {_WEIGHT_FILES}")
  for filename in [f for f in _HUB_FILES if f in files] + [weights]:
    hf_hub_download(repo_id, filename, local_dir=local)


# ---------------------------------------------------------------------------
# OpenAI / OpenCLIP state dicts


def _arch_config(kind: str, arch: str) -> CLIPConfig:
  """The named architecture; OpenAI's weights always use quick_gelu."""
  config = named_config(arch)
  return with_activation(config, "quick_gelu") if kind == "openai" else config


def _config_differences(got: CLIPConfig, want: CLIPConfig) -> list[str]:
  diffs = []
  for part in ("vision", "text"):
    a, b = getattr(got, part), getattr(want, part)
    for f in dataclasses.fields(a):
      if getattr(a, f.name) != getattr(b, f.name):
        diffs.append(f"{part}.{f.name} is {getattr(a, f.name)!r} in the file, "
                     f"{getattr(b, f.name)!r} for the named architecture")
  if got.embed_dim != want.embed_dim:
    diffs.append(f"embed_dim is {got.embed_dim} in the file, {want.embed_dim} "
                 "for the named architecture")
  return diffs


def _load_openclip(spec: str, dtype: str, tokenizer_path: str | None,
                   sha256: str | None = None) -> LoadedClip:
  kind, _, rest = spec.partition(":")
  arch, _, path = rest.partition(":")
  if not arch or not path:
    raise ConfigError(
        f"bad spec {spec!r}: expected '{kind}:ARCH:/path/to/file.safetensors', "
        "e.g. 'openclip:RN50:checkpoints/downloads/RN50-openai/"
        "open_clip_model.safetensors'")
  expected = _arch_config(kind, arch)  # Raises ConfigError for unknown names.
  path = _resolve(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file {path} does not exist "
                          "(see checkpoints/README.md for where to put it)")
  if not path.endswith(".safetensors"):
    raise CheckpointError(
        f"{path} is not a .safetensors file; convert a PyTorch checkpoint once "
        "with torch: python -c \"import torch, safetensors.torch as st; "
        f"m = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = m.state_dict() if hasattr(m, 'state_dict') else m.get('state_dict', m); "
        "st.save_file({k: v.float().contiguous() for k, v in sd.items()}, "
        "'open_clip_model.safetensors')\" (for OpenAI's TorchScript .pt files "
        "use torch.jit.load instead of torch.load)")
  digest = check_weights([path], path, sha256)
  state = convert.strip_module_prefix(weights_io.read_safetensors(path))
  config = convert.infer_openai_config(
      {k: v.shape for k, v in state.items()}, expected.text.activation, path)
  diffs = _config_differences(config, expected)
  if diffs:
    raise CheckpointError(
        f"the weights in {path} are not a {arch} model: {'; '.join(diffs[:3])}")
  params = convert.params_from_openai(state, config, path)
  del state
  tokenizer = _tokenizer(
      tokenizer_path or _find_clip_tokenizer(os.path.dirname(path)), config)
  return _finish(config, params, dtype, tokenizer, _default_preprocess(config),
                 f"{kind}:{arch}", path, digest)


def _find_clip_tokenizer(checkpoint_dir: str) -> str:
  """The CLIP BPE tokenizer for a state dict that carries none.

  Looks in the checkpoint's folder, checkpoints/tokenizers/clip/, the
  downloaded openai/clip-vit-base-patch32, then the BPE file shipped by the
  openai-clip or open_clip package.
  """
  root = checkpoints_dir()
  for directory in (checkpoint_dir, os.path.join(root, "tokenizers", "clip"),
                    os.path.join(root, "downloads", "openai",
                                 "clip-vit-base-patch32")):
    if os.path.isdir(directory) and has_tokenizer_files(directory):
      return directory
  bpe = packaged_bpe_path()
  if bpe:
    return bpe
  raise CheckpointError(
      "no CLIP tokenizer found: pass tokenizer_path= a folder with tokenizer.json "
      "(or vocab.json + merges.txt) of openai/clip-vit-base-patch32, or put "
      f"those files in {os.path.join(root, 'tokenizers', 'clip')}/, or install "
      f"the openai-clip package (it ships {BPE_FILENAME})")


# ---------------------------------------------------------------------------


def _default_preprocess(config: CLIPConfig) -> PreprocessSpec:
  s = config.vision.image_size
  return PreprocessSpec(image_size=s, resize_size=s)


def _tokenizer(path: str, config: CLIPConfig) -> ClipTokenizer:
  t = config.text
  if os.path.isfile(path) and path.endswith(".gz"):
    return ClipTokenizer(backend_from_openai_bpe(path),
                         context_length=t.context_length,
                         eos_token_id=t.eos_token_id, source=path)
  if not os.path.isdir(path):
    raise CheckpointError(f"tokenizer path {path} is neither a folder nor "
                          f"a {BPE_FILENAME} file")
  tokenizer = load_tokenizer(path, context_length=t.context_length,
                             eos_token_id=t.eos_token_id, pooling=t.pooling)
  if tokenizer.backend.get_vocab_size() > t.vocab_size:
    raise CheckpointError(
        f"the tokenizer in {path} has {tokenizer.backend.get_vocab_size()} "
        f"tokens but the model's vocabulary has {t.vocab_size}")
  return tokenizer


def _finish(config: CLIPConfig, params: Params, dtype: str,
            tokenizer: ClipTokenizer, preprocess: PreprocessSpec, name: str,
            source: str, weights_sha256: str) -> LoadedClip:
  model = ClipModel(config, dtype)
  convert.check_param_shapes(params, model.param_shapes(), source)
  fingerprint = weights_io.params_fingerprint(params, config.to_dict())
  params = jax.device_put(params)
  return LoadedClip(model, params, tokenizer, preprocess, name, fingerprint,
                    weights_sha256)
