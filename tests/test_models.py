"""The Flax CLIP model: configs, jit/hash contracts, bf16, and parity with
OpenAI's original model.py (ModifiedResNet RN50, ViT-B/32, and OpenCLIP's
gelu ViT-B-32) on random weights.

OpenAI's model.py comes from the openai-clip package, loaded by file path
(the package's __init__ imports torchvision). OpenCLIP's ViT-B-32 differs from
OpenAI's only in using exact GELU; it is checked by swapping the reference's
QuickGELU modules for torch.nn.GELU on the same weights.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax.errors import CheckpointError, ConfigError, InputError
from ovc_jax.models import (PRESETS, CLIPConfig, ClipModel, TextConfig,
                            VisionConfig, load_clip, named_config)
from ovc_jax.models import convert

os.environ["HF_HUB_OFFLINE"] = "1"

TOL = 1e-5

TINY_VIT = CLIPConfig(
    embed_dim=24,
    vision=VisionConfig("vit", image_size=32, width=32, layers=2, heads=4,
                        patch_size=8, mlp_dim=64),
    text=TextConfig(vocab_size=50, context_length=12, width=32, layers=2,
                    heads=4, mlp_dim=64, eos_token_id=49, pooling="argmax"))
TINY_RESNET = CLIPConfig(
    embed_dim=24,
    vision=VisionConfig("resnet", image_size=64, width=8, layers=(1, 2, 1, 1),
                        heads=4, patch_size=None, mlp_dim=None),
    text=TINY_VIT.text)


def _openai_model_module():
  torch = pytest.importorskip("torch")
  del torch
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("the openai-clip package is not installed")
  location = list(spec.submodule_search_locations)[0]
  module_spec = importlib.util.spec_from_file_location(
      "openai_clip_model", os.path.join(location, "model.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


# ---------------------------------------------------------------------------
# Configs


def test_config_dict_round_trip_through_json():
  for config in [TINY_VIT, TINY_RESNET, *PRESETS.values()]:
    d = json.loads(json.dumps(config.to_dict()))
    assert CLIPConfig.from_dict(d) == config
    assert hash(CLIPConfig.from_dict(d)) == hash(config)


def test_config_validation_errors():
  with pytest.raises(ConfigError, match="patch_size"):
    VisionConfig(image_size=225, patch_size=32)
  with pytest.raises(ConfigError, match="divisible by heads"):
    VisionConfig(width=100, heads=12)
  with pytest.raises(ConfigError, match="4 positive block counts"):
    VisionConfig("resnet", layers=(3, 4, 6), patch_size=None, mlp_dim=None)
  with pytest.raises(ConfigError, match="pooling"):
    TextConfig(pooling="mean")
  with pytest.raises(ConfigError, match="activation"):
    TextConfig(activation="relu")
  with pytest.raises(ConfigError, match="unknown CLIPConfig fields"):
    CLIPConfig.from_dict({**TINY_VIT.to_dict(), "extra": 1})
  with pytest.raises(ConfigError, match="unknown TextConfig fields"):
    CLIPConfig.from_dict({**TINY_VIT.to_dict(), "text": {"bogus": 1}})


def test_named_configs_choose_the_activation():
  assert named_config("ViT-B/32").vision.activation == "quick_gelu"
  assert named_config("ViT-B-32-quickgelu").text.activation == "quick_gelu"
  assert named_config("ViT-B-32").vision.activation == "gelu"  # OpenCLIP
  assert named_config("ViT-B-32").text.activation == "gelu"
  assert named_config("RN50").text.activation == "quick_gelu"
  assert named_config("ViT-L/14@336px").vision.image_size == 336
  with pytest.raises(ConfigError, match="unknown CLIP architecture"):
    named_config("ViT-H-14")


# ---------------------------------------------------------------------------
# ClipModel contracts


@pytest.fixture(scope="module")
def tiny():
  model = ClipModel(TINY_VIT)
  return model, model.init(jax.random.key(0))


def test_equal_models_hash_equal_and_share_jit_cache(tiny):
  model, params = tiny
  twin = ClipModel(CLIPConfig.from_dict(TINY_VIT.to_dict()))
  assert twin == model and hash(twin) == hash(model)
  assert twin.embed_images == model.embed_images
  assert hash(twin.embed_images) == hash(model.embed_images)
  assert ClipModel(TINY_VIT, "bfloat16") != model
  traces = []

  def embed(m, p, x):
    traces.append(1)
    return m.embed_images(p, x)

  f = jax.jit(embed, static_argnums=0)
  x = jnp.zeros((2, 32, 32, 3))
  f(model, params, x)
  f(twin, params, x)
  assert len(traces) == 1


def test_jit_with_params_as_argument(tiny):
  model, params = tiny
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  ids = jnp.asarray([[48, 5, 49] + [0] * 9, [48, 7, 8, 49] + [0] * 8], jnp.int32)
  embed_images = jax.jit(model.embed_images)
  z = embed_images(params, x)
  t = jax.jit(ClipModel.embed_texts, static_argnums=0)(model, params, ids)
  assert z.shape == (3, 24) and z.dtype == jnp.float32
  assert t.shape == (2, 24) and t.dtype == jnp.float32
  # New params, same compiled function: nothing is closed over.
  params2 = model.init(jax.random.key(2))
  z2 = embed_images(params2, x)
  assert not np.allclose(z, z2)
  assert embed_images._cache_size() == 1  # pylint: disable=protected-access


def test_params_are_float32_and_shapes_match_param_shapes(tiny):
  model, params = tiny
  shapes = model.param_shapes()
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(
      lambda a: a.shape, shapes)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  assert params["vision"]["transformer"]["block0"]["attn"]["qkv"]["kernel"].shape \
      == (32, 96)


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_bfloat16_is_close_to_float32(config):
  # bf16 keeps ~3 significant digits per op; over a few layers the embedding
  # direction stays within cosine 0.999 and an absolute error of a few 1e-2
  # of the embedding scale. (The ResNet shares the text tower: images only.)
  f32 = ClipModel(config)
  bf16 = ClipModel(config, "bfloat16")
  params = f32.init(jax.random.key(0))
  s = config.vision.image_size
  x = jax.random.normal(jax.random.key(1), (2, s, s, 3))
  ids = jnp.asarray([[48, 5, 6, 49] + [0] * 8], jnp.int32)
  checks = [("embed_images", x)]
  if config.vision.architecture == "vit":
    checks.append(("embed_texts", ids))
  for fn, arg in checks:
    a = jax.jit(getattr(f32, fn))(params, arg)
    b = jax.jit(getattr(bf16, fn))(params, arg)
    assert b.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    cos = jnp.sum(a * b, -1) / jnp.linalg.norm(a, axis=-1) / jnp.linalg.norm(b, axis=-1)
    print(f"\nbf16 vs f32 {config.vision.architecture} {fn}: min cos "
          f"{float(cos.min()):.5f}, max|diff| {float(jnp.abs(a - b).max()):.2e} "
          f"(max|f32| {float(jnp.abs(a).max()):.2f})")
    assert float(cos.min()) > 0.999, (fn, cos)
    assert float(jnp.abs(a - b).max()) < 0.03 * float(jnp.abs(a).max()) + 1e-3


def test_bad_dtype_is_a_config_error():
  with pytest.raises(ConfigError, match="dtype"):
    ClipModel(TINY_VIT, "float16")


def test_checked_entry_points_reject_bad_inputs(tiny):
  model, params = tiny
  with pytest.raises(InputError, match="32x32"):
    model.embed_images_checked(params, np.zeros((2, 30, 30, 3), np.float32))
  with pytest.raises(InputError, match="3 channels"):
    model.embed_images_checked(params, np.zeros((2, 32, 32, 1), np.float32))
  with pytest.raises(InputError, match="NaN"):
    model.embed_images_checked(params, np.full((1, 32, 32, 3), np.nan, np.float32))
  with pytest.raises(InputError, match="length"):
    model.embed_texts_checked(params, np.zeros((1, 13), np.int32))
  with pytest.raises(InputError, match="must lie in"):
    model.embed_texts_checked(params, np.full((1, 5), 50, np.int32))
  assert model.embed_images_checked(params, np.zeros((32, 32, 3))).shape == (1, 24)


# ---------------------------------------------------------------------------
# Parity with OpenAI's model.py


def _randomise(torch, model, seed):
  """Non-trivial values for every parameter and buffer the init leaves flat.

  BatchNorm running statistics (inference mode uses them), BN and LayerNorm
  affine parameters, attention biases: all random, so that a transposed or
  mislabelled tensor cannot go unnoticed.
  """
  g = torch.Generator().manual_seed(seed)

  def rand(shape, scale, offset=0.0):
    return offset + scale * torch.randn(shape, generator=g)

  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        c = mod.num_features
        mod.weight.copy_(0.75 + 0.5 * torch.rand(c, generator=g))
        mod.bias.copy_(rand(c, 0.1))
        mod.running_mean.copy_(rand(c, 0.1))
        mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
      elif isinstance(mod, torch.nn.LayerNorm):
        mod.weight.copy_(rand(mod.weight.shape, 0.1, 1.0))
        mod.bias.copy_(rand(mod.bias.shape, 0.1))
      elif isinstance(mod, torch.nn.MultiheadAttention):
        mod.in_proj_bias.copy_(rand(mod.in_proj_bias.shape, 0.02))
        mod.out_proj.bias.copy_(rand(mod.out_proj.bias.shape, 0.02))
  return model.eval()


def _save_state_dict(model, path, prefix=""):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()},
            path)


def _reference_features(torch, model, images, token_ids):
  with torch.no_grad():
    zi = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    zt = model.encode_text(torch.from_numpy(token_ids).long())
  return zi.numpy(), zt.numpy()


def _ours(loaded, images, token_ids):
  zi = loaded.model.embed_images_checked(loaded.params, images)
  zt = loaded.model.embed_texts_checked(loaded.params, token_ids)
  return np.asarray(zi), np.asarray(zt)


PROMPTS = ["a photo of a cat.", "a blurry photo of the big red fire truck!"]


def _report(label, ours, ref):
  diff = float(np.abs(ours - ref).max())
  print(f"\n{label}: max|diff| = {diff:.2e} (max|ref| = {np.abs(ref).max():.2f})")
  return diff


@pytest.fixture(scope="module")
def rn50_reference(tmp_path_factory):
  torch = pytest.importorskip("torch")
  openai = _openai_model_module()
  torch.manual_seed(0)
  model = openai.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
  model = _randomise(torch, model, seed=1)
  path = str(tmp_path_factory.mktemp("rn50") / "open_clip_model.safetensors")
  # 'module.' as a DistributedDataParallel checkpoint would have it.
  _save_state_dict(model, path, prefix="module.")
  return torch, model, path


def test_rn50_matches_openai_reference(rn50_reference):
  torch, model, path = rn50_reference
  loaded = load_clip(f"openclip:RN50:{path}")
  assert loaded.model.config == PRESETS["RN50"]
  assert loaded.name == "openclip:RN50"
  images = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  ids = loaded.tokenizer(PROMPTS)
  ref_i, ref_t = _reference_features(torch, model, images, ids)
  ours_i, ours_t = _ours(loaded, images, ids)
  assert _report("RN50 image", ours_i, ref_i) <= TOL
  assert _report("RN50 text", ours_t, ref_t) <= TOL


def test_rn50_wrong_architecture_name_is_reported(rn50_reference):
  _, _, path = rn50_reference
  with pytest.raises(CheckpointError, match="not a RN101 model.*layers"):
    load_clip(f"openclip:RN101:{path}")
  with pytest.raises(CheckpointError, match="not a ViT-B-32 model"):
    load_clip(f"openclip:ViT-B-32:{path}")


@pytest.fixture(scope="module")
def vit_b32_reference(tmp_path_factory):
  torch = pytest.importorskip("torch")
  openai = _openai_model_module()
  torch.manual_seed(0)
  model = openai.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
  model = _randomise(torch, model, seed=2)
  path = str(tmp_path_factory.mktemp("vitb32") / "open_clip_model.safetensors")
  _save_state_dict(model, path)
  return torch, model, path


def test_openai_vit_b32_matches_reference(vit_b32_reference):
  torch, model, path = vit_b32_reference
  loaded = load_clip(f"openai:ViT-B/32:{path}")
  assert loaded.model.config == PRESETS["ViT-B-32"]
  images = np.random.RandomState(1).randn(2, 224, 224, 3).astype(np.float32)
  ids = loaded.tokenizer(PROMPTS)
  ref_i, ref_t = _reference_features(torch, model, images, ids)
  ours_i, ours_t = _ours(loaded, images, ids)
  assert _report("OpenAI ViT-B/32 image", ours_i, ref_i) <= TOL
  assert _report("OpenAI ViT-B/32 text", ours_t, ref_t) <= TOL


def test_openclip_vit_b32_gelu_matches_reference_with_gelu(vit_b32_reference):
  torch, model, path = vit_b32_reference
  loaded = load_clip(f"openclip:ViT-B-32:{path}")
  assert loaded.model.config.vision.activation == "gelu"
  assert loaded.model.config.text.activation == "gelu"
  # OpenCLIP's ViT-B-32 is OpenAI's architecture with exact GELU.
  for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
    block.mlp.gelu = torch.nn.GELU()
  images = np.random.RandomState(1).randn(2, 224, 224, 3).astype(np.float32)
  ids = loaded.tokenizer(PROMPTS)
  ref_i, ref_t = _reference_features(torch, model, images, ids)
  ours_i, ours_t = _ours(loaded, images, ids)
  assert _report("OpenCLIP ViT-B-32 (gelu) image", ours_i, ref_i) <= TOL
  assert _report("OpenCLIP ViT-B-32 (gelu) text", ours_t, ref_t) <= TOL


# Every published architecture: OpenAI's build_model sizes, our config
# inference, and the full name/shape mapping, on a meta-device state dict
# (shapes only, no memory).
OPENAI_ARGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B-32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B-16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L-14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}


@pytest.mark.parametrize("name", sorted(OPENAI_ARGS))
def test_openai_state_dict_names_and_shapes(name):
  torch = pytest.importorskip("torch")
  openai = _openai_model_module()
  with torch.device("meta"):
    reference = openai.CLIP(*OPENAI_ARGS[name])
  # Zero-stride views: the real shapes at no memory cost.
  state = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
           for k, v in reference.state_dict().items()}
  config = convert.infer_openai_config({k: v.shape for k, v in state.items()},
                                       "quick_gelu", name)
  assert config == PRESETS[name]
  params = convert.params_from_openai(state, config, name)
  convert.check_param_shapes(params, ClipModel(config).param_shapes(), name)


def test_state_dict_errors_name_the_tensor(vit_b32_reference):
  _, model, _ = vit_b32_reference
  state = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
           for k, v in model.state_dict().items()
           if not k.startswith("visual.transformer")}
  config = PRESETS["ViT-B-32"]
  # Fake a narrower text projection.
  state["text_projection"] = np.zeros((512, 256), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"'text_projection' has shape \(512, 256\).*\(512, 512\)"):
    convert.params_from_openai(state, config, "file.safetensors")
  state["text_projection"] = np.zeros((512, 512), np.float32)
  with pytest.raises(CheckpointError, match="missing"):
    convert.params_from_openai(state, config, "file.safetensors")
  del state["visual.proj"]
  with pytest.raises(CheckpointError, match="visual.layer1.0.conv1.weight"):
    convert.infer_openai_config({k: v.shape for k, v in state.items()},
                                "quick_gelu", "file.safetensors")


def test_unknown_openclip_architecture_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="unknown CLIP architecture"):
    load_clip(f"openclip:ViT-H-14:{tmp_path / 'x.safetensors'}")
  with pytest.raises(ConfigError, match="expected 'openclip:ARCH"):
    load_clip("openclip:RN50")


def test_resnet_bottleneck_param_names():
  shapes = ClipModel(TINY_RESNET).param_shapes()["vision"]
  assert set(shapes["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3",
                                     "bn3", "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in shapes["layer2_1"]
  assert set(shapes["bn1"]) == {"scale", "bias", "mean", "var"}
  assert shapes["attnpool"]["positional_embedding"].shape == (5, 256)
  assert dataclasses.asdict(TINY_RESNET.vision)["layers"] == (1, 2, 1, 1)
