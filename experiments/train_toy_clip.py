r"""Train the toy CLIP contrastively on the toy world, evaluate it, export it.

  python -m experiments.train_toy_clip --workdir=workdirs/toy_clip   # exports to WORKDIR/export
  python -m experiments.train_toy_clip --config=experiments/configs/train_toy_clip.py:tiny \
      --workdir=/tmp/tiny --export_dir=/tmp/tiny_export
  python -m experiments.train_toy_clip --workdir=workdirs/toy_clip --export_to_checkpoints
                                       # replaces the shipped checkpoints/toy_clip

Trains a small CLIP (ovc_jax.models) on the infinite toy-world stream with
CLIP's contrastive loss and Gaussian noise augmentation in CLIP-normalised
space, saving orbax checkpoints to WORKDIR/checkpoints every
`checkpoint_every` steps. Killed (even with kill -9) and started again with
the same flags, it resumes from the last checkpoint and ends with the same
weights as an uninterrupted run: batch `step` and its noise are functions of
(seed, step). A workdir remembers its config (WORKDIR/config.json) and
refuses another one.

At the end it evaluates the model on the held-out toy test split (zero-shot
accuracy per template and per style, certified accuracy of the smoothed
classifier at radius 0) and exports it to --export_dir (default
WORKDIR/export) in the Hugging Face CLIP layout: config.json,
model.safetensors, the tokenizer files, preprocessor_config.json and
TRAINING.json (command, config, time, machine, metrics). The shipped model in
checkpoints/toy_clip/ is replaced only with --export_to_checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiments import common
from experiments.common import shipped
from experiments.configs import train_toy_clip as train_configs
from ovc_jax import certificates
from ovc_jax import classifiers
from ovc_jax import datasets
from ovc_jax import preprocessing
from ovc_jax import toy_clip
from ovc_jax import toy_world
from ovc_jax import zeroshot
from ovc_jax.errors import ConfigError
from ovc_jax.models import CLIPConfig, ClipModel, TextConfig, VisionConfig
from ovc_jax.models import save_hf_checkpoint
from ovc_jax.models.config import config_to_hf
from ovc_jax.toy_world import captions as captions_lib

RECORD_NAME = "TRAINING.json"

_CONFIG = common.define_config_flag(train_configs)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdirs", "toy_clip"),
    "Where checkpoints and the run's config go.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None,
    "Where the trained model is exported (Hugging Face CLIP layout); default "
    "WORKDIR/export. The shipped checkpoints/toy_clip/ only with "
    "--export_to_checkpoints.")
_EXPORT_TO_CHECKPOINTS = flags.DEFINE_boolean(
    "export_to_checkpoints", False,
    "Export to the shipped checkpoints/toy_clip/ (replacing the embedded "
    "default model) instead of --export_dir.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None,
    "Stop once this many steps are done and checkpointed, without evaluating "
    "or exporting, as if killed there (for tests and demos of resuming).")

# Config fields that do not change the trained weights: a workdir may be
# resumed with other values of these.
_NON_TRAINING_FIELDS = ("eval", "log_every", "checkpoint_every",
                        "keep_checkpoints")

Log = Callable[[str], None]


def _stderr(line: str) -> None:
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


# ---------------------------------------------------------------------------
# The model, the tokenizer and the workdir


def make_tokenizer(config: config_dict.ConfigDict):
  return toy_clip.build_tokenizer(toy_world.vocabulary(),
                                  config.model.text.context_length)


def clip_config(config: config_dict.ConfigDict, vocab_size: int) -> CLIPConfig:
  """The CLIPConfig of `config.model`, with the tokenizer's vocabulary."""
  m = config.model
  return CLIPConfig(
      embed_dim=m.embed_dim,
      vision=VisionConfig(architecture="vit", **m.vision.to_dict()),
      text=TextConfig(vocab_size=vocab_size, eos_token_id=toy_clip.EOT_ID,
                      pooling="eos", **m.text.to_dict()))


def training_fields(config: config_dict.ConfigDict) -> dict[str, Any]:
  """The config as JSON values, without the fields that leave weights alone."""
  d = json.loads(config.to_json())
  return {k: v for k, v in d.items() if k not in _NON_TRAINING_FIELDS}


def check_workdir(workdir: str, config: config_dict.ConfigDict) -> None:
  """Records the training config in a new workdir; refuses one started with
  another (fields that leave the weights alone may change)."""
  common.check_workdir_config(workdir, training_fields(config), "a training run")


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=True))


# ---------------------------------------------------------------------------
# Training


def make_batch(tokenizer, seed: int, step: int, batch_size: int,
               template_fraction: float = 0.0) -> toy_clip.Batch:
  """Training batch `step` of run `seed` (a pure function of both)."""
  images, texts, labels, attributes = toy_world.sample_batch((seed, step),
                                                             batch_size)
  if template_fraction:
    texts = toy_clip.with_template_captions(
        np.random.default_rng((seed, step, 1)), texts, labels, attributes,
        template_fraction)
  return toy_clip.Batch(images, toy_clip.tokenize(tokenizer, texts),
                        toy_clip.unique_ids(texts))


def train(config: config_dict.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None, log: Log = _stderr
          ) -> dict[str, Any]:
  """Trains (or resumes) to `config.num_steps` steps or `stop_at_step`.

  Returns:
    {'model', 'params', 'tokenizer', 'step' (steps done), 'resumed_from'
    (the step restored, or None), 'train_seconds' (over every session of
    this workdir), 'final_metrics' (mean of the last logging window)}.
  """
  check_workdir(workdir, config)
  tokenizer = make_tokenizer(config)
  model = ClipModel(clip_config(config, tokenizer.get_vocab_size()))
  spec = preprocessing.PreprocessSpec(image_size=model.image_size,
                                      resize_size=model.image_size)
  optimizer = toy_clip.make_optimizer(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
      total_steps=config.num_steps, end_learning_rate=config.end_learning_rate,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm)
  init_key, noise_key = jax.random.split(jax.random.key(config.seed))
  state = toy_clip.init_train_state(model, optimizer, init_key)

  manager = _checkpoint_manager(workdir, config.keep_checkpoints)
  resumed_from, train_seconds = manager.latest_step(), 0.0
  final_metrics = {}
  if resumed_from is not None:
    restored = manager.restore(resumed_from, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(
            ocp.utils.to_shape_dtype_struct, state)),
        meta=ocp.args.JsonRestore()))
    state, train_seconds = restored.state, restored.meta["train_seconds"]
    # Checkpoints before this field existed lack it.
    final_metrics = restored.meta.get("final_metrics", {})
    log(f"resumed from the checkpoint at step {resumed_from} in {workdir}")

  step_fn = jax.jit(
      functools.partial(toy_clip.train_step, model, optimizer, spec,
                        tuple(config.noise_sigmas)), donate_argnums=0)
  end = config.num_steps if stop_at_step is None else min(stop_at_step,
                                                          config.num_steps)
  start = int(state.step)
  progress = common.Progress(config.num_steps, "steps", stream=_LogStream(log),
                             already_done=start)
  history, session_start = [], time.perf_counter()

  def save(step: int) -> None:
    elapsed = train_seconds + time.perf_counter() - session_start
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"train_seconds": elapsed,
                                "final_metrics": final_metrics})))

  for step in range(start, end):
    batch = make_batch(tokenizer, config.seed, step, config.batch_size,
                       config.template_caption_fraction)
    # Device work is dispatched asynchronously: the next batch is drawn on
    # the host while this step runs; metrics are fetched once per window.
    state, metrics = step_fn(state, batch, jax.random.fold_in(noise_key, step))
    history.append(metrics)
    done = step + 1
    if done % config.log_every == 0 or done == end:
      final_metrics = toy_clip.summarize_metrics(jax.device_get(history))
      progress.update(len(history), note=_format_metrics(final_metrics))
      history = []
    if done % config.checkpoint_every == 0 or done == end:
      save(done)
  manager.wait_until_finished()
  train_seconds += time.perf_counter() - session_start
  manager.close()
  return {"model": model, "params": state.params, "tokenizer": tokenizer,
          "step": int(state.step), "resumed_from": resumed_from,
          "train_seconds": train_seconds, "final_metrics": final_metrics}


class _LogStream:
  """A write()-able stream for common.Progress that sends lines to `log`."""

  def __init__(self, log: Log):
    self._log = log

  def write(self, text: str) -> None:
    for line in text.splitlines():
      self._log(line)

  def flush(self) -> None:
    pass


def _format_metrics(m: Mapping[str, float]) -> str:
  return (f"loss {m['loss']:.4f}  i2t acc {m['image_to_text_accuracy']:.3f}  "
          f"logit scale {m['logit_scale']:.1f}")


# ---------------------------------------------------------------------------
# Evaluation on the held-out toy test split


def load_test_split(spec: preprocessing.PreprocessSpec
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(CLIP-normalised images [N, S, S, 3], labels [N], metadata.npz arrays)."""
  ds = datasets.load_dataset("toy")
  images = ds.images.astype(np.float32) / 255.0
  normalised = np.asarray(jax.jit(preprocessing.preprocess, static_argnums=1)(
      images, spec))
  with np.load(os.path.join(datasets.DEFAULT_ROOTS["toy"], "metadata.npz")) as m:
    metadata = {k: m[k] for k in m.files}
  if not np.array_equal(metadata["label"], ds.labels):
    raise ConfigError("the toy test split's metadata.npz does not match its "
                      "labels; regenerate checkpoints/toy_world/")
  return normalised, ds.labels, metadata


def evaluate(model: ClipModel, params: Any, tokenizer,
             eval_config: config_dict.ConfigDict, log: Log = _stderr
             ) -> dict[str, Any]:
  """Zero-shot and smoothed-classifier metrics on the toy test split."""
  spec = preprocessing.PreprocessSpec(image_size=model.image_size,
                                      resize_size=model.image_size)
  images, labels, metadata = load_test_split(spec)
  class_names = toy_world.TOY_CLASSES
  embed = jax.jit(model.embed_images)
  z = zeroshot.embed_in_batches(functools.partial(embed, params), images,
                                eval_config.batch_size)
  templates = list(toy_world.TOY_TEMPLATES)
  if eval_config.template not in templates:
    templates.append(eval_config.template)
  class_embeddings = zeroshot.stack_prompts(
      toy_clip.text_tower(model, params, tokenizer), templates, class_names)
  predictions = _predict(z, class_embeddings)  # [N, T]
  correct = predictions == labels[:, None]
  main = templates.index(eval_config.template)
  matches = captions_lib.template_matches(metadata)
  per_template = {}
  for t, template in enumerate(toy_world.TOY_TEMPLATES):
    true_of = matches[:, t]
    per_template[template] = {
        "accuracy": float(correct[:, t].mean()),
        "num_correct": int(correct[:, t].sum()),
        # On the images the template describes truthfully.
        "accuracy_where_true": float(correct[true_of, t].mean()),
        "num_where_true": int(true_of.sum()),
    }
  metrics = {
      "test_split": "toy (checkpoints/toy_world, 1000 images)",
      "template": eval_config.template,
      "zero_shot_accuracy": float(correct[:, main].mean()),
      "zero_shot_num_correct": int(correct[:, main].sum()),
      "num_images": int(len(labels)),
      "per_template": per_template,
      "template_ensemble_accuracy": float(np.mean(_predict(
          z, zeroshot.ensemble(class_embeddings[:len(toy_world.TOY_TEMPLATES)]))
                                                  == labels)),
      "per_style": toy_clip.group_accuracies(
          correct[:, main], metadata["style"], metadata["style_names"]),
      "per_class": toy_clip.group_accuracies(
          correct[:, main], labels, class_names),
  }
  log(f"zero-shot accuracy ({eval_config.template!r}): "
      f"{metrics['zero_shot_accuracy']:.3f} "
      f"({metrics['zero_shot_num_correct']}/{len(labels)})")
  if eval_config.certify:
    indices = np.arange(0, len(labels), eval_config.cert_every)
    certified = {}
    for sigma in eval_config.cert_sigmas:
      t0 = time.perf_counter()
      smoothing = certificates.SmoothingParams(
          sigma=sigma, n0=eval_config.cert_n0, n=eval_config.cert_n,
          alpha=eval_config.cert_alpha, batch_size=eval_config.cert_batch_size)
      result = toy_clip.certified_accuracy_at_zero(
          model, params, class_embeddings[main], images[indices],
          labels[indices], smoothing, seed=eval_config.cert_seed,
          indices=indices)
      result["seconds"] = time.perf_counter() - t0
      certified[f"{sigma:g}"] = result
      log(f"sigma {sigma:g}: certified accuracy at radius 0 "
          f"{result['certified_accuracy']:.3f} on {result['count']} images "
          f"({result['seconds']:.0f} s)")
    metrics["certified_at_radius_0"] = {
        "how": ("Cohen et al.'s CERTIFY (ovc_jax.certifiers.standard) on "
                f"every {eval_config.cert_every}th test image, n0 = "
                f"{eval_config.cert_n0}, n = {eval_config.cert_n}, alpha = "
                f"{eval_config.cert_alpha}, one-sided Clopper-Pearson; noise "
                "in CLIP-normalised space; template "
                f"{eval_config.template!r}; noise keys "
                f"sampler.input_key({eval_config.cert_seed}, index); an image "
                "counts when its certificate is its true class"),
        "by_sigma": certified,
    }
  return metrics


def _predict(image_embeddings: jax.Array, class_embeddings: jax.Array
             ) -> np.ndarray:
  """Zero-shot predictions on the host: int `[N]` (class matrix `[C, d]`) or
  `[N, T]` (`[T, C, d]`)."""
  return np.asarray(classifiers.predict_from_embeddings(image_embeddings,
                                                        class_embeddings))


# ---------------------------------------------------------------------------
# Export


def machine_description() -> dict[str, Any]:
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "devices": [str(d.device_kind) for d in jax.devices()],
      "python": platform.python_version(),
  }


def export(directory: str, model: ClipModel, params: Any, tokenizer,
           record: Mapping[str, Any]) -> None:
  """Writes the model in the Hugging Face CLIP layout, plus the record.

  `save_hf_checkpoint` writes the weights, config.json and
  preprocessor_config.json; config.json is then rewritten with the word-level
  tokenizer's <sot> and <pad> ids (the exporter knows only CLIP's BPE
  names), and the tokenizer files are written beside it.
  """
  spec = preprocessing.PreprocessSpec(image_size=model.image_size,
                                      resize_size=model.image_size)
  save_hf_checkpoint((model, jax.device_get(params)), directory,
                     preprocess=spec)
  common.write_json(os.path.join(directory, "config.json"), config_to_hf(
      model.config, bos_token_id=toy_clip.SOT_ID,
      pad_token_id=toy_clip.PAD_ID))
  for name, text in toy_clip.tokenizer_files(tokenizer).items():
    common.atomic_write_text(os.path.join(directory, name), text)
  common.write_json(os.path.join(directory, RECORD_NAME), record)


def image_encoder_flops(model: ClipModel, params: Any) -> float:
  """XLA's FLOP count of the jitted image encoder, per image."""
  batch = 100
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3),
                                jnp.float32)
  cost = jax.jit(model.embed_images).lower(params, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / batch


def run(config: config_dict.ConfigDict, workdir: str, export_dir: str, *,
        stop_at_step: int | None = None, command: str = "",
        log: Log = _stderr) -> dict[str, Any] | None:
  """Trains (resuming if it can), then evaluates and exports.

  Returns the record written to `export_dir/TRAINING.json`, or None when
  stopped early at `stop_at_step`. The workdir is locked for the whole run:
  a second run on it stops at once.
  """
  validate(config)
  common.check_workdir_path(workdir)
  common.check_workdir_path(export_dir, "--export_dir")
  shipped.check_workdir(workdir)
  with common.workdir_lock(workdir):
    return _run_locked(config, workdir, export_dir, stop_at_step=stop_at_step,
                       command=command, log=log)


def validate(config: config_dict.ConfigDict) -> None:
  """The config's lists (the library checks the rest when it builds things)."""
  common.check_number_list(config.noise_sigmas, "noise_sigmas",
                           allow_minimum=True)
  common.check_number_list(config.eval.cert_sigmas, "eval.cert_sigmas")
  for field in ("num_steps", "batch_size", "log_every", "checkpoint_every",
                "keep_checkpoints"):
    if config[field] < 1:
      raise ConfigError(f"--config.{field} must be >= 1; got {config[field]}")


def _run_locked(config, workdir, export_dir, *, stop_at_step, command, log):
  result = train(config, workdir, stop_at_step=stop_at_step, log=log)
  if result["step"] < config.num_steps:
    log(f"stopped at step {result['step']} of {config.num_steps}; run again "
        "with the same flags to resume")
    return None
  model, params = result["model"], result["params"]
  t0 = time.perf_counter()
  metrics = evaluate(model, params, result["tokenizer"], config.eval, log=log)
  eval_seconds = time.perf_counter() - t0
  num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  record = {
      "command": command,
      "seed": config.seed,
      "config": json.loads(config.to_json()),
      "clip_config": model.config.to_dict(),
      "num_params": num_params,
      "image_encoder_flops_per_image": image_encoder_flops(model, params),
      "tokenizer": {"type": "word level (tokenizers WordLevel)",
                    "vocab_size": result["tokenizer"].get_vocab_size(),
                    "special_tokens": dict(zip(toy_clip.SPECIAL_TOKENS,
                                               range(4)))},
      "train_steps": result["step"],
      "train_seconds": round(result["train_seconds"], 1),
      "eval_seconds": round(eval_seconds, 1),
      "machine": machine_description(),
      "final_train_metrics": result["final_metrics"],
      "metrics": metrics,
  }
  export(export_dir, model, params, result["tokenizer"], record)
  log(f"exported to {export_dir} (training {result['train_seconds']:.0f} s, "
      f"evaluation {eval_seconds:.0f} s)")
  return record


@common.exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  command = " ".join(["python -m experiments.train_toy_clip"] + sys.argv[1:])
  run(_CONFIG.value, _WORKDIR.value,
      shipped.toy_clip_export_dir(
          _WORKDIR.value, _EXPORT_DIR.value,
          export_to_checkpoints=_EXPORT_TO_CHECKPOINTS.value),
      stop_at_step=_STOP_AT_STEP.value, command=command)


if __name__ == "__main__":
  common.run_app(main)
