"""The n = 100,000 section: Cached-OVC and MVN-OVC at Cohen's n, standard RS
scaled to it, a roofline, peak memory."""

from __future__ import annotations

import dataclasses
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.backbone import Backbone
from experiments.bench.backbone import cached_smoothing
from experiments.bench.backbone import unit_rows
from experiments.bench.disk import disk_read_gbps
from experiments.bench.disk import drop_from_page_cache
from experiments.bench.disk import resident_fraction
from experiments.bench.disk import write_disk_test_file
from experiments.bench.memory import peak_memory
from experiments.bench.timing import min_seconds
from experiments.bench.timing import timings


LARGE_NOTES = {
    "cache": "Cached-OVC and MVN-OVC are timed at n = large.n on a cache of "
             "that size whose rows are draws from a Gaussian fit of the "
             "architecture's real noisy embeddings (the n = config.n ones), "
             "L2-normalised: their time depends on n, d and C, not on the "
             "values; the caches are written with caches.save_embeddings / "
             "save_gaussian and read back as the certifiers read them",
    "standard": "standard RS is timed at n = config.n and at a second n "
                "(large.standard_n, or as many as the encoder takes in "
                "large.standard_seconds); t = a + b (n0 + n) is fitted "
                "through the two and SCALED to n0 + large.n. Where the "
                "second n reaches large.n (a fast encoder) it is measured, "
                "not scaled",
    "memory": "cache in memory: jax arrays (OVCCaches, as "
              "certify_known_prompts leaves them), through "
              "ovc.certify_novel_prompt",
    "disk_warm": "ovc.StoredCaches (metadata and CRC-32 checks over every "
                 "byte, then the memory-mapped arrays) with the files in the "
                 "page cache",
    "disk_cold": "the same right after dropping the files from the page "
                 "cache (posix_fadvise DONTNEED; the fraction still resident "
                 "is recorded)",
    "read_path": "cached_ovc.certify_cached on the memory-mapped .npy files "
                 "alone (np.load(mmap_mode='r'), no cache checks): the read "
                 "Cached-OVC itself does, cold",
    "inputs": "cached_ovc.certify_cached on the same rows as a jax array, a "
              "numpy array (np.array copy) and a warm memory map",
    "roofline": "bytes read and FLOPs per call against this machine's rates "
                "measured in the same run, per architecture: memory = numpy "
                "sum-read of the in-memory cache, disk = sequential read of a "
                "large file (16 MiB reads, page cache dropped first; median "
                "of reads interleaved with the cold runs), matmul = XLA's "
                "[n, d] x [d, 1000] float32 matmul alone",
    "peak_memory": "a fresh child process per method: VmHWM minus VmRSS "
                   "(/proc/self/status) across the first call, the peak "
                   "reset just before it through /proc/self/clear_refs; this "
                   "includes compilation and the memory-mapped cache pages "
                   "the call maps. 'warm' is the same across a second call: "
                   "what a process that has run the method once adds",
    "mvn": "MVN-OVC is approximate, not a certificate",
}


def standard_second_n(config, images_per_s: float | None) -> int:
  """The n of standard RS's second timing for the large-n fit."""
  n = int(config.large.standard_n)
  if images_per_s:
    n = max(n, int(images_per_s * config.large.standard_seconds) - config.n0)
  return min(n, int(config.large.n))


def synthetic_embeddings(real: jax.Array, n: int, key: jax.Array) -> jax.Array:
  """n L2-normalised draws from the Gaussian fit of real embeddings [m, d]."""
  from ovc_jax.certifiers import mvn_ovc  # pylint: disable=g-import-not-at-top
  fit = mvn_ovc.fit_gaussian(real)

  @jax.jit
  def draw(k):
    z = fit.mean + jax.random.normal(k, (n, fit.factor.shape[1])) @ fit.factor.T
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  return draw(key)


def benchmark_large(backbone: Backbone, x, entry: dict, contexts: dict,
                    config, workdir: str) -> dict:
  """The n = large.n section for one architecture (see LARGE_NOTES)."""
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  from ovc_jax import ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc, mvn_ovc  # pylint: disable=g-import-not-at-top

  large = config.large
  n, n0 = int(large.n), int(config.n0)
  d = backbone.model.config.embed_dim
  first = contexts[str(config.class_counts[0])]
  key = first["key"]
  k_sel, k_est = jax.random.split(jax.random.key(config.seed + 7))
  estimation = synthetic_embeddings(first["real_embeddings"], n, k_est)
  selection = synthetic_embeddings(first["real_embeddings"], n0, k_sel)
  draws = cached_ovc.EmbeddingDraws(selection, estimation)
  fit = mvn_ovc.fit_gaussian(estimation)
  smoothing = SmoothingParams(sigma=config.sigma, n0=n0, n=n,
                              alpha=config.alpha, batch_size=config.batch_size)
  prov = caches.Provenance.for_input(
      backbone, noise_space="normalized", smoothing=smoothing, key=key,
      image=x, dtype=config.dtype, num_classes=max(config.class_counts))
  root = os.path.join(workdir, "caches_large", backbone.name)
  cache_io_dirs = {k: os.path.join(root, k) for k in ("embeddings", "gaussian")}
  caches.save_embeddings(cache_io_dirs["embeddings"], draws, prov)
  caches.save_gaussian(cache_io_dirs["gaussian"], fit, prov)
  files = {k: sorted(os.path.join(p, f) for f in os.listdir(p))
           for k, p in cache_io_dirs.items()}
  npy = {os.path.basename(f)[:-4]: f for fs in files.values() for f in fs
         if f.endswith(".npy")}
  in_memory = ovc.OVCCaches(None, draws, fit)
  stored = ovc.StoredCaches(root, prov)
  repeats = int(large.repeats)
  min_total_s = float(large.min_total_s)

  # This machine's rates, in this run.
  host_rows = np.asarray(estimation)
  host_rows.sum()
  sum_s = min_seconds(host_rows.sum, repeats)
  u_ref = unit_rows(jax.random.key(config.seed + 3), (1000, d))
  matmul = jax.jit(lambda e, u: jnp.dot(e, u.T,
                                        precision=jax.lax.Precision.HIGHEST))
  matmul(estimation, u_ref).block_until_ready()
  matmul_s = min_seconds(lambda: matmul(estimation, u_ref), max(2, repeats // 2))
  disk_file = os.path.join(workdir, "disk_speed_test.bin")
  if not os.path.exists(disk_file) or os.path.getsize(disk_file) != large.disk_bytes:
    write_disk_test_file(disk_file, int(large.disk_bytes))
  disk_gbps = []
  machine = {
      "memory_gbps": host_rows.nbytes / sum_s / 1e9,
      "matmul_gflops": 2 * n * d * 1000 / matmul_s / 1e9,
      "matmul_shape": [n, d, 1000],
  }
  out = {"n": n, "n0": n0, "embed_dim": d, "machine": machine, "classes": {}}

  for classes in config.class_counts:
    ctx = contexts[str(classes)]
    novel, params = ctx["novel"], ctx["params"]
    params = dataclasses.replace(params, smoothing=smoothing)
    row = {}

    def novel_call(method, source):
      return lambda: ovc.certify_novel_prompt(
          method, ctx["classifier"], backbone.params, x, key, source, novel,
          params)

    calls = {
        "cached_memory": novel_call("cached", in_memory),
        "cached_disk": novel_call("cached", stored),
        "mvn_memory": novel_call("mvn", in_memory),
        "mvn_disk": novel_call("mvn", stored),
    }
    for fn in calls.values():
      fn()  # compiles
    for name in ("cached_memory", "mvn_memory"):
      row[name] = timings(calls[name], repeats, min_total_s=min_total_s)
    # Input kinds, directly through the certifier (same rows, same result).
    numpy_draws = cached_ovc.EmbeddingDraws(np.array(selection),
                                            np.array(estimation))
    mapped = lambda: cached_ovc.EmbeddingDraws(
        np.load(npy["selection"], mmap_mode="r"),
        np.load(npy["estimation"], mmap_mode="r"))
    kinds = {"jax": lambda: draws, "numpy": lambda: numpy_draws,
             "memmap_warm": mapped}
    results = {}
    for name, make in kinds.items():
      held = make()
      smoothing = cached_smoothing(held, config)
      results[name] = cached_ovc.certify_cached(held, novel, smoothing)
      row[f"cached_input_{name}"] = timings(
          lambda: cached_ovc.certify_cached(held, novel, smoothing), repeats,
          min_total_s=min_total_s)
      del held  # a memory map must go before its pages can be dropped
    row["inputs_identical"] = all(
        r.prediction == results["jax"].prediction
        and np.array_equal(r.counts, results["jax"].counts)
        for r in results.values())
    del numpy_draws
    # Warm disk, then cold disk (page cache dropped before each run).
    row["cached_disk_warm"] = timings(calls["cached_disk"], repeats,
                                      min_total_s=min_total_s)
    row["mvn_disk_warm"] = timings(calls["mvn_disk"], repeats,
                                   min_total_s=min_total_s)
    cold = {"cached_disk_cold": [], "cached_read_path_cold": [],
            "mvn_disk_cold": []}
    resident = []
    for _ in range(repeats):
      disk_gbps.append(disk_read_gbps(disk_file))
      drop_from_page_cache(files["embeddings"])
      resident.append(resident_fraction(files["embeddings"]))
      cold["cached_disk_cold"].append(min_seconds(calls["cached_disk"], 1))
      drop_from_page_cache(files["embeddings"])
      source = mapped()
      smoothing = cached_smoothing(source, config)
      cold["cached_read_path_cold"].append(min_seconds(
          lambda: cached_ovc.certify_cached(source, novel, smoothing), 1))
      del source
      drop_from_page_cache(files["gaussian"])
      cold["mvn_disk_cold"].append(min_seconds(calls["mvn_disk"], 1))
    for name, times in cold.items():
      row[name] = {"min_s": min(times), "median_s": statistics.median(times)}
    fractions = [r for r in resident if r is not None]
    row["resident_before_cold"] = max(fractions) if fractions else None

    # Standard RS at n0 + large.n: measured, or scaled from two n, each the
    # least of large.standard_repeats runs, interleaved.
    main = entry["classes"][str(classes)]
    second_n = standard_second_n(config, entry.get("encoder_images_per_s"))
    if config.n >= n:
      row["standard_s"] = main["standard_rs_s"]
      row["standard_scaled"] = False
    else:
      at = {m: dataclasses.replace(ctx["params"],
                                   smoothing=ctx["params"].smoothing.replace(n=m))
            for m in ((second_n,) if second_n >= n else (config.n, second_n))}
      std_calls = {m: (lambda p=p: ovc.certify_novel_prompt(
          "standard", ctx["classifier"], backbone.params, x, key,
          ctx["source"], novel, p)) for m, p in at.items()}
      for fn in std_calls.values():
        fn()  # compiles
      std_times = {m: [] for m in std_calls}
      for _ in range(int(large.standard_repeats)):
        for m, fn in std_calls.items():
          std_times[m].append(min_seconds(fn, 1))
      std_min = {m: min(t) for m, t in std_times.items()}
      row["standard_times"] = {str(m): t for m, t in std_times.items()}
    if config.n >= n:
      pass  # measured in the main section
    elif second_n >= n:
      row["standard_s"] = std_min[second_n]
      row["standard_scaled"] = False
    else:
      n_a, t_a = n0 + config.n, std_min[config.n]
      n_b, t_b = n0 + second_n, std_min[second_n]
      per_sample = (t_b - t_a) / (n_b - n_a)
      fixed = t_a - per_sample * n_a
      if per_sample <= 0:  # noise swamped the difference: per sample at n_b
        per_sample, fixed = t_b / n_b, 0.0
      row["standard_fit"] = {"points": [[n_a, t_a], [n_b, t_b]],
                             "per_sample_s": per_sample, "fixed_s": fixed}
      row["standard_s"] = fixed + per_sample * (n0 + n)
      row["standard_scaled"] = True
    # A cross-check the fit can be read against: the encoder's own rate.
    if entry.get("encoder_images_per_s"):
      row["standard_s_from_encoder_rate"] = (
          (n0 + n) / entry["encoder_images_per_s"] * main["sampler_overhead"])
    std = row["standard_s"]
    for name in ("cached_memory", "cached_disk_warm", "cached_disk_cold",
                 "mvn_memory", "mvn_disk_warm", "mvn_disk_cold"):
      row[f"speedup_{name}"] = std / row[name]["min_s"]
    row["mvn_over_cached_memory"] = (row["mvn_memory"]["min_s"]
                                     / row["cached_memory"]["min_s"])

    # Roofline: what each call reads and computes.
    cache_bytes = (n0 + n) * d * 4
    latent_samples = (-(-n0 // mvn_ovc.LATENT_BLOCK)
                      + -(-n // mvn_ovc.LATENT_BLOCK)) * mvn_ovc.LATENT_BLOCK
    rank = min(classes, int(fit.factor.shape[1]))
    row["roofline"] = {
        "cached": {"bytes": cache_bytes + classes * d * 4,
                   "flops": 2 * (n0 + n) * d * classes},
        "mvn": {"bytes": (d * d + d + classes * d) * 4,
                "flops": 2 * latent_samples * rank * classes
                         + 2 * classes * d * d,
                "latent_normals": latent_samples * rank},
        "standard": {"flops": (entry.get("flops_per_image") or 0) * (n0 + n)},
    }
    if large.memory and classes == max(config.class_counts):
      # At the largest class count only (at C = 10 the figures are the
      # cache's pages and compilation).
      u_path = os.path.join(root, f"class_embeddings_{classes}.npy")
      np.save(u_path, np.asarray(novel))
      specs = {
          "cached": {"method": "cached", "class_embeddings": u_path,
                     "selection": npy["selection"],
                     "estimation": npy["estimation"]},
          "mvn": {"method": "mvn", "class_embeddings": u_path,
                  "mean": npy["mean"], "factor": npy["factor"], "n": n},
          # Standard RS's memory does not grow with n (counts only): at
          # n = config.n.
          "standard": {"method": "standard", "class_embeddings": u_path,
                       "architecture": backbone.name},
      }
      row["peak_memory"] = peak_memory(
          {method: specs[method] for method in large.memory_methods},
          config.variant)
    out["classes"][str(classes)] = row
  machine["disk_gbps"] = statistics.median(disk_gbps)
  machine["disk_gbps_all"] = disk_gbps
  machine["disk_file_bytes"] = int(large.disk_bytes)
  for classes, row in out["classes"].items():
    rf = row["roofline"]
    cached_s = row["cached_memory"]["min_s"]
    rf["cached"].update(seconds=cached_s, gbps=rf["cached"]["bytes"] / cached_s / 1e9,
                        gflops=rf["cached"]["flops"] / cached_s / 1e9)
    cold_s = row["cached_read_path_cold"]["min_s"]
    rf["cached_cold"] = {"bytes": rf["cached"]["bytes"],
                         "flops": rf["cached"]["flops"], "seconds": cold_s,
                         "gbps": rf["cached"]["bytes"] / cold_s / 1e9,
                         "gflops": rf["cached"]["flops"] / cold_s / 1e9}
    mvn_s = row["mvn_memory"]["min_s"]
    rf["mvn"].update(seconds=mvn_s, gbps=rf["mvn"]["bytes"] / mvn_s / 1e9,
                     gflops=rf["mvn"]["flops"] / mvn_s / 1e9)
    rf["standard"].update(seconds=row["standard_s"],
                          gflops=rf["standard"]["flops"] / row["standard_s"] / 1e9)
    rf["fractions"] = {
        "cached_memory_of_memory_bw": rf["cached"]["gbps"] / machine["memory_gbps"],
        "cached_cold_of_disk": rf["cached_cold"]["gbps"] / machine["disk_gbps"],
        "cached_of_matmul": rf["cached"]["gflops"] / machine["matmul_gflops"],
        "mvn_of_matmul": rf["mvn"]["gflops"] / machine["matmul_gflops"],
    }
  os.remove(disk_file)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(root, ignore_errors=True)
  return out
