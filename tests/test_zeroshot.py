"""Zero-shot class embeddings, prompt ensembles and predictions.

The predictions are `classifiers.predict_from_embeddings` on the normalised
image embeddings; `zero_shot_logits` / `zero_shot_predict` below are that
composition with shape checks, as test helpers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import zeroshot
from ovc_jax.classifiers import l2_normalize, predict_from_embeddings, prompt_logits
from ovc_jax.errors import ConfigError, InputError
from ovc_jax.models import (CLIPConfig, ClipModel, ClipTokenizer, LoadedClip,
                            TextConfig, VisionConfig)
from ovc_jax.preprocessing import PreprocessSpec

CONFIG = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig("vit", image_size=16, width=16, layers=1, heads=2,
                        patch_size=8, mlp_dim=32),
    text=TextConfig(vocab_size=32, context_length=10, width=16, layers=2,
                    heads=2, mlp_dim=32, eos_token_id=31, pooling="eos"))
CLASSES = ["cat", "dog", "bird", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of a {}."]


def _check_embeddings(image_embeddings, class_matrix):
  if image_embeddings.ndim != 2:
    raise InputError(f"image embeddings must be [B, d]; got {image_embeddings.shape}")
  if class_matrix.ndim not in (2, 3):
    raise InputError(f"class embeddings must be [C, d] or [P, C, d]; got "
                     f"{class_matrix.shape}")
  if image_embeddings.shape[-1] != class_matrix.shape[-1]:
    raise InputError(
        f"image embeddings have dimension {image_embeddings.shape[-1]} but the "
        f"class embeddings {class_matrix.shape[-1]}")


def zero_shot_logits(image_embeddings, class_matrix):
  """U z, z the L2-normalised image embedding: `[B, C]` or `[B, P, C]`."""
  _check_embeddings(image_embeddings, class_matrix)
  return prompt_logits(l2_normalize(image_embeddings), class_matrix)


def zero_shot_predict(image_embeddings, class_matrix):
  """argmax_c (U z)[c]: int32 `[B]` or `[B, P]`."""
  _check_embeddings(image_embeddings, class_matrix)
  return predict_from_embeddings(l2_normalize(image_embeddings), class_matrix)


@pytest.fixture(scope="module")
def loaded():
  from tokenizers import Tokenizer, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  words = ["[PAD]", "[BOS]", "[UNK]", "a", "photo", "of", "the", "blurry",
           "itap", "."] + CLASSES
  vocab = {w: i for i, w in enumerate(words)}
  vocab["[EOS]"] = 31
  backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.post_processor = processors.TemplateProcessing(
      single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 31)])
  tokenizer = ClipTokenizer(backend, context_length=10, eos_token_id=31)
  model = ClipModel(CONFIG)
  params = model.init(jax.random.key(0))
  return LoadedClip(model, params, tokenizer, PreprocessSpec(16, 16), "tiny",
                    "0" * 64)


def _reference(loaded, texts):
  z = jax.jit(loaded.model.embed_texts)(loaded.params, loaded.tokenizer(texts))
  return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def test_class_embeddings_are_normalised_prompt_embeddings(loaded):
  u = zeroshot.class_embeddings(loaded, TEMPLATES[0], CLASSES)
  assert u.shape == (len(CLASSES), 16) and u.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, atol=1e-6)
  ref = _reference(loaded, [TEMPLATES[0].format(c) for c in CLASSES])
  np.testing.assert_allclose(u, ref, atol=1e-6)


def test_chunked_text_batches_give_the_same_rows(loaded, monkeypatch):
  whole = zeroshot.class_embeddings(loaded, TEMPLATES[1], CLASSES)
  monkeypatch.setattr(zeroshot, "TEXT_BATCH", 3)  # 7 = 3 + 3 + 1 (padded).
  chunked = zeroshot.class_embeddings(loaded, TEMPLATES[1], CLASSES)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_stack_and_ensemble(loaded):
  stacked = zeroshot.stack_prompts(loaded, TEMPLATES, CLASSES)
  assert stacked.shape == (len(TEMPLATES), len(CLASSES), 16)
  for p, template in enumerate(TEMPLATES):
    np.testing.assert_allclose(
        stacked[p], zeroshot.class_embeddings(loaded, template, CLASSES),
        atol=1e-6)
  ensemble = zeroshot.ensemble_class_embeddings(loaded, TEMPLATES, CLASSES)
  mean = stacked.mean(axis=0)
  np.testing.assert_allclose(
      ensemble, mean / jnp.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(ensemble, axis=-1), 1.0, atol=1e-6)


def test_text_tower_and_stacked_ensemble_match_loaded_clip(loaded):
  tower = zeroshot.TextTower(loaded.model, loaded.params, loaded.tokenizer)
  np.testing.assert_array_equal(
      zeroshot.class_embeddings(tower, TEMPLATES[0], CLASSES),
      zeroshot.class_embeddings(loaded, TEMPLATES[0], CLASSES))
  np.testing.assert_array_equal(
      zeroshot.ensemble(zeroshot.stack_prompts(tower, TEMPLATES, CLASSES)),
      zeroshot.ensemble_class_embeddings(loaded, TEMPLATES, CLASSES))


def test_embed_in_batches_pads_and_drops_the_last_batch():
  x = np.arange(14, dtype=np.float32).reshape(7, 2)
  shapes = []

  def double(batch):
    shapes.append(batch.shape)
    return jnp.asarray(batch) * 2

  out = zeroshot.embed_in_batches(double, x, 3)
  np.testing.assert_array_equal(out, x * 2)
  assert shapes == [(3, 2)] * 3  # One compiled shape.


def test_logits_and_predictions(loaded):
  u = zeroshot.class_embeddings(loaded, TEMPLATES[0], CLASSES)
  z = jax.random.normal(jax.random.key(3), (5, 16)) * 7.0  # Not normalised.
  logits = zero_shot_logits(z, u)
  zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(logits, zn @ u.T, atol=1e-5)
  assert float(jnp.abs(logits).max()) <= 1.0 + 1e-5  # Cosine similarities.
  pred = zero_shot_predict(z, u)
  assert pred.dtype == jnp.int32
  np.testing.assert_array_equal(pred, jnp.argmax(zn @ u.T, axis=-1))
  # Several prompts at once: [B, P].
  stacked = zeroshot.stack_prompts(loaded, TEMPLATES, CLASSES)
  preds = zero_shot_predict(z, stacked)
  assert preds.shape == (5, len(TEMPLATES))
  np.testing.assert_array_equal(preds[:, 1],
                                zero_shot_predict(z, stacked[1]))


def test_image_embeddings_to_prediction_end_to_end(loaded):
  images = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
  z = loaded.model.embed_images_checked(loaded.params, images)
  u = zeroshot.ensemble_class_embeddings(loaded, TEMPLATES, CLASSES)
  pred = zero_shot_predict(z, u)
  assert pred.shape == (2,) and 0 <= int(pred.min()) <= int(pred.max()) < 7


def test_template_and_class_errors(loaded):
  # The validators are prompts.validate_*; these check that every entry point
  # of zeroshot goes through them.
  with pytest.raises(ConfigError, match="template list is empty"):
    zeroshot.stack_prompts(loaded, [], CLASSES)
  with pytest.raises(ConfigError, match="template list is empty"):
    zeroshot.ensemble_class_embeddings(loaded, [], CLASSES)
  with pytest.raises(ConfigError, match="exactly one '{}'"):
    zeroshot.class_embeddings(loaded, "a photo of a cat.", CLASSES)
  with pytest.raises(ConfigError, match="exactly one '{}'"):
    zeroshot.stack_prompts(loaded, ["a photo of a {}.", "a photo."], CLASSES)
  with pytest.raises(ConfigError, match="exactly one '{}'"):
    zeroshot.class_embeddings(loaded, "a {} of a {}.", CLASSES)
  with pytest.raises(ConfigError, match="not a valid format string"):
    zeroshot.class_embeddings(loaded, "a {} of a }.", CLASSES)
  with pytest.raises(ConfigError, match="exactly one '{}'"):
    zeroshot.class_embeddings(loaded, "", CLASSES)
  with pytest.raises(ConfigError, match="list of strings"):
    zeroshot.stack_prompts(loaded, "a photo of a {}.", CLASSES)
  with pytest.raises(ConfigError, match="class-name list is empty"):
    zeroshot.class_embeddings(loaded, TEMPLATES[0], [])
  with pytest.raises(ConfigError, match="list of strings"):
    zeroshot.class_embeddings(loaded, TEMPLATES[0], "cat")
  with pytest.raises(ConfigError, match="class name 1 is empty"):
    zeroshot.class_embeddings(loaded, TEMPLATES[0], ["cat", " "])


def test_embedding_shape_errors(loaded):
  u = zeroshot.class_embeddings(loaded, TEMPLATES[0], CLASSES)
  with pytest.raises(InputError, match="dimension 8"):
    zero_shot_predict(jnp.ones((2, 8)), u)
  with pytest.raises(InputError, match=r"\[B, d\]"):
    zero_shot_logits(jnp.ones((8,)), u)
