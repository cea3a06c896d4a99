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
compilation cache. Then B toy test images certified in one
jit(vmap(core.certify)) call against a Python loop over standard.certify
(`--config=experiments/configs/benchmark.py:batched` runs that section
alone), and compressed Cached-OVC caches against float32 ones: bytes,
ambiguous rows, time from memory and a cold disk
(`--config=experiments/configs/benchmark.py:compressed` alone). Writes
DIR/benchmark.json and prints a table.
"""

# This module holds the flags and the order of the sections; each section is
# a module of experiments/bench/ (see its __init__). The compile-time and
# memory children run this module again (--compile_child, --memory_child).

from __future__ import annotations

import json
import os
import platform
import sys

from absl import flags
import jax

from experiments import common
from experiments.bench.backbone import benchmark_input
from experiments.bench.backbone import load_backbone
from experiments.bench.batched import benchmark_batched
from experiments.bench.batched import print_batched
from experiments.bench.class_counts import SCALED_N
from experiments.bench.class_counts import benchmark_class_count
from experiments.bench.compressed import benchmark_compressed
from experiments.bench.compressed import print_compressed
from experiments.bench.encoder import compile_child
from experiments.bench.encoder import compile_times
from experiments.bench.encoder import encoder_throughput
from experiments.bench.encoder import peer_throughput
from experiments.bench.large import LARGE_NOTES
from experiments.bench.large import benchmark_large
from experiments.bench.memory import memory_child
from experiments.bench.report import draw_speedups
from experiments.bench.report import print_table
from experiments.bench.targets import check_targets
from experiments.configs import benchmark as benchmark_configs

_CONFIG = common.define_config_flag(benchmark_configs)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("workdirs", "benchmark"),
                               "Where benchmark.json and the caches go.")
_CHILD = flags.DEFINE_string("compile_child", None,
                             "Internal: time the first result of this architecture.")
_CACHE_DIR = flags.DEFINE_string("compile_cache_dir", None,
                                 "Internal: JAX persistent compilation cache dir.")
_MEMORY_CHILD = flags.DEFINE_string(
    "memory_child", None, "Internal: the peak memory of one method (JSON spec).")


@common.exit_on_user_error
def main(argv) -> None:
  del argv
  if _CHILD.value:
    compile_child(_CHILD.value, _CACHE_DIR.value, _CONFIG.value)
    return
  if _MEMORY_CHILD.value:
    memory_child(json.loads(_MEMORY_CHILD.value), _CONFIG.value)
    return
  config = _CONFIG.value
  validate(config)
  workdir = _WORKDIR.value
  with common.workdir_lock(workdir):
    run(config, workdir)


def validate(config) -> None:
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  for field in ("inputs", "n0", "n", "repeats"):
    value = config.batched[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise common.ConfigError(f"--config.batched.{field} must be an integer "
                               f">= 1; got {value!r}")
  config.batched.batch_sizes = common.check_number_list(
      config.batched.batch_sizes, "batched.batch_sizes", minimum=1,
      allow_minimum=True, integer=True)
  if config.batched.inputs > 1000:
    raise common.ConfigError("--config.batched.inputs must be at most 1000 "
                             "(the toy test split's size)")
  if config.batched.alone:
    return
  validate_compressed(config)
  if config.compressed.alone:
    return
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
  large = config.large
  if large.enabled:
    for field in ("n", "standard_n", "repeats", "standard_repeats",
                  "disk_bytes"):
      value = large[field]
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise common.ConfigError(f"--config.large.{field} must be an integer "
                                 f">= 1; got {value!r}")
    if (not isinstance(large.standard_seconds, (int, float))
        or large.standard_seconds < 0):
      raise common.ConfigError("--config.large.standard_seconds must be a "
                               f"number >= 0; got {large.standard_seconds!r}")
    if config.n < large.n and large.standard_n <= config.n:
      raise common.ConfigError(
          f"--config.large.standard_n ({large.standard_n}) must exceed "
          f"--config.n ({config.n}): standard RS's per-sample cost is fitted "
          "through the two")
    large.memory_methods = common.check_name_list(
        large.memory_methods, "large.memory_methods",
        ("cached", "mvn", "standard"))
    large.architectures = (
        common.check_name_list(large.architectures, "large.architectures",
                               config.architectures)
        if large.architectures else tuple(config.architectures))


def validate_compressed(config) -> None:
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  cfg = config.compressed
  for field in ("toy_inputs", "toy_n", "repeats"):
    value = cfg[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise common.ConfigError(f"--config.compressed.{field} must be an "
                               f"integer >= 1; got {value!r}")
  if cfg.toy_inputs > 1000:
    raise common.ConfigError("--config.compressed.toy_inputs must be at most "
                             "1000 (the toy test split's size)")
  cfg.formats = common.check_name_list(cfg.formats, "compressed.formats",
                                       ("int16", "int8"))
  cfg.toy_sigmas = common.check_number_list(cfg.toy_sigmas,
                                            "compressed.toy_sigmas",
                                            minimum=0.0)
  cfg.architectures = (common.check_name_list(cfg.architectures,
                                              "compressed.architectures")
                       if cfg.architectures else ())
  for name in cfg.architectures:
    if name != "toy":
      try:
        models.named_config(name)
      except common.ConfigError as e:
        raise common.ConfigError(f"{e}; set --config.compressed."
                                 "architectures") from e


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
  if config.batched.alone:
    report["batched"] = benchmark_batched(config)
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
    print_batched(report["batched"])
    sys.stdout.write(f"\nwrote {os.path.join(workdir, 'benchmark.json')}\n")
    return
  if config.compressed.alone:
    report["large_n"] = int(config.large.n)
    report["compressed"] = benchmark_compressed(config, workdir)
    report["targets"] = check_targets(report)
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
    print_compressed(report["compressed"], sys.stdout)
    sys.stdout.write("\ntargets:\n")
    for check in report["targets"]:
      sys.stdout.write(f"  [{'met' if check['met'] else 'MISSED'}] "
                       f"{check['target']}: measured {check['measured']:.4g}\n")
    sys.stdout.write(f"\nwrote {os.path.join(workdir, 'benchmark.json')}\n")
    return
  if config.large.enabled:
    report["large_notes"] = dict(LARGE_NOTES)
    report["large_n"] = int(config.large.n)
  steps = (len(config.architectures) * (len(config.class_counts) + 1)
           + (len(config.large.architectures) if config.large.enabled else 0)
           + int(config.batched.enabled)
           + (1 + len(config.compressed.architectures)
              if config.compressed.enabled else 0))
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
      entry.update(compile_times(name, workdir, config.variant))
    progress.update(note=f"{name}: encoder and compile times")
    entry["classes"] = {}
    contexts = {}
    for classes in config.class_counts:
      row, contexts[str(classes)] = benchmark_class_count(
          backbone, x, classes, config,
          os.path.join(workdir, "caches", name, str(classes)))
      row["sampler_overhead"] = row["standard_rs_s"] / (
          (config.n0 + config.n) / entry["encoder_images_per_s"])
      entry["classes"][str(classes)] = row
      progress.update(note=f"{name}: {classes} classes")
    report["architectures"][name] = entry
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
    if config.large.enabled and name in config.large.architectures:
      report.setdefault("large", {})[name] = benchmark_large(
          backbone, x, entry, contexts, config, workdir)
      progress.update(note=f"{name}: n = {config.large.n} section")
      common.write_json(os.path.join(workdir, "benchmark.json"), report)
    del contexts
  if config.batched.enabled:
    report["batched"] = benchmark_batched(config)
    progress.update(note="batched section")
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
  if config.compressed.enabled:
    report["compressed"] = benchmark_compressed(config, workdir, progress)
    common.write_json(os.path.join(workdir, "benchmark.json"), report)
  report["targets"] = check_targets(report)
  common.write_json(os.path.join(workdir, "benchmark.json"), report)
  draw_speedups(report, os.path.join(workdir, "speedup.png"))
  print_table(report)
  sys.stdout.write(f"\nwrote {os.path.join(workdir, 'benchmark.json')} and "
                   f"{os.path.join(workdir, 'speedup.png')}\n")


if __name__ == "__main__":
  common.run_app(main)
