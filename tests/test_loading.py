"""Checkpoint loading: parity with transformers' CLIP on files transformers
wrote, the exporter, tokenizers, and every loader error.

The Hugging Face checkpoints here are written by transformers itself:
model.safetensors by the PyTorch `CLIPModel.save_pretrained`, and
flax_model.msgpack by `FlaxCLIPModel.save_pretrained` with params converted
from the same PyTorch state dict by transformers' own converter. The
reference features are transformers' `FlaxCLIPModel.get_image_features` /
`get_text_features` (and PyTorch's, as a second opinion).
"""

import importlib.util
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from ovc_jax.errors import CheckpointError, ConfigError  # pylint: disable=g-import-not-at-top
from ovc_jax.models import (CLIPConfig, ClipModel, ClipTokenizer, TextConfig,
                            VisionConfig, load_clip, save_hf_checkpoint)
from ovc_jax.models import tokenizer as tokenizer_lib
from ovc_jax.models import weights_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-5
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "clip-vit-base-patch32-noweights")
PROMPTS = ["a photo of a cat.", "a blurry photo of the big red fire truck!"]


def _tiny_hf_config(eos_token_id):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=40, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=12, eos_token_id=eos_token_id,
                       bos_token_id=1, pad_token_id=0, hidden_act="gelu"),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, image_size=30, patch_size=6),
      projection_dim=24)


def _word_tokenizer(eos_token, eos_id, vocab_size):
  """A word-level tokenizer.json: '[BOS] words [EOS]', as the toy CLIP uses."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  words = ["[PAD]", "[BOS]", "[UNK]", "a", "photo", "of", "cat", "dog", "the"]
  vocab = {w: i for i, w in enumerate(words)}  # ids 0..8; eos_id is above.
  assert len(words) <= eos_id < max(vocab_size, eos_id + 1)
  vocab[eos_token] = eos_id
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single=f"[BOS] $A {eos_token}",
      special_tokens=[("[BOS]", 1), (eos_token, eos_id)])
  return tok


def _write_hf_checkpoint(config, directory, seed):
  """transformers writes the checkpoint both ways; returns the references.

  model.safetensors comes from PyTorch `CLIPModel.save_pretrained`, then
  flax_model.msgpack from `FlaxCLIPModel.save_pretrained` with the params that
  transformers' own converter makes of the same state dict.
  """
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  pt_model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # transformers' init leaves biases 0 and norms 1.
    for name, p in pt_model.named_parameters():
      if name.endswith("bias"):
        p.add_(0.02 * torch.randn_like(p))
      elif "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  pt_model.save_pretrained(os.path.join(directory, "safetensors"),
                           safe_serialization=True)
  flax_model = transformers.FlaxCLIPModel(config, _do_init=False)
  shapes = jax.eval_shape(
      lambda k: flax_model.init_weights(k, flax_model.input_shape),
      jax.random.key(0))
  stub = types.SimpleNamespace(base_model_prefix=flax_model.base_model_prefix,
                               params=shapes)
  flax_params = convert_pytorch_state_dict_to_flax(
      dict(pt_model.state_dict()), stub)
  flax_model.save_pretrained(os.path.join(directory, "msgpack"),
                             params=flax_params)
  return pt_model, flax_model, flax_params


def _hf_features(flax_model, flax_params, images, ids):
  image_fn = jax.jit(lambda p, x: flax_model.get_image_features(
      pixel_values=x, params=p))
  text_fn = jax.jit(lambda p, t: flax_model.get_text_features(
      input_ids=t, params=p))
  zi = image_fn(flax_params, images.transpose(0, 3, 1, 2))
  zt = text_fn(flax_params, ids)
  return np.asarray(zi), np.asarray(zt)


def _ours(loaded, images, ids):
  zi = loaded.model.embed_images_checked(loaded.params, images)
  zt = loaded.model.embed_texts_checked(loaded.params, ids)
  return np.asarray(zi), np.asarray(zt)


def _report(label, ours, ref):
  diff = float(np.abs(ours - ref).max())
  print(f"\n{label}: max|diff| = {diff:.2e} (max|ref| = {np.abs(ref).max():.2f})")
  return diff


# ---------------------------------------------------------------------------
# 1. Tiny random CLIP, both pooling rules, both file formats.


@pytest.fixture(scope="module", params=[2, 30], ids=["legacy-argmax", "eos"])
def tiny_checkpoint(request, tmp_path_factory):
  eos = request.param
  root = tmp_path_factory.mktemp(f"tiny{eos}")
  pt_model, flax_model, flax_params = _write_hf_checkpoint(
      _tiny_hf_config(eos), str(root), seed=eos)
  tok = _word_tokenizer("[EOS]" if eos == 2 else "[END]",
                        39 if eos == 2 else eos, 40)
  for fmt in ("safetensors", "msgpack"):
    tok.save(str(root / fmt / "tokenizer.json"))
  return eos, root, pt_model, flax_model, flax_params


def test_tiny_parity_with_transformers(tiny_checkpoint):
  eos, root, pt_model, flax_model, flax_params = tiny_checkpoint
  images = np.random.RandomState(0).randn(2, 30, 30, 3).astype(np.float32)
  fingerprints = set()
  for fmt in ("safetensors", "msgpack"):
    loaded = load_clip(str(root / fmt))
    text = loaded.model.config.text
    assert text.pooling == ("argmax" if eos == 2 else "eos")
    ids = loaded.tokenizer(["a photo of a cat", "the dog"])
    assert (ids == text.eos_token_id).sum(axis=1).tolist() == [1, 1]
    ours_i, ours_t = _ours(loaded, images, ids)
    ref_i, ref_t = _hf_features(flax_model, flax_params, images, ids)
    assert _report(f"tiny {fmt} eos={eos} image", ours_i, ref_i) <= TOL
    assert _report(f"tiny {fmt} eos={eos} text", ours_t, ref_t) <= TOL
    with torch.no_grad():
      pt_t = pt_model.get_text_features(input_ids=torch.from_numpy(ids).long())
    np.testing.assert_allclose(ours_t, pt_t.numpy(), atol=TOL)
    fingerprints.add(loaded.fingerprint)
  # The fingerprint is of the weights, not of the file format.
  assert len(fingerprints) == 1


# ---------------------------------------------------------------------------
# 2. Full-size ViT-B/32: the real config and tokenizer, random weights.


@pytest.fixture(scope="module")
def vit_b32_checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp("vit_b32")
  have_shared = os.path.isdir(SHARED)
  if have_shared:
    config = transformers.CLIPConfig.from_pretrained(SHARED)
  else:  # The same architecture (with eos pooling at 49407).
    config = transformers.CLIPConfig()
  refs = _write_hf_checkpoint(config, str(root), seed=0)
  for fmt in ("safetensors", "msgpack"):
    if have_shared:
      for name in os.listdir(SHARED):
        if name != "config.json":
          shutil.copy(os.path.join(SHARED, name), root / fmt / name)
    else:
      tok = _word_tokenizer("<|endoftext|>", 49407, 0)
      tok.save(str(root / fmt / "tokenizer.json"))
  return have_shared, root, refs


def test_full_size_vit_b32_parity_with_transformers(vit_b32_checkpoint):
  have_shared, root, (pt_model, flax_model, flax_params) = vit_b32_checkpoint
  loaded = load_clip(str(root / "safetensors"))
  assert loaded.model.config.vision.patch_size == 32
  assert loaded.model.config.vision.layers == 12
  assert loaded.preprocess.image_size == 224
  images = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  if have_shared:
    ids = loaded.tokenizer(PROMPTS)
  else:
    ids = np.random.RandomState(1).randint(0, 49406, (2, 77)).astype(np.int32)
    ids[:, 9:] = 0
    ids[:, 8] = 49407
  ours_i, ours_t = _ours(loaded, images, ids)
  ref_i, ref_t = _hf_features(flax_model, flax_params, images, ids)
  assert _report("ViT-B/32 (HF) image vs FlaxCLIPModel", ours_i, ref_i) <= TOL
  assert _report("ViT-B/32 (HF) text vs FlaxCLIPModel", ours_t, ref_t) <= TOL
  with torch.no_grad():
    pt_i = pt_model.get_image_features(
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    pt_t = pt_model.get_text_features(input_ids=torch.from_numpy(ids).long()).numpy()
  assert _report("ViT-B/32 (HF) image vs PyTorch CLIPModel", ours_i, pt_i) <= TOL
  assert _report("ViT-B/32 (HF) text vs PyTorch CLIPModel", ours_t, pt_t) <= TOL
  # The msgpack transformers wrote holds the same weights.
  from_msgpack = load_clip(str(root / "msgpack"))
  assert from_msgpack.fingerprint == loaded.fingerprint
  jax.tree.map(np.testing.assert_array_equal, from_msgpack.params, loaded.params)


def test_clip_tokenizers_match_openai_tokenize():
  """OpenAI's BPE file and the real HF tokenizer files vs OpenAI's tokenizer."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("openai-clip not installed")
  location = list(spec.submodule_search_locations)[0]
  module_spec = importlib.util.spec_from_file_location(
      "openai_simple_tokenizer", os.path.join(location, "simple_tokenizer.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  simple = module.SimpleTokenizer()
  tokenizers = [ClipTokenizer(
      tokenizer_lib.backend_from_openai_bpe(tokenizer_lib.packaged_bpe_path()),
      context_length=77, eos_token_id=49407)]
  if os.path.isdir(SHARED):
    tokenizers.append(tokenizer_lib.load_tokenizer(
        SHARED, context_length=77, eos_token_id=49407, pooling="argmax"))
  texts = PROMPTS + ["A PHOTO of the   Dog's toy!!", "naïve café 3.14", "",
                     "itap of a {}.", "word " * 100]
  for text in texts:
    ref = ([49406] + simple.encode(text) + [49407])[:77]
    ref[-1] = 49407  # As clip.tokenize(truncate=True).
    row = np.zeros(77, np.int32)
    row[:len(ref)] = ref
    for tok in tokenizers:
      np.testing.assert_array_equal(tok([text])[0], row)


def test_truncation_keeps_the_end_token(tmp_path):
  tok = _word_tokenizer("[END]", 9, 10)
  clip_tok = ClipTokenizer(tok, context_length=6, eos_token_id=9, pad_token_id=0)
  ids = clip_tok(["a photo of the cat dog dog dog", "cat"])
  assert ids.dtype == np.int32 and ids.shape == (2, 6)
  np.testing.assert_array_equal(ids[0], [1, 3, 4, 5, 8, 9])
  np.testing.assert_array_equal(ids[1], [1, 6, 9, 0, 0, 0])


# ---------------------------------------------------------------------------
# 3. Our exporter: the toy CLIP's layout, read by us and by transformers.


TOY_CONFIG = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig("vit", image_size=32, width=32, layers=2, heads=2,
                        patch_size=8, mlp_dim=64),
    text=TextConfig(vocab_size=20, context_length=8, width=32, layers=2,
                    heads=2, mlp_dim=64, eos_token_id=9, pooling="eos"))


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("checkpoints")
  model = ClipModel(TOY_CONFIG)
  params = model.init(jax.random.key(0))
  tokenizer = ClipTokenizer(_word_tokenizer("[END]", 9, 20), context_length=8,
                            eos_token_id=9, pad_token_id=0)
  directory = str(root / "toy_clip")
  save_hf_checkpoint((model, params), directory, tokenizer=tokenizer)
  return root, directory, model, params, tokenizer


def test_exported_toy_loads_back_exactly(toy_export, monkeypatch):
  root, directory, model, params, tokenizer = toy_export
  monkeypatch.setenv("OVC_JAX_CHECKPOINTS", str(root))
  loaded = load_clip("toy")
  assert loaded.name == "toy" and loaded.model == model
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  texts = ["a photo of a cat", "the dog dog dog dog dog dog dog"]
  np.testing.assert_array_equal(loaded.tokenizer(texts), tokenizer(texts))
  assert loaded.tokenizer(texts)[1, -1] == 9
  assert loaded.fingerprint == weights_io.params_fingerprint(
      jax.device_get(params), TOY_CONFIG.to_dict())
  assert load_clip(directory, dtype="bfloat16").model.dtype == "bfloat16"


def test_exported_weights_record_their_sha256(toy_export, tmp_path):
  _, directory, _, _, _ = toy_export
  weights = os.path.join(directory, "model.safetensors")
  digest = weights_io.file_sha256(weights)
  assert weights_io.read_sha256_file(weights + ".sha256") == digest
  assert load_clip(directory).weights_sha256 == digest
  # The recorded hash is checked on load: a replaced weights file is refused.
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  data = bytearray((copy / "model.safetensors").read_bytes())
  data[-100:] = bytes(100)
  (copy / "model.safetensors").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=f"recorded in .*expected {digest}"):
    load_clip(str(copy))


def test_exported_toy_is_read_by_transformers(toy_export):
  _, directory, model, params, _ = toy_export
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
  ids = np.asarray(hf_tok(["a photo of a cat", "the dog"], padding="max_length",
                          max_length=8)["input_ids"], np.int32)
  pt_model = transformers.CLIPModel.from_pretrained(directory).eval()
  images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    pt_i = pt_model.get_image_features(
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    pt_t = pt_model.get_text_features(input_ids=torch.from_numpy(ids).long()).numpy()
  ours_i = model.embed_images_checked(params, images)
  ours_t = model.embed_texts_checked(params, ids)
  assert _report("exported toy image vs PyTorch CLIPModel", ours_i, pt_i) <= TOL
  assert _report("exported toy text vs PyTorch CLIPModel", ours_t, pt_t) <= TOL


def test_resnet_cannot_be_exported_to_hf(tmp_path):
  config = CLIPConfig(
      embed_dim=16,
      vision=VisionConfig("resnet", image_size=32, width=8, layers=(1, 1, 1, 1),
                          heads=4, patch_size=None, mlp_dim=None),
      text=TOY_CONFIG.text)
  model = ClipModel(config)
  with pytest.raises(ConfigError, match="no ResNet"):
    save_hf_checkpoint(model, str(tmp_path), params={})


# ---------------------------------------------------------------------------
# 4. Errors: one clear message each.


@pytest.fixture()
def tiny_dir(tiny_checkpoint, tmp_path):
  _, root, *_ = tiny_checkpoint
  directory = tmp_path / "model"
  shutil.copytree(root / "safetensors", directory)
  return directory


def test_truncated_safetensors(tiny_dir):
  path = tiny_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    load_clip(str(tiny_dir))
  path.write_bytes(b"hello")
  with pytest.raises(CheckpointError, match="not a valid safetensors file"):
    load_clip(str(tiny_dir))
  path.write_bytes(data[:4000])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_clip(str(tiny_dir))


def test_truncated_msgpack(tiny_checkpoint, tmp_path):
  _, root, *_ = tiny_checkpoint
  directory = tmp_path / "model"
  shutil.copytree(root / "msgpack", directory)
  path = directory / "flax_model.msgpack"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(CheckpointError, match="flax_model.msgpack.*(truncated|corrupted)"):
    load_clip(str(directory))


def test_config_that_does_not_match_the_weights(tiny_dir):
  config = json.loads((tiny_dir / "config.json").read_text())
  config["vision_config"]["intermediate_size"] = 44
  (tiny_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError,
                     match=r"vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight.*"
                           r"\(40, 32\).*\(44, 32\)"):
    load_clip(str(tiny_dir))


def test_missing_and_unexpected_weights(tiny_dir):
  path = str(tiny_dir / "model.safetensors")
  state = weights_io.read_safetensors(path)
  del state["text_model.final_layer_norm.bias"]
  weights_io.write_safetensors(state, path)
  with pytest.raises(CheckpointError,
                     match="1 missing.*text_model.final_layer_norm.bias"):
    load_clip(str(tiny_dir))
  state["text_model.final_layer_norm.bias"] = np.zeros(32, np.float32)
  state["vision_model.extra_head.weight"] = np.zeros(3, np.float32)
  weights_io.write_safetensors(state, path)
  with pytest.raises(CheckpointError, match="1 unexpected.*extra_head"):
    load_clip(str(tiny_dir))


def test_missing_files(tiny_dir):
  os.remove(tiny_dir / "tokenizer.json")
  with pytest.raises(CheckpointError, match="no tokenizer"):
    load_clip(str(tiny_dir))
  os.remove(tiny_dir / "model.safetensors")
  with pytest.raises(CheckpointError, match="no weights"):
    load_clip(str(tiny_dir))
  (tiny_dir / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="safe_serialization=True"):
    load_clip(str(tiny_dir))
  os.remove(tiny_dir / "config.json")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_clip(str(tiny_dir))


def test_preprocessor_that_does_not_match(tiny_dir):
  (tiny_dir / "preprocessor_config.json").write_text(
      json.dumps({"crop_size": 224, "size": 224}))
  with pytest.raises(CheckpointError, match="crops to 224.*takes 30"):
    load_clip(str(tiny_dir))


def test_hub_id_offline(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("OVC_JAX_CHECKPOINTS", str(tmp_path))
  with pytest.raises(CheckpointError) as info:
    load_clip("ovc-test/no-such-clip")
  message = str(info.value)
  assert "offline" in message
  assert os.path.join(str(tmp_path), "downloads", "ovc-test", "no-such-clip") in message
  assert "config.json" in message and "model.safetensors" in message


def test_hub_id_found_in_downloads(tiny_checkpoint, tmp_path, monkeypatch):
  _, root, *_ = tiny_checkpoint
  monkeypatch.setenv("OVC_JAX_CHECKPOINTS", str(tmp_path))
  shutil.copytree(root / "safetensors",
                  tmp_path / "downloads" / "ovc-test" / "tiny-clip")
  loaded = load_clip("ovc-test/tiny-clip")
  assert loaded.name == "ovc-test/tiny-clip"


def test_bad_specs(tmp_path, monkeypatch):
  monkeypatch.setenv("OVC_JAX_CHECKPOINTS", str(tmp_path))
  with pytest.raises(CheckpointError, match="unknown model"):
    load_clip("not a model!")
  with pytest.raises(CheckpointError, match="openai/clip-vit-base-patch32"):
    load_clip("ViT-B/32")
  with pytest.raises(CheckpointError, match="openclip:RN50:FILE"):
    load_clip("RN50")
  with pytest.raises(CheckpointError, match="toy CLIP is not at"):
    load_clip("toy")
  with pytest.raises(ConfigError, match="dtype"):
    load_clip("toy", dtype="float16")
  with pytest.raises(ConfigError, match="non-empty"):
    load_clip("")
  weights = tmp_path / "weights.safetensors"
  weights.write_bytes(b"12345678")
  with pytest.raises(CheckpointError, match="openclip:ARCH"):
    load_clip(str(weights))
  with pytest.raises(CheckpointError, match="does not exist"):
    load_clip(f"openclip:RN50:{tmp_path / 'missing.safetensors'}")
  pt = tmp_path / "RN50.pt"
  pt.write_bytes(b"")
  with pytest.raises(CheckpointError, match="not a .safetensors file"):
    load_clip(f"openclip:RN50:{pt}")
  with pytest.raises(CheckpointError, match="not a valid safetensors file"):
    load_clip(f"openclip:RN50:{weights}")
