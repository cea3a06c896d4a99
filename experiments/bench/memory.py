"""Peak memory of one call of a method, each in a fresh child process
(`--memory_child`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.backbone import benchmark_input
from experiments.bench.backbone import cached_smoothing
from experiments.bench.backbone import load_backbone
from experiments.configs import benchmark as benchmark_configs


def _rss_kb() -> dict[str, int]:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmRSS:", "VmHWM:")):
        out[line.split(":")[0]] = int(line.split()[1])
  return out


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def memory_child(spec: dict, config) -> None:
  """In a fresh process: the peak memory one call of a method adds."""
  # "first" includes compilation, even where the user's environment sets a
  # persistent compilation cache (JAX_COMPILATION_CACHE_DIR).
  jax.config.update("jax_enable_compilation_cache", False)
  from ovc_jax import ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc, mvn_ovc, standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  u = jnp.asarray(np.load(spec["class_embeddings"]))
  key = sampler.input_key(config.seed, 0)
  if spec["method"] == "standard":
    backbone = load_backbone(spec["architecture"], config.dtype, config.seed)
    x = benchmark_input(backbone)
    classifier = EmbeddingClassifier(backbone.model.embed_images)
    params = classifier.params(backbone.params, u)
    smoothing = SmoothingParams(sigma=config.sigma, n0=config.n0,
                                n=config.n, alpha=config.alpha,
                                batch_size=config.batch_size)
    call = lambda: standard.certify(key, classifier, params, x, smoothing)
  elif spec["method"] == "cached":
    draws = cached_ovc.EmbeddingDraws(
        np.load(spec["selection"], mmap_mode="r"),
        np.load(spec["estimation"], mmap_mode="r"))
    smoothing = cached_smoothing(draws, config)
    call = lambda: cached_ovc.certify_cached(draws, u, smoothing)
  else:
    fit = mvn_ovc.GaussianFit(jnp.asarray(np.load(spec["mean"])),
                              jnp.asarray(np.load(spec["factor"])))
    smoothing = SmoothingParams(sigma=config.sigma, n0=config.n0,
                                n=spec["n"], alpha=config.alpha)
    mvn = mvn_ovc.MVNParams(delta=0.0, batch_size=config.mvn_batch_size)
    call = lambda: mvn_ovc.certify_mvn(key, fit, u, smoothing, mvn)
  out = {}
  for name in ("first", "warm"):
    reset = _reset_peak()
    before = _rss_kb()["VmRSS"]
    call()
    after = _rss_kb()
    out[name] = {"peak_added_bytes": (after["VmHWM"] - before) * 1024,
                 "rss_before_bytes": before * 1024, "peak_reset": reset}
  print(json.dumps(out))


def peak_memory(specs: dict[str, dict], variant: str
                ) -> dict[str, dict | None]:
  """{method: the figures of memory_child} for each spec, in child processes
  run side by side (each measures its own memory; nothing here is timed)."""
  if not os.path.exists("/proc/self/status"):
    return {method: None for method in specs}
  procs = {
      method: subprocess.Popen(
          [sys.executable, "-m", "experiments.benchmark",
           f"--memory_child={json.dumps(spec)}",
           f"--config={benchmark_configs.__file__}:{variant}"]
          + [a for a in sys.argv[1:] if a.startswith("--config.")],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for method, spec in specs.items()}
  out = {}
  for method, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=3600)
    if proc.returncode != 0:
      raise RuntimeError(f"memory child ({method}) failed:\n{stderr[-2000:]}")
    out[method] = json.loads(stdout.strip().splitlines()[-1])
  return out
