r"""Clean and PGD-robust accuracy of CLIP zero-shot and of CLIPure-Cos.

  python -m experiments.attack                       # embedded default, no flags
  python -m experiments.attack --config=experiments/configs/attack.py:cifar10,vit_b32,strong \
      --workdir=/tmp/attack_cifar10

On the configured test images, zero-shot classifiers with one prompt:
  CLIP         argmax_c cos(z(x), U_c)
  CLIPure-Cos  the same on the purified embedding (`ovc_jax.clipure`)
each clean and under untargeted PGD (`ovc_jax.attacks`) in L-inf and L2, in
[0, 1] pixel space before preprocessing, differentiating through the
purification (a white-box attack on CLIPure-Cos as a whole). An image is
robust only if it is classified correctly clean and at every step of every
restart. `--config.clipure.attack_gradients` adds CLIPure-Cos columns whose
attack takes another gradient through the purification (official: each
step's direction detached, as the official code; bpda: the identity on the
backward pass), and `--config.clipure.batch_equivalents` columns at the
per-image step size / sqrt(B) of the official code's batches; the variant
`masking` asks for all of them (13 classifiers, same PGD in every cell).

Writes WORKDIR/results.tsv (one row per image: 1/0 per model and attack, and
the attacks' margins), WORKDIR/summary.json and WORKDIR/accuracy.png, and
prints the table. Killed and restarted with the same flags, it resumes and
finishes with the same rows (each image's random starts are keyed by its
dataset index, so the rows do not depend on the batching either); a second
run on a workdir in use stops at once (the workdir is locked). `--help` lists
the config's variants and fields.

Default (toy CLIP, toy test split): 500 images (every 2nd), PGD with 20 steps
and 2 restarts, L-inf eps 4/255 (step 1/255) and L2 eps 0.5 (step 0.1) in
[0, 1] pixel units; CLIPure-Cos with the official 10 steps of size 30.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import common
from experiments.common import certify_job
from experiments.configs import attack as attack_configs
from ovc_jax import attacks
from ovc_jax import clipure
from ovc_jax import datasets
from ovc_jax import preprocessing
from ovc_jax import prompts as prompt_lists
from ovc_jax import sampler
from ovc_jax import zeroshot
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import ConfigError, DataError, InputError

_FLAGS = {}


def define_flags() -> None:
  """Defined only when this module is the program (tests import several
  entry points into one process)."""
  _FLAGS["config"] = common.define_config_flag(attack_configs)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", os.path.join("workdirs", "attack"),
      "Where results and the run's config go.")


NORMS = attacks.NORMS
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}


@dataclasses.dataclass(frozen=True)
class Model:
  """One attacked classifier: plain CLIP, or CLIPure-Cos with a step size
  (the official one, or the per-image step of batch `batch_equivalent`) and
  the gradient PGD takes through its purification."""
  key: str
  name: str
  step_size: float | None = None  # None: plain CLIP
  batch_equivalent: int | None = None
  attack_gradient: str = "full"


def parse_gradients(value: Any) -> tuple[str, ...]:
  """`clipure.attack_gradients` as names: a comma list (or a tuple of them)."""
  parts = [value] if isinstance(value, str) else list(value)
  names = [n.strip() for p in parts for n in str(p).split(",") if n.strip()]
  if not names:
    raise ConfigError("--config.clipure.attack_gradients is empty; give one or "
                      f"more of {', '.join(clipure.ATTACK_GRADIENTS)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"--config.clipure.attack_gradients names one twice: "
                      f"{','.join(names)}")
  return tuple(names)


def models_of(config) -> tuple[Model, ...]:
  """CLIP, then CLIPure-Cos for each step size and attack gradient. The
  official step size with the full gradient keeps the key `clipure`."""
  gradients = parse_gradients(config.clipure.attack_gradients)
  batches = common.check_number_list(
      config.clipure.batch_equivalents, "clipure.batch_equivalents",
      minimum=1, allow_minimum=True, integer=True, allow_empty=True)
  step = float(config.clipure.step_size)
  models = [Model("clip", "CLIP")]
  for b in (None,) + tuple(int(b) for b in batches):
    size = step if b is None else step / float(np.sqrt(b))
    for g in gradients:
      key = "clipure" + ("" if b is None else f"_b{b}") + (
          "" if g == "full" else f"_{g}")
      where = f"step {size:.4g}" + ("" if b is None else f" (B={b})")
      models.append(Model(key, f"CLIPure-Cos {where}, {g} gradient", size, b, g))
  return tuple(models)


def columns_of(models) -> tuple[str, ...]:
  return (("idx", "label")
          + tuple(f"{m.key}_{a}" for m in models for a in ("clean",) + NORMS)
          + tuple(f"{m.key}_{a}_margin" for m in models for a in NORMS))


def header_of(models) -> str:
  return "\t".join(columns_of(models)) + "\n"


MODEL_NOTE = ("the project's toy-world CLIP, trained offline on procedurally "
              "generated shapes: a demo model, not a real CLIP")


def validate(config) -> None:
  """Every check on the config that can fail, before anything is loaded."""
  for norm in NORMS:
    c = config[norm]
    attacks.check_attack_args(norm=norm, eps=c.eps, steps=config.steps,
                              step_size=c.step_size, restarts=config.restarts,
                              logit_scale=config.logit_scale)
  clipure.check_purification_args(steps=config.clipure.steps,
                                  step_size=config.clipure.step_size)
  for g in parse_gradients(config.clipure.attack_gradients):
    clipure.check_attack_gradient(
        g, purifies=(not isinstance(config.clipure.steps, bool)
                     and config.clipure.steps > 0))
  models_of(config)  # the batch equivalents
  n = config.clipure.gradient_path_images
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ConfigError("clipure.gradient_path_images must be an integer >= 0; "
                      f"got {n!r}")
  if config.clipure.blank not in ("templates", "single"):
    raise ConfigError("clipure.blank must be 'templates' or 'single'; got "
                      f"{config.clipure.blank!r}")
  if isinstance(config.batch_size, bool) or config.batch_size < 1:
    raise ConfigError(f"batch_size must be an integer >= 1; got {config.batch_size}")
  if config.skip < 1:
    raise ConfigError(f"skip must be >= 1; got {config.skip}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype must be float32 or bfloat16; got {config.dtype!r}")


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  loaded: Any
  dataset: Any
  indices: list[int]
  prompt: str
  class_embeddings: Any
  blank_texts: list[str]
  models: tuple[Model, ...]
  classifiers: dict[str, EmbeddingClassifier]
  params: dict[str, Any]


def build_setup(config, workdir: str) -> Setup:
  """Loads the model, data, prompt and blank; raises OVCError for bad input."""
  validate(config)
  loaded, dataset, class_names = certify_job.load_model_and_data(config)
  indices = datasets.subsample_indices(len(dataset), config.skip, config.max)
  if not indices:
    raise ConfigError("no inputs selected: check skip and max")
  prompt = config.prompt or prompt_lists.templates_for(config.dataset)[0]
  class_embeddings = zeroshot.class_embeddings(loaded, prompt, class_names)
  if config.clipure.blank == "single":
    blank_texts = [clipure.SINGLE_BLANK_TEMPLATE]
  else:
    blank_texts = (prompt_lists.load_templates(config.blank_templates)
                   if config.blank_templates
                   else prompt_lists.templates_for(config.dataset))
  blank = clipure.blank_embedding(loaded, blank_texts)
  encoder = loaded.model.embed_images
  models = models_of(config)
  classifiers, params = {}, {}
  for m in models:
    if m.step_size is None:
      classifiers[m.key] = EmbeddingClassifier(encoder,
                                               preprocess=loaded.preprocess)
      params[m.key] = loaded.params
    else:
      classifiers[m.key] = EmbeddingClassifier(
          clipure.PurifiedEncoder(encoder, steps=config.clipure.steps,
                                  step_size=m.step_size,
                                  attack_gradient=m.attack_gradient),
          preprocess=loaded.preprocess)
      params[m.key] = clipure.purified_encoder_params(loaded.params, blank)
  return Setup(config, workdir, loaded, dataset, indices, prompt,
               class_embeddings, [t.format("") for t in blank_texts],
               models, classifiers, params)


def load_batch(setup: Setup, batch: list[int]):
  """Images [batch_size, H, W, 3] and labels, the last image repeated as
  padding so that every batch has one shape (one compilation)."""
  images = [preprocessing.check_images(setup.dataset[i][0], name="test image")[0]
            for i in batch]
  if len({im.shape for im in images}) != 1:
    raise InputError("the attacked images differ in size; use a dataset whose "
                     "images share one size")
  pad = setup.config.batch_size - len(batch)
  labels = [int(setup.dataset.labels[i]) for i in batch]
  if min(labels) < 0:
    raise DataError(f"dataset {setup.config.dataset} has unlabelled images")
  images += [images[-1]] * pad
  labels += [labels[-1]] * pad
  keys = jax.vmap(lambda i: sampler.input_key(setup.config.seed, i))(
      np.asarray(list(batch) + [batch[-1]] * pad))
  return np.stack(images), np.asarray(labels, np.int32), keys


def attack_batch(setup: Setup, batch: list[int]) -> list[str]:
  """The result rows (TSV lines) of a batch of dataset indices."""
  c = setup.config
  images, labels, keys = load_batch(setup, batch)
  values = {}
  for m in (m.key for m in setup.models):
    clf, params = setup.classifiers[m], setup.params[m]
    clean = np.asarray(attacks.predict_correct(
        clf, params, images, labels, setup.class_embeddings))
    values[f"{m}_clean"] = clean
    for norm in NORMS:
      result = attacks.pgd_attack(
          clf, params, images, labels, setup.class_embeddings, keys,
          norm=norm, eps=float(c[norm].eps), steps=c.steps,
          step_size=float(c[norm].step_size), restarts=c.restarts,
          logit_scale=float(c.logit_scale))
      # The attack starts from the clean image too, so robust implies clean;
      # the AND keeps that exact against the separate clean pass's rounding.
      values[f"{m}_{norm}"] = np.asarray(result.correct) & clean
      values[f"{m}_{norm}_margin"] = np.asarray(result.margin)
  rows = []
  for j, idx in enumerate(batch):
    fields = [str(idx), str(int(labels[j]))]
    for name in columns_of(setup.models)[2:]:
      v = values[name][j]
      fields.append(repr(float(v)) if name.endswith("_margin") else str(int(v)))
    rows.append("\t".join(fields) + "\n")
  return rows


def _cosine_and_ratio(a: np.ndarray, b: np.ndarray):
  """Per row: cos(a_i, b_i) and ||a_i|| / ||b_i|| (rows flattened)."""
  a = a.reshape(len(a), -1).astype(np.float64)
  b = b.reshape(len(b), -1).astype(np.float64)
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300), na / nb


def _stats(v: np.ndarray) -> dict[str, float]:
  return {"median": float(np.median(v)), "min": float(np.min(v)),
          "max": float(np.max(v))}


def gradient_path(setup: Setup, images: np.ndarray,
                  labels: np.ndarray) -> dict[str, Any]:
  """The official gradient against the full one, and where purification
  puts the embeddings, on a few images (the official step size).

  Gradients of the attack's loss (cross-entropy at the configured logit
  scale): w.r.t. the image in float32, as PGD sees them; and w.r.t. the
  image embedding z in float32 and float64 (purification and head only, the
  part the closed form in docs/CLIPURE.md covers).
  """
  c = setup.config
  step = float(c.clipure.step_size)
  ce = lambda logits: -jnp.sum(jnp.take_along_axis(
      jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1))
  out = {"images": int(len(images)), "step_size": step,
         "steps": int(c.clipure.steps)}
  # Every CLIPure-Cos column has the same params (encoder and blank).
  purified_params = next(setup.params[m.key] for m in setup.models
                         if m.step_size is not None)
  pixel = {}
  for g in ("full", "official"):
    clf = EmbeddingClassifier(
        clipure.PurifiedEncoder(setup.loaded.model.embed_images,
                                steps=c.clipure.steps, step_size=step,
                                attack_gradient=g),
        preprocess=setup.loaded.preprocess)
    # Compiled whole: run op by op, the many small ops each compile alone.
    pixel[g] = np.asarray(jax.jit(jax.grad(lambda x: ce(
        c.logit_scale * clf.embed(purified_params, x)
        @ setup.class_embeddings.T)))(jnp.asarray(images)))
  cos, ratio = _cosine_and_ratio(pixel["official"], pixel["full"])
  out["image_float32"] = {"cosine": _stats(cos), "norm_ratio": _stats(ratio)}
  plain = EmbeddingClassifier(setup.loaded.model.embed_images, normalize=False,
                              preprocess=setup.loaded.preprocess)
  z = np.asarray(jax.jit(plain.embed)(setup.loaded.params, jnp.asarray(images)))
  blank = np.asarray(purified_params["blank"])
  u = np.asarray(setup.class_embeddings)
  for dtype, x64 in (("float32", False), ("float64", True)):
    with jax.enable_x64(x64):
      zz, bb, uu = (jnp.asarray(a, dtype) for a in (z, blank, u))
      grads = {g: np.asarray(jax.jit(jax.grad(lambda v: ce(
          c.logit_scale * (lambda p: p / jnp.linalg.norm(
              p, axis=-1, keepdims=True))(clipure.purify(
                  v, bb, steps=c.clipure.steps, step_size=step,
                  gradient=g)) @ uu.T)))(zz)) for g in ("full", "official")}
    cos, ratio = _cosine_and_ratio(grads["official"], grads["full"])
    out[f"embedding_{dtype}"] = {"cosine": _stats(cos),
                                 "norm_ratio": _stats(ratio)}
  # Where the purified embeddings end up (float64): the angle theta from the
  # blank before, and the angle each embedding turned by.
  with jax.enable_x64(True):
    purified = np.asarray(jax.jit(lambda v, b: clipure.purify(
        v, b, steps=c.clipure.steps, step_size=step))(
            z.astype(np.float64), blank.astype(np.float64)))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  # 2 asin(|a - b| / 2): accurate for small angles too, unlike acos(a.b).
  angle = lambda a, b: np.degrees(2 * np.arcsin(np.clip(
      np.linalg.norm(unit(a) - unit(b), axis=-1) / 2, 0, 1)))
  z64, blank64 = z.astype(np.float64), blank.astype(np.float64)
  theta = angle(z64, blank64[None])
  turned = angle(z64, purified)
  theta_out = angle(purified, blank64[None])
  far = theta > np.degrees(np.arctan(step))
  out["geometry"] = {
      "turn_per_step_degrees": float(np.degrees(np.arctan(step))),
      "far_from_blank": int(far.sum()),
      "theta_degrees": _stats(theta),
      "turned_degrees_near": _stats(turned[~far]) if (~far).any() else None,
      "turned_degrees_far": _stats(turned[far]) if far.any() else None,
      "theta_out_plus_theta_far": (_stats(theta_out[far] + theta[far])
                                   if far.any() else None)}
  return out


def read_results(path: str, models) -> dict[str, np.ndarray]:
  columns = columns_of(models)
  with open(path) as f:
    lines = f.read().splitlines()
  if not lines or lines[0] != "\t".join(columns):
    raise DataError(f"{path} is not this experiment's results table")
  rows = [line.split("\t") for line in lines[1:] if line]
  return {name: np.array([float(r[j]) for r in rows])
          for j, name in enumerate(columns)}


def summarize(setup: Setup, columns: dict[str, np.ndarray]) -> dict[str, Any]:
  c = setup.config
  accuracy = {m.key: {a: float(np.mean(columns[f"{m.key}_{a}"]))
                      for a in ("clean",) + NORMS} for m in setup.models}
  return {
      "model": {"name": setup.loaded.name,
                "fingerprint": setup.loaded.fingerprint,
                "note": MODEL_NOTE if c.backbone == "toy"
                        else f"weights loaded from {c.backbone}"},
      "dataset": c.dataset,
      "images": int(len(columns["idx"])),
      "prompt": setup.prompt,
      "blank_texts": setup.blank_texts,
      "accuracy": accuracy,
      "models": {m.key: {"name": m.name, "purification_step_size": m.step_size,
                         "batch_equivalent": m.batch_equivalent,
                         "attack_gradient": (m.attack_gradient
                                             if m.step_size else None)}
                 for m in setup.models},
      "threat_models": {
          n: {"eps": float(c[n].eps), "step_size": float(c[n].step_size),
              "steps": c.steps, "restarts": c.restarts,
              "space": "[0, 1] pixels, before CLIP preprocessing"}
          for n in NORMS},
      "clipure": {"steps": c.clipure.steps, "step_size": c.clipure.step_size,
                  "gradient_normalisation": "per image (the official code "
                                            "normalises over the batch)"},
      "notes": {"robust": "correct clean and at every PGD iterate of every "
                          "restart (white-box, through the purification)",
                "attack_gradients": "full: exact, through each purification "
                                    "step's inner gradient; official: each "
                                    "step's direction detached, as the "
                                    "official code; bpda: purification as "
                                    "the identity on the backward pass (no "
                                    "randomness in it, so no EOT)"},
  }


def draw(summary: dict, path: str) -> None:
  keys = list(summary["models"])
  many = len(keys) > 2
  fig, ax = plt.subplots(figsize=(11.0, 5.0) if many else (6.4, 4.0), dpi=120)
  settings = ("clean",) + NORMS
  labels = {"clean": "clean", "linf": "PGD L-inf", "l2": "PGD L2"}
  width = 0.8 / len(keys)
  for k, m in enumerate(keys):
    acc = [summary["accuracy"][m][s] for s in settings]
    xs = np.arange(len(settings)) + (k - (len(keys) - 1) / 2) * width
    bars = ax.bar(xs, acc, width, label=summary["models"][m]["name"])
    for b, v in zip(bars, acc):
      ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}",
              ha="center", va="bottom", fontsize=5 if many else 8,
              rotation=90 if many else 0)
  tm = summary["threat_models"]
  ax.set_xticks(np.arange(len(settings)))
  ax.set_xticklabels([labels["clean"],
                      f"{labels['linf']}\neps={tm['linf']['eps']:.4g}",
                      f"{labels['l2']}\neps={tm['l2']['eps']:g}"])
  ax.set_ylim(0, 1.15 if many else 1.08)
  ax.set_ylabel("accuracy")
  name = summary["model"]["name"]
  name = "toy-world CLIP (demo model)" if name == "toy" else name
  ax.set_title(f"{name} on {summary['dataset']}, "
               f"{summary['images']} images")
  ax.legend(fontsize=6 if many else 8, ncol=2 if many else 1)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, path)


def run(config, workdir: str, stream=sys.stderr) -> tuple[Setup, dict]:
  """Attacks the configured images (resuming), then summarises the run.

  One process at a time: the workdir is locked for the whole run.
  """
  common.check_workdir_path(workdir)
  setup = build_setup(config, workdir)
  weights = {"fingerprint": setup.loaded.fingerprint}
  sha = getattr(setup.loaded, "weights_sha256", None)
  if sha:
    weights["sha256"] = sha
  with common.ResumableRun(workdir, config.to_dict(), weights=weights) as journal:
    return _run_locked(setup, journal, stream)


def _run_locked(setup: Setup, journal: common.ResumableRun,
                stream) -> tuple[Setup, dict]:
  config, workdir = setup.config, setup.workdir
  if config.backbone == "toy":
    stream.write(f"note: {MODEL_NOTE}\n")
  tsv = os.path.join(workdir, "results.tsv")
  header = header_of(setup.models)
  journal.prepare({tsv: header})
  todo = journal.remaining(setup.indices)
  start = time.perf_counter()
  if not todo:
    stream.write(
        f"note: nothing was recomputed: all {len(setup.indices)} images of "
        f"this configuration are done in {workdir} (done.txt); the results "
        "below are the stored ones. Pass another --workdir to compute again.\n")
  batches = [todo[b:b + config.batch_size]
             for b in range(0, len(todo), config.batch_size)]
  done = len(setup.indices) - len(todo)
  for k, batch in enumerate(batches):
    if k == 0:
      # Compiles one program per model and norm; timed apart from the rest.
      stream.write("compiling, on the first batch of images...\n")
      first = time.perf_counter()
    rows = attack_batch(setup, batch)
    for idx, row in zip(batch, rows):
      journal.commit(idx, {tsv: (header, row)})
    if k == 0:
      done += len(batch)
      stream.write(f"first batch ({len(batch)} images) done in "
                   f"{time.perf_counter() - first:.1f} s, compilation included\n")
      progress = common.Progress(len(setup.indices), "images", stream=stream,
                                 already_done=done,
                                 per="clean + PGD L-inf + PGD L2, "
                                     f"{len(setup.models)} models")
    else:
      progress.update(len(batch), note=f"images {batch[0]}..{batch[-1]}")
  columns = read_results(tsv, setup.models)
  if len(columns["idx"]) != len(setup.indices):
    raise DataError(f"{tsv} holds {len(columns['idx'])} rows for "
                    f"{len(setup.indices)} images")
  summary = summarize(setup, columns)
  if config.clipure.gradient_path_images and config.clipure.steps:
    chosen = setup.indices[:config.clipure.gradient_path_images]
    images, labels, _ = load_batch(setup, chosen)
    summary["gradient_path"] = gradient_path(
        setup, images[:len(chosen)], labels[:len(chosen)])
  summary["config"] = config.to_dict()
  summary["seconds_this_run"] = time.perf_counter() - start
  summary["table"] = os.path.join(workdir, "results.tsv")
  summary["figure"] = os.path.join(workdir, "accuracy.png")
  draw(summary, summary["figure"])
  common.write_json(os.path.join(workdir, "summary.json"), summary)
  return setup, summary


def print_report(setup: Setup, summary: dict, stream=sys.stdout) -> None:
  c = setup.config
  w = stream.write
  tm = summary["threat_models"]
  w(f"\nmodel: {summary['model']['name']} ({summary['model']['note']})\n")
  w(f"dataset: {c.dataset}, {summary['images']} images, prompt "
    f"{setup.prompt!r}; PGD {c.steps} steps x {c.restarts} restarts, "
    f"logit scale {c.logit_scale:g}, pixel space [0, 1]\n")
  w(f"CLIPure-Cos: {c.clipure.steps} steps of size {c.clipure.step_size:g}, "
    f"blank = mean of {len(setup.blank_texts)} blank prompt(s) "
    f"({setup.blank_texts[0]!r}{', ...' if len(setup.blank_texts) > 1 else ''})\n\n")
  heads = ("clean", f"L-inf {tm['linf']['eps']:.4g} (4/255)"
           if abs(tm["linf"]["eps"] - 4 / 255) < 1e-12
           else f"L-inf {tm['linf']['eps']:.4g}", f"L2 {tm['l2']['eps']:g}")
  width = max(14, max(len(m.name) for m in setup.models) + 2)
  w(f"{'classifier':{width}}" + "".join(f"{h:>22}" for h in heads) + "\n")
  for m in setup.models:
    acc = summary["accuracy"][m.key]
    w(f"{m.name:{width}}"
      + "".join(f"{acc[a]:22.3f}" for a in ("clean",) + NORMS) + "\n")
  path = summary.get("gradient_path")
  if path:
    w(f"\ngradient path, official against full (step size "
      f"{path['step_size']:g}, {path['images']} images; median [min, max]):\n")
    for k in ("image_float32", "embedding_float32", "embedding_float64"):
      cos, ratio = path[k]["cosine"], path[k]["norm_ratio"]
      w(f"  {k:18} cosine {cos['median']:.3g} [{cos['min']:.3g}, "
        f"{cos['max']:.3g}]  norm ratio {ratio['median']:.3g} "
        f"[{ratio['min']:.3g}, {ratio['max']:.3g}]\n")
    geo = path["geometry"]
    w(f"  geometry: {geo['far_from_blank']} of {path['images']} embeddings "
      f"more than {geo['turn_per_step_degrees']:.1f} degrees from the blank; "
      f"turned by {geo['turned_degrees_far']} (far) and "
      f"{geo['turned_degrees_near']} (near) degrees\n")
  w(f"\nresults: {summary['table']}, {setup.workdir}/summary.json and "
    f"{summary['figure']}\n")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup, summary = run(_FLAGS["config"].value, _FLAGS["workdir"].value)
  print_report(setup, summary)


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
