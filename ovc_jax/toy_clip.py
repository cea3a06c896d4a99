"""The toy CLIP, trained on the toy world: tokenizer, loss, train step, eval.

The library half of `experiments/train_toy_clip.py`; everything here is a
function of arrays, params and keys (flags and configs stay in experiments/).

  * Tokenizer: word level over `vocabulary()`, built with the `tokenizers`
    library and saved as a Hugging Face `tokenizer.json`, so that
    `transformers.AutoTokenizer` loads it offline. Every sequence is
    `<sot> words... <eot> <pad>...`; the text tower pools at the first `<eot>`
    ('eos' pooling). `<eot>` is id 3, not 2: transformers reads a text config
    with eos_token_id == 2 as legacy argmax pooling.
  * Loss: CLIP's symmetric InfoNCE with a learnable temperature, except that
    captions repeated within a batch are all positives (see
    `contrastive_loss`).
  * Train step: Gaussian noise in CLIP-normalised space with a per-image sigma
    drawn from a small set (Cohen et al. train the base classifier under the
    noise it is later smoothed with), then AdamW.
  * Evaluation: accuracy per group of images, and the certified accuracy at
    radius 0 of the smoothed classifier, via the project's standard
    certifier. Zero-shot class embeddings come from `ovc_jax.zeroshot`, given
    `text_tower(model, params, tokenizer)`.

It sits above `ovc_jax.toy_world` (the images and captions it trains on) and
the library (models, classifiers, certifiers); the toy world itself depends on
none of them.

Example:
  tokenizer = build_tokenizer(vocabulary(), context_length=16)
  tokens = tokenize(tokenizer, captions)                 # [B, 16] int32
  loss, metrics = contrastive_loss(z_img, z_txt, params["logit_scale"], ids)
  u = zeroshot.class_embeddings(text_tower(model, params, tokenizer),
                                "a photo of a {}.", TOY_CLASSES)  # [C, d]
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ovc_jax import certificates
from ovc_jax import classifiers
from ovc_jax import preprocessing
from ovc_jax import sampler
from ovc_jax import zeroshot
from ovc_jax.certifiers import standard
from ovc_jax.errors import ConfigError
from ovc_jax.models import ClipModel
from ovc_jax.toy_world import captions as captions_lib

Params = Any

# Special tokens, in id order. <eot> must not be id 2 (transformers' legacy
# argmax-pooling marker); <pad> is 0 so that padding is the zero id.
PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
SPECIAL_TOKENS = (PAD, UNK, SOT, EOT)
PAD_ID, UNK_ID, SOT_ID, EOT_ID = range(len(SPECIAL_TOKENS))

# CLIP clips its learnable temperature at 100 (log 100 for the log-scale).
MAX_LOGIT_SCALE = math.log(100.0)

# The toy world's words: lower-case letter runs and single punctuation marks,
# the split `ovc_jax.toy_world.words` makes.
_WORD_PATTERN = r"[a-z]+|[^a-z]"


# ---------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(words: Sequence[str],
                    context_length: int) -> tokenizers.Tokenizer:
  """A word-level tokenizer: ids 0-3 special, then `words` in the given order.

  Text is lower-cased, split on white space and then into letter runs and
  single punctuation marks, each piece one token (<unk> if not in `words`).
  Encoding adds <sot> and <eot>, truncates to `context_length` (keeping
  <eot>) and pads with <pad> to exactly `context_length`.

  Args:
    words: the vocabulary, e.g. `toy_world.vocabulary()`; no duplicates, no
      special tokens.
    context_length: the text tower's positions (L); >= 3.

  Raises:
    ConfigError: duplicate or special words, or a context too short.
  """
  if len(set(words)) != len(words) or set(words) & set(SPECIAL_TOKENS):
    raise ConfigError("tokenizer words must be distinct and not special tokens")
  if context_length < 3:
    raise ConfigError(f"context_length must be >= 3; got {context_length}")
  vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(words))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Split(tokenizers.Regex(_WORD_PATTERN), behavior="isolated"),
  ])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{SOT} $A {EOT}", special_tokens=[(SOT, SOT_ID), (EOT, EOT_ID)])
  # WordPiece's decoder with an impossible prefix joins tokens with spaces.
  tok.decoder = decoders.WordPiece(prefix="\0", cleanup=False)
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.enable_truncation(max_length=context_length)
  tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=context_length)
  return tok


def tokenize(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> np.ndarray:
  """Token ids int32 `[len(texts), context_length]`."""
  return np.asarray([e.ids for e in tokenizer.encode_batch(list(texts))],
                    np.int32)


def text_tower(model: ClipModel, params: Params,
               tokenizer: tokenizers.Tokenizer) -> zeroshot.TextTower:
  """The model's text side in the form `ovc_jax.zeroshot` takes."""
  return zeroshot.TextTower(model, params,
                            functools.partial(tokenize, tokenizer))


def tokenizer_files(tokenizer: tokenizers.Tokenizer) -> dict[str, str]:
  """The Hugging Face tokenizer files: {file name: text}.

  `tokenizer.json` (the tokenizer itself), `tokenizer_config.json`
  (`PreTrainedTokenizerFast`, the special tokens, model_max_length) and
  `special_tokens_map.json`, which `AutoTokenizer.from_pretrained` reads.
  """
  truncation = tokenizer.truncation
  if truncation is None:
    raise ConfigError("the tokenizer has no context length (truncation)")
  special = {"bos_token": SOT, "eos_token": EOT, "pad_token": PAD,
             "unk_token": UNK}
  added = {
      str(i): {"content": t, "lstrip": False, "normalized": False,
               "rstrip": False, "single_word": False, "special": True}
      for i, t in enumerate(SPECIAL_TOKENS)}
  config = dict(
      special,
      tokenizer_class="PreTrainedTokenizerFast",
      model_max_length=truncation["max_length"],
      padding_side="right",
      clean_up_tokenization_spaces=False,
      added_tokens_decoder=added,
      model_input_names=["input_ids", "attention_mask"])
  return {
      "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
      "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
      "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
  }


def with_template_captions(rng: np.random.Generator, texts: Sequence[str],
                           labels: np.ndarray,
                           attributes: Mapping[str, np.ndarray],
                           fraction: float) -> list[str]:
  """Replaces a `fraction` of captions by a zero-shot template true of the image.

  Why: free captions name colour, size, style and background, and within a
  batch those alone tell most captions apart, so the contrastive loss barely
  asks for the shape, which is the class. A template caption ("a photo of a
  star.") is shared by many images of a batch and differs between them only
  in the class word, so it asks for the shape; it is also the text the model
  is later certified with. Only templates true of the image are used
  (`captions.template_matches`).

  Args:
    rng: the generator (advanced).
    texts: the images' free captions.
    labels: int `[B]` classes.
    attributes: the batch's attributes ('style', 'size', 'background').
    fraction: in [0, 1], the expected share of replaced captions.

  Returns:
    The captions, some replaced.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"template caption fraction must be in [0, 1]; got {fraction}")
  matches = captions_lib.template_matches(attributes)  # [B, T]
  replace = rng.random(len(texts)) < fraction
  choice = rng.random(matches.shape)  # a random true template per image
  pick = np.argmax(np.where(matches, choice, -1.0), axis=-1)
  return [captions_lib.TOY_TEMPLATES[pick[i]].format(
              captions_lib.TOY_CLASSES[labels[i]])
          if replace[i] and matches[i].any() else t
          for i, t in enumerate(texts)]


def unique_ids(texts: Sequence[str]) -> np.ndarray:
  """int32 `[B]`: equal texts get equal ids (the loss's positives)."""
  _, ids = np.unique(np.asarray(texts), return_inverse=True)
  return ids.astype(np.int32)


# ---------------------------------------------------------------------------
# Loss and train step


def contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array,
                     logit_scale: jax.Array, caption_ids: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CLIP's symmetric InfoNCE loss, with repeated captions as shared positives.

  Captions repeat within a batch ("a photo of a star." is common), and equal
  texts have equal embeddings, so one-hot targets would ask the model for the
  impossible: to score image i's own copy of a caption above image j's
  identical copy. Here every pair (image i, caption j) with caption_j ==
  caption_i is a positive and the target spreads evenly over them, in both
  directions; without repeats this is CLIP's loss.

  Args:
    image_embeddings: `[B, d]`, not normalised.
    text_embeddings: `[B, d]`, not normalised; row i is image i's caption.
    logit_scale: scalar, the log of the inverse temperature.
    caption_ids: int `[B]`; equal ids mark equal captions.

  Returns:
    (loss, metrics): scalar loss; metrics 'loss', 'image_to_text_accuracy'
    (the best caption of an image is one of its positives), 'logit_scale'
    (exp of the parameter).
  """
  zi = classifiers.l2_normalize(image_embeddings)
  zt = classifiers.l2_normalize(text_embeddings)
  logits = jnp.exp(logit_scale) * zi @ zt.T  # [B (images), B (texts)]
  positives = caption_ids[:, None] == caption_ids[None, :]  # symmetric
  targets = positives / jnp.sum(positives, axis=-1, keepdims=True)
  image_to_text = optax.softmax_cross_entropy(logits, targets)
  text_to_image = optax.softmax_cross_entropy(logits.T, targets)
  loss = 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))
  best = jnp.argmax(logits, axis=-1)
  accuracy = jnp.mean(jnp.take_along_axis(positives, best[:, None], axis=-1))
  return loss, {"loss": loss, "image_to_text_accuracy": accuracy,
                "logit_scale": jnp.exp(logit_scale)}


def add_training_noise(key: jax.Array, images: jax.Array,
                       sigmas: Sequence[float]) -> jax.Array:
  """Gaussian noise with a per-image sigma drawn uniformly from `sigmas`.

  Args:
    key: the noise key.
    images: `[B, H, W, C]` CLIP-normalised images.
    sigmas: the noise levels to draw from (0 for clean images).

  Returns:
    `[B, H, W, C]` noisy images.
  """
  k_sigma, k_noise = jax.random.split(key)
  sigma = jax.random.choice(k_sigma, jnp.asarray(sigmas, images.dtype),
                            (images.shape[0],))
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return images + sigma[:, None, None, None] * noise


def weight_decay_mask(params: Params) -> Params:
  """Decay matrices only: not biases, layer-norm gains or the logit scale."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int,
                   end_learning_rate: float = 0.0, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                   grad_clip_norm: float = 1.0) -> optax.GradientTransformation:
  """AdamW (CLIP's betas and eps) with linear warmup and cosine decay."""
  if not 0 <= warmup_steps < total_steps:
    raise ConfigError(f"need 0 <= warmup_steps < total_steps; got "
                      f"{warmup_steps} and {total_steps}")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_learning_rate)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=weight_decay_mask))


class TrainState(NamedTuple):
  """What a training run carries from step to step (and checkpoints)."""

  step: jax.Array  # int32 scalar: steps done
  params: Params
  opt_state: optax.OptState


def init_train_state(model: ClipModel, optimizer: optax.GradientTransformation,
                     key: jax.Array) -> TrainState:
  params = model.init(key)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


class Batch(NamedTuple):
  """One training batch, host arrays.

  Attributes:
    images: float32 `[B, S, S, 3]` in [0, 1].
    tokens: int32 `[B, L]`, the captions.
    caption_ids: int32 `[B]`, equal for equal captions.
  """

  images: np.ndarray
  tokens: np.ndarray
  caption_ids: np.ndarray


def train_step(model: ClipModel, optimizer: optax.GradientTransformation,
               spec: preprocessing.PreprocessSpec, sigmas: tuple[float, ...],
               state: TrainState, batch: Batch, key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on the contrastive loss of a noisy batch.

  The noise is added after CLIP's preprocessing, in the space the classifier
  is certified in. Jit it with the first four arguments bound (they are
  hashable and static); `key` is the step's key, e.g. `fold_in(run_key, step)`.

  Returns:
    (the next state, metrics of this step's batch before the update).
  """
  images = preprocessing.preprocess(jnp.asarray(batch.images), spec)
  images = add_training_noise(key, images, sigmas)

  def loss_fn(params):
    return contrastive_loss(model.embed_images(params, images),
                            model.embed_texts(params, batch.tokens),
                            params["logit_scale"], batch.caption_ids)

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0,
                                             MAX_LOGIT_SCALE))
  metrics["grad_norm"] = optax.global_norm(grads)
  return TrainState(state.step + 1, params, opt_state), metrics


# ---------------------------------------------------------------------------
# Evaluation


def group_accuracies(correct: np.ndarray, groups: np.ndarray,
                     names: Sequence[str]) -> dict[str, dict[str, float]]:
  """{name: {'accuracy', 'count'}} of a bool `[N]` over int groups `[N]`."""
  out = {}
  for g, name in enumerate(names):
    members = groups == g
    if members.any():
      out[str(name)] = {"accuracy": float(correct[members].mean()),
                        "count": int(members.sum())}
  return out


def certified_accuracy_at_zero(model: ClipModel, params: Params,
                               class_embeddings: np.ndarray,
                               images: np.ndarray, labels: np.ndarray,
                               smoothing: certificates.SmoothingParams, *,
                               seed: int,
                               indices: Sequence[int] | None = None
                               ) -> dict[str, Any]:
  """Cohen et al.'s CERTIFY on each image; the fraction certified correct.

  Certified accuracy at radius 0 counts images whose certificate is the true
  class (any radius > 0); abstentions and wrong classes count as failures.
  Noise is added to the CLIP-normalised images with the project's keyed
  sampler (key of image i: `sampler.input_key(seed, i)`).

  Args:
    model, params: the CLIP.
    class_embeddings: `[C, d]`, normalised.
    images: float32 `[N, S, S, 3]`, CLIP-normalised.
    labels: int `[N]`.
    smoothing: CERTIFY's sigma, n0, n, alpha and batch size.
    seed: the noise seed.
    indices: the dataset indices of the images (for their keys); default
      0..N-1.

  Returns:
    {'certified_accuracy', 'abstain_rate', 'mean_radius_correct', 'count'}.
  """
  classifier = classifiers.EmbeddingClassifier(model.embed_images)
  apply_params = classifier.params(params, jnp.asarray(class_embeddings))
  indices = range(len(images)) if indices is None else indices
  correct, abstain, radii = 0, 0, []
  for x, label, idx in zip(images, labels, indices):
    cert = standard.certify(
        sampler.input_key(seed, int(idx)), classifier, apply_params, x,
        smoothing, num_classes=class_embeddings.shape[0])
    abstain += cert.prediction == certificates.ABSTAIN
    if cert.prediction == int(label):
      correct += 1
      radii.append(cert.radius)
  count = len(images)
  return {"certified_accuracy": correct / count,
          "abstain_rate": abstain / count,
          "mean_radius_correct": float(np.mean(radii)) if radii else 0.0,
          "count": count}


def summarize_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Means of the per-step metrics (host floats) over a logging window."""
  keys = history[0].keys()
  return {k: float(np.mean([float(h[k]) for h in history])) for k in keys}
