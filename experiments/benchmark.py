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
alone). Writes DIR/benchmark.json and prints a table.
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
_MEMORY_CHILD = flags.DEFINE_string(
    "memory_child", None, "Internal: the peak memory of one method (JSON spec).")

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


def standard_second_n(config, images_per_s: float | None) -> int:
  """The n of standard RS's second timing for the large-n fit."""
  n = int(config.large.standard_n)
  if images_per_s:
    n = max(n, int(images_per_s * config.large.standard_seconds) - config.n0)
  return min(n, int(config.large.n))


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
  context = {"novel": novel, "classifier": classifier, "params": params,
             "key": key, "source": source,
             "real_embeddings": known_result.caches.embedding_draws.estimation}
  return out, context


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
  standard.certify(key, classifier, params, x, smoothing)
  first = time.perf_counter() - start
  start = time.perf_counter()
  standard.certify(key, classifier, params, x, smoothing)
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


# ---------------------------------------------------------------------------
# The n = 100,000 section: Cached-OVC and MVN-OVC at Cohen's n, standard RS
# scaled to it, a roofline, peak memory.

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
DISK_READ_CHUNK = 16 << 20


def _libc():
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_int, ctypes.c_int, ctypes.c_long)
  libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
  libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
  return libc


def drop_from_page_cache(paths) -> None:
  """Evicts files from the page cache. Pages still mapped stay (so the
  garbage that may hold memory maps is collected first), and so do dirty
  ones (so the files are synced first)."""
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # dirty pages (a cache just written) cannot be dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def resident_fraction(paths) -> float | None:
  """The fraction of the files' pages in the page cache (mincore), or None
  where that cannot be asked."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import mmap  # pylint: disable=g-import-not-at-top
  libc = _libc()
  if libc is None or not sys.platform.startswith("linux"):
    return None
  page = mmap.PAGESIZE
  resident = total = 0
  for path in paths:
    size = os.path.getsize(path)
    if not size:
      continue
    fd = os.open(path, os.O_RDONLY)
    try:
      address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if address in (None, ctypes.c_void_p(-1).value):
        return None
      try:
        pages = -(-size // page)
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, vec) != 0:
          return None
        resident += sum(b & 1 for b in vec.raw[:pages])
        total += pages
      finally:
        libc.munmap(address, size)
    finally:
      os.close(fd)
  return resident / total if total else None


def disk_read_gbps(path: str) -> float:
  """GB/s of one cold sequential read of `path` in DISK_READ_CHUNK reads."""
  drop_from_page_cache([path])
  buf = bytearray(DISK_READ_CHUNK)
  view = memoryview(buf)
  fd = os.open(path, os.O_RDONLY)
  total = 0
  try:
    start = time.perf_counter()
    while (got := os.readv(fd, [view])) > 0:
      total += got
    seconds = time.perf_counter() - start
  finally:
    os.close(fd)
  return total / seconds / 1e9


def write_disk_test_file(path: str, nbytes: int) -> None:
  rng = np.random.default_rng(0)
  with open(path, "wb") as f:
    left = nbytes
    while left > 0:
      block = rng.integers(0, 2**63, size=min(left, 64 << 20) // 8,
                           dtype=np.int64)
      f.write(block.tobytes())
      left -= block.nbytes
    f.flush()
    os.fsync(f.fileno())


def cached_smoothing(draws, config):
  """The SmoothingParams a cache of these rows was drawn with (Cached-OVC
  checks its n0 and n against the rows)."""
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  return SmoothingParams(sigma=config.sigma, n0=int(np.shape(draws.selection)[0]),
                         n=int(np.shape(draws.estimation)[0]),
                         alpha=config.alpha)


def min_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Least wall time of fn() over repeats: what the code costs when the
  shared machine lets it run (the benchmark's medians are kept beside)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def timings(fn: Callable[[], Any], repeats: int, *, min_total_s: float = 1.0,
            max_repeats: int = 50) -> dict:
  """Least and median wall time of fn() over `repeats` calls, or more (up to
  max_repeats) until min_total_s have passed: a cheap call is repeated until
  the least of its times is not just the luck of the shared machine."""
  times = []
  while (len(times) < repeats
         or (sum(times) < min_total_s and len(times) < max_repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"min_s": min(times), "median_s": statistics.median(times),
          "repeats": len(times)}


def synthetic_embeddings(real: jax.Array, n: int, key: jax.Array) -> jax.Array:
  """n L2-normalised draws from the Gaussian fit of real embeddings [m, d]."""
  from ovc_jax.certifiers import mvn_ovc  # pylint: disable=g-import-not-at-top
  fit = mvn_ovc.fit_gaussian(real)

  @jax.jit
  def draw(k):
    z = fit.mean + jax.random.normal(k, (n, fit.factor.shape[1])) @ fit.factor.T
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  return draw(key)


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


def memory_child(spec: dict) -> None:
  """In a fresh process: the peak memory one call of a method adds."""
  from ovc_jax import ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc, mvn_ovc, standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
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


def peak_memory(specs: dict[str, dict]) -> dict[str, dict | None]:
  """{method: the figures of memory_child} for each spec, in child processes
  run side by side (each measures its own memory; nothing here is timed)."""
  if not os.path.exists("/proc/self/status"):
    return {method: None for method in specs}
  procs = {
      method: subprocess.Popen(
          [sys.executable, "-m", "experiments.benchmark",
           f"--memory_child={json.dumps(spec)}",
           f"--config={_CONFIG_PATH}:{_CONFIG.value.variant}"]
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
      row[name] = timings(calls[name], repeats)
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
          lambda: cached_ovc.certify_cached(held, novel, smoothing), repeats)
      del held  # a memory map must go before its pages can be dropped
    row["inputs_identical"] = all(
        r.prediction == results["jax"].prediction
        and np.array_equal(r.counts, results["jax"].counts)
        for r in results.values())
    del numpy_draws
    # Warm disk, then cold disk (page cache dropped before each run).
    row["cached_disk_warm"] = timings(calls["cached_disk"], repeats)
    row["mvn_disk_warm"] = timings(calls["mvn_disk"], repeats)
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
          {method: specs[method] for method in large.memory_methods})
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


TARGETS = (
    # (field, architecture, classes, comparison, value)
    ("speedup_cached", "ViT-B-32", 1000, ">=", 1000.0),
    ("speedup_mvn", "ViT-B-32", 1000, ">=", 1000.0),
    ("cache_bytes_mvn", "ViT-B-32", 1000, "<=", 1.1e6),
    ("sampler_overhead", "ViT-B-32", 1000, "<=", 1.05),
)


LARGE_TARGETS = (
    # (label, architecture, classes, value(row) -> float, comparison, bound)
    ("MVN-OVC / Cached-OVC time, in memory", "ViT-B-32", 10,
     lambda r: r["mvn_over_cached_memory"], "<=", 0.5),
    ("MVN-OVC / Cached-OVC time, in memory", "ViT-B-32", 1000,
     lambda r: r["mvn_over_cached_memory"], "<=", 0.5),
    ("Cached-OVC in memory, fraction of the numpy sum-read bandwidth",
     "ViT-B-32", 10,
     lambda r: r["roofline"]["fractions"]["cached_memory_of_memory_bw"],
     ">=", 0.7),
    ("Cached-OVC read path from a cold cache, fraction of the disk's "
     "sequential read speed", "ViT-B-32", 10,
     lambda r: r["roofline"]["fractions"]["cached_cold_of_disk"], ">=", 0.7),
    ("Cached-OVC in memory, fraction of the matmul's FLOP rate", "ViT-B-32",
     1000, lambda r: r["roofline"]["fractions"]["cached_of_matmul"], ">=", 0.5),
    ("numpy input / jax input time (Cached-OVC)", "ViT-B-32", 10,
     lambda r: r["cached_input_numpy"]["min_s"] / r["cached_input_jax"]["min_s"],
     "<=", 1.2),
    ("warm memory map / jax input time (Cached-OVC)", "ViT-B-32", 10,
     lambda r: (r["cached_input_memmap_warm"]["min_s"]
                / r["cached_input_jax"]["min_s"]), "<=", 1.2),
    ("speedup of Cached-OVC (in memory) at n = 100,000", "ViT-B-32", 1000,
     lambda r: r["speedup_cached_memory"], ">=", 5000.0),
    ("speedup of MVN-OVC / speedup of Cached-OVC (in memory)", "ViT-B-32",
     1000, lambda r: r["speedup_mvn_memory"] / r["speedup_cached_memory"],
     ">=", 2.0),
)


def benchmark_batched(config) -> dict:
  """B toy test images certified in one jit(vmap(core.certify)) call against
  a Python loop over standard.certify, same keys, same SmoothingParams, at
  each noise batch size of batched.batch_sizes.

  Both sides are compiled first (not timed); each is then timed as the
  median of batched.repeats runs. The loop is what a user writes without the
  core: one host call per input, each a compiled sampler call, a read-back
  and scipy's bound. The check columns compare the two input by input.
  """
  from ovc_jax import datasets, models, preprocessing, sampler, zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import core, standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  cfg = config.batched
  clip = models.load_clip("toy", dtype=config.dtype)
  test = datasets.load_dataset("toy")
  count = int(cfg.inputs)
  xs = jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(test.images[:count], jnp.float32) / 255, clip.preprocess)
  keys = jax.vmap(lambda i: sampler.input_key(config.seed, i))(
      jnp.arange(count))
  classifier = EmbeddingClassifier(clip.model.embed_images)
  params = classifier.params(clip.params, zeroshot.class_embeddings(
      clip, "a photo of a {}.", test.class_names))
  rows = {}
  for batch_size in cfg.batch_sizes:
    smoothing = SmoothingParams(sigma=config.sigma, n0=int(cfg.n0),
                                n=int(cfg.n), alpha=config.alpha,
                                batch_size=int(batch_size))
    certify_batch = jax.jit(jax.vmap(
        lambda x, key, s=smoothing: core.certify(key, classifier, params, x,
                                                 s)))

    def loop(s=smoothing):
      return [standard.certify(keys[i], classifier, params, xs[i], s)
              for i in range(count)]

    batched = jax.device_get(certify_batch(xs, keys))  # compiles
    host = loop()  # compiles the sampler's program
    batched_s = median_seconds(lambda f=certify_batch: f(xs, keys),
                               cfg.repeats)
    loop_s = median_seconds(loop, cfg.repeats)
    gaps = [c.radius - float(batched.radius[i]) for i, c in enumerate(host)]
    rows[str(batch_size)] = {
        "batch_size": int(batch_size),
        "samples_per_step_batched": count * int(batch_size),
        "batched_s": batched_s, "loop_s": loop_s,
        "speedup": loop_s / batched_s,
        "same_counts": all(np.array_equal(batched.counts[i], c.counts)
                           for i, c in enumerate(host)),
        "same_predictions": all(int(batched.prediction[i]) == c.prediction
                                for i, c in enumerate(host)),
        "max_radius_gap": max(gaps),
        "radius_within_tolerance": all(
            0.0 <= gap <= core.radius_tolerance(smoothing, c.pA_lower)
            for gap, c in zip(gaps, host)),
        "certified": sum(c.prediction >= 0 for c in host),
    }
  return {"inputs": count, "n0": int(cfg.n0), "n": int(cfg.n),
          "rows": rows}


def print_batched(report: dict, stream=sys.stdout) -> None:
  w = stream.write
  w(f"\nbatched certification: {report['inputs']} toy inputs, "
    f"n0={report['n0']}, n={report['n']}; one jit(vmap(core.certify)) call "
    "against a loop over standard.certify (seconds for all inputs)\n")
  w(f"{'noise batch':>12} {'per step':>9} {'batched_s':>10} {'loop_s':>10} "
    f"{'speedup':>8}  checks\n")
  for row in report["rows"].values():
    checks = ("same counts and predictions, radius within tolerance"
              if row["same_counts"] and row["same_predictions"]
              and row["radius_within_tolerance"] else "DIFFERENT")
    w(f"{row['batch_size']:>12} {row['samples_per_step_batched']:>9} "
      f"{row['batched_s']:>10.3f} {row['loop_s']:>10.3f} "
      f"{row['speedup']:>7.2f}x  {checks} (largest radius gap "
      f"{row['max_radius_gap']:.1e}; {row['certified']} of "
      f"{report['inputs']} certified)\n")


def check_targets(report: dict) -> list[dict]:
  checks = []
  for label, arch, classes, value, op, bound in LARGE_TARGETS:
    row = report.get("large", {}).get(arch, {}).get("classes", {}).get(
        str(classes))
    if row is None:
      continue
    got = float(value(row))
    met = got >= bound if op == ">=" else got <= bound
    checks.append({"target": f"{label} {op} {bound:g} ({arch}, {classes} "
                             f"classes, n = {report['large_n']:,})",
                   "measured": got, "met": bool(met)})
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
  if report.get("large"):
    print_large(report, stream)
  if report.get("batched"):
    print_batched(report["batched"], stream)
  w("\ntargets:\n")
  for check in report["targets"]:
    w(f"  [{'met' if check['met'] else 'MISSED'}] {check['target']}: "
      f"measured {check['measured']:.4g}\n")


def print_large(report: dict, stream=sys.stdout) -> None:
  """The n = large.n section's tables."""
  w = stream.write
  n = report["large_n"]
  scaled_rows = [(arch, row) for arch, entry in report["large"].items()
                 for row in entry["classes"].values()
                 if row.get("standard_scaled")]
  scaled = bool(scaled_rows)
  w(f"\nn = {n:,} section (n0 = {report['n0']}): seconds per input for a new "
    "prompt, least of repeats (medians in benchmark.json), compilation "
    "excluded.\n")
  for arch in dict(scaled_rows):
    pts = dict(scaled_rows)[arch]["standard_fit"]["points"]
    w(f"{arch}: standard RS is SCALED, not measured: t = a + b (n0 + n) "
      f"fitted through n0 + n = {pts[0][0]} and {pts[1][0]}, evaluated at "
      f"n0 + n = {report['n0'] + n:,}.\n")
  for arch in report["large"]:
    if arch not in dict(scaled_rows):
      w(f"{arch}: standard RS measured at n = {n:,}.\n")
  w("Cached-OVC / MVN-OVC caches: n = " f"{n:,} Gaussian-fit draws of the "
    "architecture's real noisy embeddings (time depends on n, d, C only). "
    "MVN-OVC is approximate, not a certificate.\n")
  cols = (("standard RS" + (" (scaled*)" if scaled else ""), lambda r: r["standard_s"], ".4g"),
          ("(encoder-rate est.)", lambda r: r.get("standard_s_from_encoder_rate"), ".4g"),
          ("Cached mem", lambda r: r["cached_memory"]["min_s"], ".4g"),
          ("Cached warm", lambda r: r["cached_disk_warm"]["min_s"], ".4g"),
          ("Cached cold", lambda r: r["cached_disk_cold"]["min_s"], ".4g"),
          ("MVN mem", lambda r: r["mvn_memory"]["min_s"], ".4g"),
          ("MVN warm", lambda r: r["mvn_disk_warm"]["min_s"], ".4g"),
          ("MVN cold", lambda r: r["mvn_disk_cold"]["min_s"], ".4g"),
          ("x Cached mem", lambda r: r["speedup_cached_memory"], ".4g"),
          ("x Cached cold", lambda r: r["speedup_cached_disk_cold"], ".4g"),
          ("x MVN mem", lambda r: r["speedup_mvn_memory"], ".4g"),
          ("MVN/Cached", lambda r: r["mvn_over_cached_memory"], ".3f"))

  def table(columns, rows):
    w(f"{'architecture':12} {'C':>5} " + " ".join(f"{c[0]:>20}" for c in columns) + "\n")
    for arch, classes, row in rows:
      cells = []
      for _, get, fmt in columns:
        try:
          value = get(row)
        except (KeyError, TypeError):
          value = None
        cells.append(f"{'-' if value is None else format(value, fmt):>20}")
      w(f"{arch:12} {classes:>5} " + " ".join(cells) + "\n")

  rows = [(arch, classes, row) for arch, entry in report["large"].items()
          for classes, row in entry["classes"].items()]
  table(cols, rows)
  w("\n(warm/cold: through ovc.StoredCaches, whose CRC-32 check reads every "
    "byte; 'x': speedup over standard RS; encoder-rate est.: (n0 + n) / "
    "encoder img/s x sampler overhead at n, a cross-check of the fit, not "
    "used)\n")
  w("\nCached-OVC by input kind (certify_cached, seconds, least of repeats):\n")
  table((("jax array", lambda r: r["cached_input_jax"]["min_s"], ".4g"),
         ("numpy array", lambda r: r["cached_input_numpy"]["min_s"], ".4g"),
         ("memmap warm", lambda r: r["cached_input_memmap_warm"]["min_s"], ".4g"),
         ("memmap cold", lambda r: r["cached_read_path_cold"]["min_s"], ".4g"),
         ("same counts", lambda r: str(r["inputs_identical"]), ""),
         ("resident@cold", lambda r: r["resident_before_cold"], ".3f")), rows)
  w("\nroofline (this machine, this run):\n")
  for arch, entry in report["large"].items():
    m = entry["machine"]
    w(f"  {arch} (d = {entry['embed_dim']}): memory {m['memory_gbps']:.2f} GB/s "
      f"(numpy sum-read of the {(entry['n']) * entry['embed_dim'] * 4 / 1e6:.0f} "
      f"MB cache), disk {m['disk_gbps']:.2f} GB/s (sequential read, cold, "
      f"{m['disk_file_bytes'] >> 20} MiB file, median of "
      f"{len(m['disk_gbps_all'])}: "
      + ", ".join(f"{v:.2f}" for v in m["disk_gbps_all"])
      + f"), matmul {m['matmul_gflops']:.1f} GFLOP/s (XLA "
      f"[{m['matmul_shape'][0]}, {m['matmul_shape'][1]}] x "
      f"[{m['matmul_shape'][1]}, {m['matmul_shape'][2]}])\n")
  w(f"{'architecture':12} {'C':>5} {'method':>22} {'MB read':>10} {'GFLOP':>9} "
    f"{'seconds':>10} {'GB/s':>8} {'GFLOP/s':>9} {'of mem bw':>10} "
    f"{'of disk':>8} {'of matmul':>10}\n")
  for arch, classes, row in rows:
    rf = row["roofline"]
    m = report["large"][arch]["machine"]
    for name, label in (("cached", "Cached-OVC memory"),
                        ("cached_cold", "Cached-OVC cold disk"),
                        ("mvn", "MVN-OVC memory"),
                        ("standard", "standard RS" + (" (scaled)" if row.get("standard_scaled") else ""))):
      r = rf[name]
      gbps = r.get("gbps")
      num = lambda v, width, fmt: (f"{'-':>{width}}" if v is None
                                   else f"{v:{width}{fmt}}")
      w(f"{arch:12} {classes:>5} {label:>22} "
        + num(r["bytes"] / 1e6 if "bytes" in r else None, 10, ".1f") + " "
        + num(r["flops"] / 1e9, 9, ".1f") + " "
        + num(r["seconds"], 10, ".4g") + " " + num(gbps, 8, ".2f") + " "
        + num(r["gflops"], 9, ".1f") + " "
        + num(gbps / m["memory_gbps"] if gbps else None, 10, ".2f") + " "
        + num(gbps / m["disk_gbps"] if gbps else None, 8, ".2f") + " "
        + num(r["gflops"] / m["matmul_gflops"], 10, ".2f") + "\n")
  w("(MVN-OVC also draws "
    + ", ".join(f"{arch} C={classes}: {row['roofline']['mvn']['latent_normals'] / 1e6:.1f}M"
                for arch, classes, row in rows)
    + " latent normals)\n")
  if any(row.get("peak_memory") for _, _, row in rows):
    w("\npeak memory, MB (fresh child process per method; first call incl. "
      "compilation and mapped cache pages / a second call):\n")

    def mb(row, method, which):
      entry = (row.get("peak_memory") or {}).get(method)
      return None if not entry else entry[which]["peak_added_bytes"] / 1e6

    table(tuple((f"{meth} {which}", (lambda r, m=meth, k=which: mb(r, m, k)), ".1f")
                for meth in ("cached", "mvn", "standard")
                for which in ("first", "warm")), rows)


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
  if _MEMORY_CHILD.value:
    memory_child(json.loads(_MEMORY_CHILD.value))
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
  if config.large.enabled:
    report["large_notes"] = dict(LARGE_NOTES)
    report["large_n"] = int(config.large.n)
  steps = (len(config.architectures) * (len(config.class_counts) + 1)
           + (len(config.large.architectures) if config.large.enabled else 0)
           + int(config.batched.enabled))
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
  report["targets"] = check_targets(report)
  common.write_json(os.path.join(workdir, "benchmark.json"), report)
  draw_speedups(report, os.path.join(workdir, "speedup.png"))
  print_table(report)
  sys.stdout.write(f"\nwrote {os.path.join(workdir, 'benchmark.json')} and "
                   f"{os.path.join(workdir, 'speedup.png')}\n")


if __name__ == "__main__":
  common.run_app(main)
