r"""Fourier heat map of errors of a CLIP classifier (Yin et al. 2019).

  python -m experiments.fourier_heatmap                       # embedded default: toy CLIP, zero-shot
  python -m experiments.fourier_heatmap --config=experiments/configs/fourier_heatmap.py:smoothed
  python -m experiments.fourier_heatmap --config=experiments/configs/fourier_heatmap.py:cifar10,vit_b32 \
      --workdir=/tmp/fhmap_cifar10_vit_b32

For every frequency of the map, every selected test image X is perturbed to
clip(X + r v U_kl, 0, 1) (r = +-1 per image and channel, in [0, 1] pixel space
before CLIP's preprocessing) and the classifier's error rate is recorded; see
`ovc_jax.fourier` for every convention. Classifiers: the zero-shot CLIP
classifier, CLIPure-Cos, or Cohen et al.'s PREDICT around the zero-shot
classifier (abstentions are errors, and get a map of their own).

Writes WORKDIR/frequencies.tsv (one row per frequency, and one for the clean
images), WORKDIR/error_map.{npy,csv,png} (the centred map, row ky = -K..K,
column kx = -K..K), WORKDIR/error_half_plane.npy (the (H, W//2+1) matrix),
for the smoothed classifier the same for abstention_*, and
WORKDIR/summary.json. Killed and restarted with the same flags, it resumes:
every frequency's row is written exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import common
from experiments.common import certify_job
from experiments.configs import fourier_heatmap as fh_config
from ovc_jax import datasets
from ovc_jax import fourier
from ovc_jax import prompts as prompt_lists
from ovc_jax.errors import ConfigError, DataError

_FLAGS = {}


def define_flags() -> None:
  """Defined only when this module is the program."""
  _FLAGS["config"] = common.define_config_flag(fh_config)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", "", "Where the rows, maps and figures go (default: "
      "workdirs/fourier_heatmap/DATASET-BACKBONE-CLASSIFIER).")


MODEL_NOTE = ("the project's toy-world CLIP, trained offline on procedurally "
              "generated shapes: a demo model, not a real CLIP")
TSV_COLUMNS = ("idx", "kind", "k", "l", "ky", "kx", "images", "errors",
               "abstentions", "error_rate", "abstention_rate", "seconds")
HEADER = "\t".join(TSV_COLUMNS) + "\n"


def num_images(config) -> int:
  return (fh_config.DEFAULT_NUM_IMAGES[config.classifier]
          if config.num_images == -1 else int(config.num_images))


def batch_size(config) -> int:
  return (fh_config.DEFAULT_BATCH_SIZE[config.classifier]
          if config.batch_size == -1 else int(config.batch_size))


def validate(config) -> None:
  """Every check on the config that needs no file, before anything loads."""
  if config.classifier not in fh_config.CLASSIFIERS:
    raise ConfigError(f"classifier must be one of {fh_config.CLASSIFIERS}; got "
                      f"{config.classifier!r}")
  fourier.check_v(config.v)
  if config.num_images != -1 and (not isinstance(config.num_images, int)
                                  or config.num_images < 1):
    raise ConfigError(f"num_images must be >= 1 (or -1: the classifier's "
                      f"default); got {config.num_images}")
  if config.batch_size != -1:
    fourier.check_batch_size(config.batch_size)
  if config.max_frequency != -1 and config.max_frequency < 1:
    raise ConfigError(f"max_frequency must be >= 1 (or -1: the default); got "
                      f"{config.max_frequency}")
  if config.classifier == "smoothed":
    s = config.smoothing
    fourier.check_smoothing(sigma=s.sigma, n=s.n, alpha=s.alpha,
                            batch_size=s.batch_size)
  if config.classifier == "clipure":
    if config.clipure.blank not in ("templates", "single"):
      raise ConfigError("clipure.blank must be 'templates' or 'single'; got "
                        f"{config.clipure.blank!r}")
    clipure = fourier.clipure_module()
    clipure.check_purification_args(steps=config.clipure.steps,
                                    step_size=config.clipure.step_size)
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype must be float32 or bfloat16; got {config.dtype!r}")


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[-40:] or "model"


def default_workdir(config) -> str:
  return os.path.join("workdirs", "fourier_heatmap",
                      f"{config.dataset}-{slug(config.backbone)}-"
                      f"{config.classifier}")


def describe_classifier(config) -> str:
  """The classifier in words, for titles and the report."""
  if config.classifier == "zeroshot":
    return "zero-shot"
  if config.classifier == "clipure":
    return (f"CLIPure-Cos ({config.clipure.steps} steps, step size "
            f"{config.clipure.step_size:g})")
  s = config.smoothing
  return (f"smoothed zero-shot, PREDICT with sigma={s.sigma:g} (pixel space), "
          f"n={s.n}, alpha={s.alpha:g}")


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  loaded: Any
  classifier: Any
  params: Any
  images: np.ndarray      # float32 [N, H, W, 3] in [0, 1]
  labels: np.ndarray      # int64 [N]
  indices: list[int]      # dataset indices (folded into the keys)
  max_frequency: int
  description: str


def select_indices(size: int, count: int) -> list[int]:
  """`count` evenly spaced dataset indices: every (size // count)-th from 0."""
  if count > size:
    raise ConfigError(f"num_images = {count} but the dataset has {size} images")
  return list(range(0, (size // count) * count, size // count))


def load_images(dataset, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(dataset, datasets.ArrayDataset):
    images = dataset.images[indices].astype(np.float32) / 255.0
    return images, np.asarray(dataset.labels)[indices].astype(np.int64)
  items = [dataset[i] for i in indices]
  shapes = {img.shape for img, _ in items}
  if len(shapes) != 1:
    raise DataError(f"a Fourier heat map needs images of one size; the "
                    f"selected images have sizes {sorted(shapes)[:3]}")
  return (np.stack([img for img, _ in items]).astype(np.float32),
          np.array([lab for _, lab in items], np.int64))


def build_setup(config, workdir: str) -> Setup:
  """Loads the model, data, prompt and classifier; raises OVCError for bad input."""
  validate(config)
  loaded, dataset, class_names = certify_job.load_model_and_data(config)
  indices = select_indices(len(dataset), num_images(config))
  images, labels = load_images(dataset, indices)
  height, width = fourier.check_image_size(images.shape[1], images.shape[2])
  kmax = fourier.check_max_frequency(
      None if config.max_frequency == -1 else int(config.max_frequency),
      height, width)
  prompt_lists.validate_templates([config.prompt])
  if config.classifier == "clipure":
    clipure = fourier.clipure_module()
    blank_texts = ([clipure.SINGLE_BLANK_TEMPLATE]
                   if config.clipure.blank == "single" else
                   prompt_lists.load_templates(config.blank_templates)
                   if config.blank_templates else
                   prompt_lists.templates_for(config.dataset))
    classifier, params = fourier.clipure_classifier(
        loaded, config.prompt, class_names, blank_texts,
        steps=config.clipure.steps, step_size=config.clipure.step_size)
  else:
    classifier, params = fourier.zeroshot_classifier(loaded, config.prompt,
                                                     class_names)
    if config.classifier == "smoothed":
      s = config.smoothing
      classifier, params = fourier.smoothed_classifier(
          classifier, params, num_classes=len(class_names), sigma=s.sigma,
          n=s.n, alpha=s.alpha, batch_size=s.batch_size)
  return Setup(config, workdir, loaded, classifier, params, images, labels,
               indices, kmax, describe_classifier(config))


def row(idx: int, kind: str, freq, height: int, result: fourier.FrequencyResult,
        seconds: float) -> str:
  if freq is None:
    k = l = ky = kx = -1
  else:
    k, l = freq
    ky, kx = fourier.signed_frequency(k, l, height)
  values = (idx, kind, k, l, ky, kx, result.images, result.errors,
            result.abstentions, f"{result.error_rate:.6f}",
            f"{result.abstention_rate:.6f}", f"{seconds:.4f}")
  return "\t".join(str(v) for v in values) + "\n"


def read_rows(path: str) -> list[dict[str, str]]:
  with open(path) as f:
    lines = f.read().splitlines()
  names = lines[0].split("\t")
  return [dict(zip(names, line.split("\t"))) for line in lines[1:] if line]


def write_map_csv(path: str, values: np.ndarray, kmax: int) -> None:
  freqs = range(-kmax, kmax + 1)
  lines = ["ky\\kx," + ",".join(str(f) for f in freqs)]
  for ky, line in zip(freqs, values):
    lines.append(f"{ky}," + ",".join(f"{v:.6g}" for v in line))
  common.atomic_write_text(path, "\n".join(lines) + "\n")


def draw_map(values: np.ndarray, kmax: int, path: str, title: str,
             label: str) -> None:
  """The centred map, ky down (image rows) and kx right, with a colour bar."""
  fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
  extent = (-kmax - 0.5, kmax + 0.5, kmax + 0.5, -kmax - 0.5)
  im = ax.imshow(values, cmap="jet", vmin=0.0, vmax=1.0, extent=extent,
                 interpolation="nearest")
  ax.set_xlabel("horizontal frequency kx (cycles per image)")
  ax.set_ylabel("vertical frequency ky (cycles per image)")
  ax.set_title(title, fontsize=8.5)
  bar = fig.colorbar(im, ax=ax)
  bar.set_label(label)
  fig.tight_layout()
  common.save_figure(fig, path)


BAND_NOTE = ("null: no frequency of this map lies in that band (with K = "
             "max_frequency below 3 the bands cannot all be filled)")


def band_means(values: np.ndarray, kmax: int) -> dict[str, float | None]:
  """Mean over low (max |k| <= K/3), middle and high (> 2K/3) frequencies;
  None for a band no frequency of the map falls in (K = 1 has no middle
  band): JSON's null, where NaN would not be valid JSON."""
  ky, kx = np.meshgrid(np.arange(-kmax, kmax + 1), np.arange(-kmax, kmax + 1),
                       indexing="ij")
  radius = np.maximum(np.abs(ky), np.abs(kx))
  bands = {"low": radius <= kmax / 3,
           "middle": (radius > kmax / 3) & (radius <= 2 * kmax / 3),
           "high": radius > 2 * kmax / 3}
  return {name: float(np.mean(values[mask])) if mask.any() else None
          for name, mask in bands.items()}


def run(config, workdir: str, stream=sys.stderr) -> tuple[Setup, dict]:
  """Evaluates every remaining frequency (resuming), then writes the maps."""
  start = time.perf_counter()
  setup = build_setup(config, workdir)
  if config.backbone == "toy":
    stream.write(f"note: {MODEL_NOTE}\n")
  height, width = setup.images.shape[1:3]
  kmax = setup.max_frequency
  freqs = fourier.map_frequencies(height, width, kmax)
  clean_id = fourier.clean_index(height, width)
  # The weights' hashes are recorded and checked on a resume, as certify and
  # attack do: a map of two models' frequencies is refused.
  journal = common.ResumableRun(
      workdir, config.to_dict(),
      weights=certify_job.weights_hashes(setup.loaded))
  tsv = os.path.join(workdir, "frequencies.tsv")
  journal.prepare({tsv: HEADER})
  batches = fourier.image_batches(setup.images, setup.labels,
                                  batch_size(config), setup.indices)
  key = jax.random.key(config.seed)
  todo = journal.remaining([fourier.flat_index(k, l, width) for k, l in freqs])
  todo_set = set(todo)
  # The clean pass compiles the one program every frequency runs; it is
  # timed apart, so the ETA below is that of the frequencies alone.
  stream.write(f"{setup.description}: {len(setup.indices)} images of "
               f"{height}x{width}, {len(freqs)} frequencies, v={config.v:g}; "
               "compiling on the clean images...\n")
  t0 = time.perf_counter()
  clean = fourier.evaluate(setup.classifier, setup.params, batches, key, None,
                           config.v)
  warmup = time.perf_counter() - t0
  if clean_id not in journal.done:
    journal.commit(clean_id, {tsv: (HEADER, row(clean_id, "clean", None, height,
                                                 clean, warmup))})
  progress = common.Progress(len(freqs), "basis images", stream=stream,
                             already_done=len(freqs) - len(todo))
  for k, l in freqs:
    idx = fourier.flat_index(k, l, width)
    if idx not in todo_set:
      continue
    t0 = time.perf_counter()
    result = fourier.evaluate(setup.classifier, setup.params, batches, key,
                              (k, l), config.v)
    seconds = time.perf_counter() - t0
    journal.commit(idx, {tsv: (HEADER, row(idx, "frequency", (k, l), height,
                                           result, seconds))})
    ky, kx = fourier.signed_frequency(k, l, height)
    progress.update(note=f"(ky, kx) = ({ky}, {kx}): error "
                    f"{result.error_rate:.3f}")
  summary = write_outputs(setup, tsv, height, width)
  summary["seconds"] = {"this_process": time.perf_counter() - start,
                        "compile_and_clean_pass": warmup,
                        "frequencies_this_process": len(todo)}
  common.write_json(os.path.join(workdir, "summary.json"), summary)
  return setup, summary


def write_outputs(setup: Setup, tsv: str, height: int, width: int) -> dict:
  """Maps (.npy, .csv, .png) and the summary, from the TSV as written."""
  config, kmax, workdir = setup.config, setup.max_frequency, setup.workdir
  rows = read_rows(tsv)
  clean = next(r for r in rows if r["kind"] == "clean")
  errors = {(int(r["k"]), int(r["l"])): float(r["errors"]) / int(r["images"])
            for r in rows if r["kind"] == "frequency"}
  abstentions = {(int(r["k"]), int(r["l"])):
                 float(r["abstentions"]) / int(r["images"])
                 for r in rows if r["kind"] == "frequency"}
  smoothed = config.classifier == "smoothed"
  model = setup.loaded.name
  what = (f"{model} on {config.dataset} ({len(setup.indices)} images "
          f"{height}x{width}), v = {config.v:g}\n{setup.description}")
  clean_error = int(clean["errors"]) / int(clean["images"])
  clean_abst = int(clean["abstentions"]) / int(clean["images"])
  outputs = {}
  maps = [("error", errors, "error rate (abstentions count as errors)"
           if smoothed else "error rate")]
  if smoothed:
    maps.append(("abstention", abstentions, "abstention rate"))
  summary_maps = {}
  for name, values, label in maps:
    matrix = fourier.half_plane_matrix(values, height, width)
    centred = fourier.heatmap_from_half_plane(matrix, width, kmax)
    np.save(os.path.join(workdir, f"{name}_half_plane.npy"), matrix)
    np.save(os.path.join(workdir, f"{name}_map.npy"), centred)
    write_map_csv(os.path.join(workdir, f"{name}_map.csv"), centred, kmax)
    clean_value = clean_error if name == "error" else clean_abst
    title = (f"Fourier heat map of {name}s: {what}\nclean {name} rate "
             f"{clean_value:.3f}; map {centred.shape[0]}x{centred.shape[1]}, "
             f"centre = lowest frequency")
    png = os.path.join(workdir, f"{name}_map.png")
    draw_map(centred, kmax, png, title, label)
    flat = int(np.nanargmax(centred))
    top = np.unravel_index(flat, centred.shape)
    summary_maps[name] = {
        "clean_rate": clean_value,
        "mean": float(np.nanmean(centred)),
        "max": float(np.nanmax(centred)),
        "argmax_ky_kx": [int(top[0]) - kmax, int(top[1]) - kmax],
        "band_means": band_means(centred, kmax),
        **({"band_means_note": BAND_NOTE}
           if None in band_means(centred, kmax).values() else {}),
        "files": {"npy": f"{name}_map.npy", "csv": f"{name}_map.csv",
                  "png": f"{name}_map.png",
                  "half_plane": f"{name}_half_plane.npy"},
    }
    outputs[name] = png
  return {
      "model": {"name": model, "fingerprint": setup.loaded.fingerprint,
                "weights": certify_job.weights_hashes(setup.loaded),
                "note": MODEL_NOTE if config.backbone == "toy" else
                        f"weights loaded from {config.backbone}"},
      "dataset": config.dataset,
      "images": len(setup.indices),
      "image_size": [int(height), int(width)],
      "classifier": setup.description,
      "v": float(config.v),
      "max_frequency": kmax,
      "frequencies": len(errors),
      "map_layout": ("row i: ky = i - K, column j: kx = j - K (K = "
                     "max_frequency); centre = lowest frequency; "
                     "see ovc_jax/fourier.py"),
      "maps": summary_maps,
      "config": config.to_dict(),
  }


def print_report(setup: Setup, summary: dict, stream=sys.stdout) -> None:
  w = stream.write
  w(f"\nmodel: {summary['model']['name']} ({summary['model']['note']})\n")
  w(f"dataset: {summary['dataset']}, {summary['images']} images per frequency, "
    f"{summary['frequencies']} frequencies, v = {summary['v']:g}\n")
  w(f"classifier: {summary['classifier']}\n")
  for name, entry in summary["maps"].items():
    bands = entry["band_means"]
    w(f"{name} rate: clean {entry['clean_rate']:.3f}; map mean "
      f"{entry['mean']:.3f}, max {entry['max']:.3f} at (ky, kx) = "
      f"{tuple(entry['argmax_ky_kx'])}; low/middle/high frequencies "
      + " / ".join("none" if bands[b] is None else f"{bands[b]:.3f}"
                   for b in ("low", "middle", "high")) + "\n")
  w(f"wall time of this process: {summary['seconds']['this_process']:.1f} s\n")
  w(f"results: {setup.workdir}/summary.json, frequencies.tsv, "
    + ", ".join(f"{n}_map.{{npy,csv,png}}" for n in summary["maps"]) + "\n")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _FLAGS["config"].value
  validate(config)  # Before a workdir name is even chosen.
  workdir = _FLAGS["workdir"].value or default_workdir(config)
  setup, summary = run(config, workdir)
  print_report(setup, summary)


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
