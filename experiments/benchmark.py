r"""How much faster each certifier is for a new prompt, and what compilation costs.

  python -m experiments.benchmark --workdir=workdirs/benchmark            # quick, CPU
  python -m experiments.benchmark --workdir=DIR \
      --config=experiments/configs/benchmark.py:full                     # accelerators

For each architecture and class count, in this one process, on the same input,
key and n: seconds per input for a new prompt with standard RS, Modified-IRS,
Cached-OVC and MVN-OVC (compilation excluded, median of repeats, cache reads
from disk included), their speedups, the bytes each cache takes, the image
encoder's throughput against transformers' FlaxCLIPModel on the same weights,
the sampler's overhead over the bare encoder, XLA's FLOP count, and the time to
the first result in fresh processes with and without JAX's persistent
compilation cache. Writes DIR/benchmark.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.configs import benchmark as benchmark_configs

_CONFIG = common.define_config_flag(benchmark_configs)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("workdirs", "benchmark"),
                               "Where benchmark.json and the caches go.")
_CHILD = flags.DEFINE_string("compile_child", None,
                             "Internal: time the first result of this architecture.")
_CACHE_DIR = flags.DEFINE_string("compile_cache_dir", None,
                                 "Internal: JAX persistent compilation cache dir.")

SCALED_N = 100_000  # cache sizes are reported for Cohen's n


@dataclasses.dataclass
class Backbone:
  """An image encoder with its weights, preprocessing and provenance."""

  name: str
  model: Any
  params: Any
  preprocess: Any
  fingerprint: str
  weights: str  # what the weights are


def load_backbone(name: str, dtype: str, seed: int) -> Backbone:
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  from ovc_jax import preprocessing  # pylint: disable=g-import-not-at-top
  if name == "toy":
    loaded = models.load_clip("toy", dtype=dtype)
    return Backbone("toy", loaded.model, loaded.params, loaded.preprocess,
                    loaded.fingerprint,
                    "the project's trained toy-world CLIP (not a real CLIP)")
  config = models.named_config(name)
  model = models.ClipModel(config, dtype=dtype)
  params = jax.jit(model.init)(jax.random.key(seed))
  size = config.vision.image_size
  return Backbone(name, model, params,
                  preprocessing.PreprocessSpec(image_size=size, resize_size=size),
                  caches.array_fingerprint(np.asarray(jax.tree_util.tree_leaves(
                      params)[0])),
                  "random (speed does not depend on the weights' values)")


def benchmark_input(backbone: Backbone) -> jax.Array:
  """A toy-world test image, preprocessed for the backbone (normalised space)."""
  from ovc_jax import datasets  # pylint: disable=g-import-not-at-top
  from ovc_jax import preprocessing  # pylint: disable=g-import-not-at-top
  image, _ = datasets.load_dataset("toy")[0]
  return jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(image), backbone.preprocess)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of fn() (which must return host values or block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def unit_rows(key, shape) -> jax.Array:
  u = jax.random.normal(key, shape)
  return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def encoder_throughput(backbone: Backbone, x: jax.Array, config) -> dict:
  """Images/s of our encoder and XLA's FLOP count per image."""
  batch = jnp.broadcast_to(x, (config.batch_size,) + x.shape)
  embed = jax.jit(backbone.model.embed_images)
  compiled = embed.lower(backbone.params, batch).compile()
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) / config.batch_size
  except (KeyError, TypeError, IndexError):
    pass
  jax.block_until_ready(embed(backbone.params, batch))
  seconds = median_seconds(lambda: embed(backbone.params, batch),
                           config.encoder_repeats)
  return {"encoder_images_per_s": config.batch_size / seconds,
          "flops_per_image": flops,
          "achieved_flops_per_s": (flops * config.batch_size / seconds
                                   if flops else None)}


def peer_throughput(backbone: Backbone, x: jax.Array, config) -> dict:
  """Images/s of transformers' FlaxCLIPModel on the same weights and batch."""
  if backbone.model.config.vision.architecture != "vit":
    return {"peer_encoder_images_per_s": None,
            "peer_note": "transformers has no ResNet CLIP"}
  try:
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"peer_encoder_images_per_s": None,
            "peer_note": "transformers' FlaxCLIPModel needs transformers < 5"}
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    models.save_hf_checkpoint((backbone.model, backbone.params), tmp)
    peer = FlaxCLIPModel.from_pretrained(tmp, from_pt=True)
  batch = jnp.broadcast_to(x, (config.batch_size,) + x.shape)
  pixels = jnp.transpose(batch, (0, 3, 1, 2))  # HF takes NCHW
  fn = jax.jit(lambda p, v: peer.get_image_features(pixel_values=v, params=p))
  ours = np.asarray(backbone.model.embed_images(backbone.params, batch[:2]))
  theirs = np.asarray(fn(peer.params, pixels)[:2])
  jax.block_until_ready(fn(peer.params, pixels))
  seconds = median_seconds(lambda: fn(peer.params, pixels),
                           config.encoder_repeats)
  return {"peer_encoder_images_per_s": config.batch_size / seconds,
          "peer_max_abs_difference": float(np.max(np.abs(ours - theirs))),
          "peer_note": "transformers FlaxCLIPModel.get_image_features"}


def benchmark_class_count(backbone: Backbone, x, num_classes: int, config,
                          cache_root: str) -> dict:
  """The four certifiers on one new prompt with `num_classes` classes."""
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  from ovc_jax import ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers.modified_irs import IRSParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers.mvn_ovc import MVNParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top

  d = backbone.model.config.embed_dim
  key = sampler.input_key(config.seed, 0)
  k1, k2 = jax.random.split(jax.random.key(config.seed + 1))
  known = unit_rows(k1, (2, num_classes, d))
  novel = unit_rows(k2, (num_classes, d)) * 1e-3 + known[0]
  novel = novel / jnp.linalg.norm(novel, axis=-1, keepdims=True)
  classifier = EmbeddingClassifier(backbone.model.embed_images)
  params = ovc.OVCParams(
      SmoothingParams(sigma=config.sigma, n0=config.n0, n=config.n,
                      alpha=config.alpha, batch_size=config.batch_size),
      IRSParams(n_p=config.n_p, gamma=config.gamma, alpha_zeta=config.alpha),
      MVNParams(delta=0.0, batch_size=config.mvn_batch_size),
      cached_batch_size=config.cached_batch_size)

  # The known prompts: certified once, leaving the three caches on disk.
  prov = caches.Provenance.for_input(
      backbone, noise_space="normalized", smoothing=params.smoothing, key=key,
      image=x, dtype=config.dtype, num_classes=num_classes)
  known_result = ovc.certify_known_prompts(classifier, backbone.params, x, key,
                                           known, params)
  ovc.save_caches(cache_root, known_result.caches, prov, alpha=config.alpha)
  source = ovc.StoredCaches(cache_root, prov, known_class_embeddings=known)
  paths = {k: os.path.join(cache_root, k) for k in ovc.CACHE_KINDS}

  def runner(method):
    return lambda: ovc.certify_novel_prompt(
        method, classifier, backbone.params, x, key, source, novel, params)

  out = {}
  results = {}
  for name, method in (("standard_rs_s", "standard"), ("irs_s", "irs"),
                       ("cached_ovc_s", "cached"), ("mvn_ovc_s", "mvn")):
    fn = runner(method)
    results[name] = fn()  # compiles; not timed
    out[name] = median_seconds(fn, config.repeats)
  std = out["standard_rs_s"]
  out["speedup_irs"] = std / out["irs_s"]
  out["speedup_cached"] = std / out["cached_ovc_s"]
  out["speedup_mvn"] = std / out["mvn_ovc_s"]
  out["irs_applied"] = bool(results["irs_s"].irs.irs_applied)
  ref = results["standard_rs_s"].certificate
  cached = results["cached_ovc_s"].certificate
  out["cached_identical_to_standard"] = bool(
      ref.prediction == cached.prediction and ref.radius == cached.radius
      and np.array_equal(ref.counts, cached.counts))
  # Bytes per input per sigma at n = 100,000: the embeddings scale with n0 + n,
  # the Gaussian fit (mean and factor) does not.
  row_bytes = d * np.dtype(np.float32).itemsize
  on_disk = {k: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
             for k, p in paths.items()}
  out["cache_bytes_cached"] = int(on_disk["embeddings"]
                                  + (SCALED_N - config.n) * row_bytes)
  out["cache_bytes_mvn"] = int(on_disk["gaussian"])
  out["cache_bytes_measured"] = on_disk
  return out


COMPILE_CHILD_N = "first result: one standard CERTIFY with n0 = n = batch_size"


def compile_child(name: str, cache_dir: str) -> None:
  """In a fresh process: time to the first certificate, then a second one."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  backbone = load_backbone(name, config.dtype, config.seed)
  x = benchmark_input(backbone)
  u = unit_rows(jax.random.key(1), (1000, backbone.model.config.embed_dim))
  classifier = EmbeddingClassifier(backbone.model.embed_images)
  params = classifier.params(backbone.params, u)
  smoothing = SmoothingParams(sigma=config.sigma, n0=config.batch_size,
                              n=config.batch_size, alpha=config.alpha,
                              batch_size=config.batch_size)
  key = sampler.input_key(config.seed, 0)
  jax.block_until_ready(x)
  start = time.perf_counter()
  standard.certify(classifier, params, x, key, smoothing)
  first = time.perf_counter() - start
  start = time.perf_counter()
  standard.certify(classifier, params, x, key, smoothing)
  second = time.perf_counter() - start
  print(json.dumps({"first_result_s": first, "steady_s": second}))


def compile_times(name: str, workdir: str) -> dict:
  """compile_s_cold / compile_s_warm: two fresh processes, one cache dir."""
  cache_dir = tempfile.mkdtemp(prefix=f"jax-cache-{name}-", dir=workdir)
  runs = []
  for _ in range(2):  # cold (empty cache), then warm
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark",
         f"--compile_child={name}", f"--compile_cache_dir={cache_dir}",
         f"--config={_CONFIG_PATH}:{_CONFIG.value.variant}"],
        capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
      raise RuntimeError(f"compile-time child failed:\n{proc.stderr[-2000:]}")
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return {"compile_s_cold": runs[0]["first_result_s"],
          "compile_s_warm": runs[1]["first_result_s"],
          "steady_state_s": runs[1]["steady_s"],
          "compile_note": COMPILE_CHILD_N}


_CONFIG_PATH = os.path.join(os.path.dirname(__file__), "configs", "benchmark.py")

TARGETS = (
    # (field, architecture, classes, comparison, value)
    ("speedup_cached", "ViT-B-32", 1000, ">=", 1000.0),
    ("speedup_mvn", "ViT-B-32", 1000, ">=", 1000.0),
    ("cache_bytes_mvn", "ViT-B-32", 1000, "<=", 1.1e6),
    ("sampler_overhead", "ViT-B-32", 1000, "<=", 1.05),
)


def check_targets(report: dict) -> list[dict]:
  checks = []
  for field, arch, classes, op, value in TARGETS:
    entry = report["architectures"].get(arch, {}).get("classes", {}).get(str(classes))
    if entry is None or entry.get(field) is None:
      continue
    got = entry[field]
    met = got >= value if op == ">=" else got <= value
    checks.append({"target": f"{field} {op} {value:g} ({arch}, {classes} classes)",
                   "measured": got, "met": bool(met)})
  for arch, entry in report["architectures"].items():
    if entry.get("peer_encoder_images_per_s"):
      checks.append({
          "target": f"encoder_images_per_s >= peer_encoder_images_per_s ({arch})",
          "measured": entry["encoder_images_per_s"] / entry["peer_encoder_images_per_s"],
          "met": entry["encoder_images_per_s"] >= entry["peer_encoder_images_per_s"]})
    if entry.get("compile_s_cold"):
      checks.append({
          "target": f"compile_s_warm <= compile_s_cold / 3 ({arch})",
          "measured": entry["compile_s_warm"] / entry["compile_s_cold"],
          "met": entry["compile_s_warm"] <= entry["compile_s_cold"] / 3})
  return checks


def print_table(report: dict, stream=sys.stdout) -> None:
  w = stream.write
  w(f"\ndevice: {report['device']}, jax {report['jax_version']}, "
    f"n0={report['n0']}, n={report['n']}, batch={report['batch_size']}\n")
  cols = ("standard_rs_s", "irs_s", "cached_ovc_s", "mvn_ovc_s", "speedup_irs",
          "speedup_cached", "speedup_mvn", "sampler_overhead")
  w(f"{'architecture':12} {'C':>5} " + " ".join(f"{c:>14}" for c in cols) + "\n")
  for arch, entry in report["architectures"].items():
    for classes, row in entry["classes"].items():
      w(f"{arch:12} {classes:>5} "
        + " ".join(f"{row[c]:14.4g}" for c in cols) + "\n")
  w("\n")
  for arch, entry in report["architectures"].items():
    peer = entry.get("peer_encoder_images_per_s")
    w(f"{arch}: encoder {entry['encoder_images_per_s']:.1f} img/s"
      + (f" (FlaxCLIPModel {peer:.1f} img/s)" if peer else "")
      + (f", {entry['flops_per_image'] / 1e9:.3f} GFLOP/image"
         if entry.get("flops_per_image") else "")
      + (f", first result {entry['compile_s_cold']:.1f} s cold / "
         f"{entry['compile_s_warm']:.1f} s warm" if entry.get("compile_s_cold") else "")
      + f"; weights: {entry['weights']}\n")
  w("\ntargets:\n")
  for check in report["targets"]:
    w(f"  [{'met' if check['met'] else 'MISSED'}] {check['target']}: "
      f"measured {check['measured']:.4g}\n")


def draw_speedups(report: dict, out: str) -> None:
  """Bar chart: speedup of each certifier over standard RS, per architecture
  and class count (log scale), measured in this run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods = (("speedup_irs", "Modified-IRS"), ("speedup_cached", "Cached-OVC"),
             ("speedup_mvn", "MVN-OVC (approximate)"))
  groups = [(f"{arch}\n{classes} classes", row)
            for arch, entry in report["architectures"].items()
            for classes, row in entry["classes"].items()]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2), dpi=120)
  width = 0.8 / len(methods)
  for j, (field, label) in enumerate(methods):
    xs = [i + (j - 1) * width for i in range(len(groups))]
    ys = [row[field] for _, row in groups]
    ax.bar(xs, ys, width, label=label)
    for x, y in zip(xs, ys):
      ax.text(x, y, f"{y:.3g}x", ha="center", va="bottom", fontsize=6)
  ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=7)
  ax.set_yscale("log")
  ax.axhline(1.0, color="grey", linewidth=0.8)
  ax.set_ylabel("speedup over standard RS (x, log scale)")
  ax.set_title(f"Seconds per input for a new prompt, relative to standard RS\n"
               f"({report['device']}; n0={report['n0']}, n={report['n']})",
               fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  common.save_figure(fig, out)


@common.exit_on_user_error
def main(argv) -> None:
  del argv
  if _CHILD.value:
    compile_child(_CHILD.value, _CACHE_DIR.value)
    return
  config = _CONFIG.value
  validate(config)
  workdir = _WORKDIR.value
  with common.workdir_lock(workdir):
    run(config, workdir)


def validate(config) -> None:
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  # --config.architectures=a,b arrives as one string: normalised here.
  config.architectures = common.check_name_list(config.architectures,
                                                "architectures")
  for name in config.architectures:
    if name != "toy":
      try:
        models.named_config(name)
      except common.ConfigError as e:
        raise common.ConfigError(f"{e}; set --config.architectures") from e
  common.check_number_list(config.class_counts, "class_counts", minimum=2,
                           allow_minimum=True, integer=True)


def run(config, workdir: str) -> None:
  """Measures everything and writes WORKDIR/benchmark.json (workdir locked)."""
  report = {
      "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
                f"{jax.device_count()} device(s)); host {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} CPUs",
      "jax_version": jax.__version__, "variant": config.variant,
      "n0": config.n0, "n": config.n, "batch_size": config.batch_size,
      "repeats": config.repeats, "sigma": config.sigma, "n_p": config.n_p,
      "gamma": config.gamma, "scaled_n_for_cache_bytes": SCALED_N,
      "notes": {
          "timing": "seconds per input for a new prompt, compilation excluded, "
                    "median of repeats; Cached-OVC, MVN-OVC and Modified-IRS "
                    "include reading their cache from disk",
          "irs": "the novel prompt is a slightly perturbed known prompt, so "
                 "the IRS path (n0 + n_p encoder passes) is timed",
          "mvn": "MVN-OVC is approximate, not a certificate",
      },
      "architectures": {},
  }
  steps = len(config.architectures) * (len(config.class_counts) + 1)
  progress = common.Progress(steps, "steps")
  for name in config.architectures:
    backbone = load_backbone(name, config.dtype, config.seed)
    x = benchmark_input(backbone)
    entry = {"weights": backbone.weights,
             "embed_dim": backbone.model.config.embed_dim,
             "image_size": backbone.model.config.vision.image_size}
    entry.update(encoder_throughput(backbone, x, config))
    if config.peer:
      entry.update(peer_throughput(backbone, x, config))
    if config.compile:
      entry.update(compile_times(name, workdir))
    progress.update(note=f"{name}: encoder and compile times")
    entry["classes"] = {}
    for classes in config.class_counts:
      row = benchmark_class_count(
          backbone, x, classes, config,
          os.path.join(workdir, "caches", name, str(classes)))
      row["sampler_overhead"] = row["standard_rs_s"] / (
          (config.n0 + config.n) / entry["encoder_images_per_s"])
      entry["classes"][str(classes)] = row
      progress.update(note=f"{name}: {classes} classes")
    report["architectures"][name] = entry
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
  report["targets"] = check_targets(report)
  common.write_json(os.path.join(workdir, "benchmark.json"), report)
  draw_speedups(report, os.path.join(workdir, "speedup.png"))
  print_table(report)
  sys.stdout.write(f"\nwrote {os.path.join(workdir, 'benchmark.json')} and "
                   f"{os.path.join(workdir, 'speedup.png')}\n")


if __name__ == "__main__":
  common.run_app(main)
