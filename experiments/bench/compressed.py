"""The compressed-cache section: bytes, ambiguous rows, and Cached-OVC's time
from memory and from a cold disk, int8 and int16 against float32."""

from __future__ import annotations

import os
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.backbone import load_backbone
from experiments.bench.backbone import benchmark_input
from experiments.bench.backbone import unit_rows
from experiments.bench.disk import disk_read_gbps
from experiments.bench.disk import drop_from_page_cache
from experiments.bench.disk import write_disk_test_file
from experiments.bench.large import synthetic_embeddings
from experiments.bench.timing import min_seconds
from experiments.bench.timing import timings

# The paper's full setting, per backbone: 500 inputs x 4 sigmas, each
# n0 + n = 100 + 100,000 rows of the backbone's embedding size.
PAPER_BACKBONES = {"ViT-B/32": 512, "ViT-B/16": 512, "ViT-L/14": 768,
                   "RN50": 1024, "RN101": 512, "RN50x4": 640}
PAPER_INPUTS, PAPER_SIGMAS, PAPER_N0, PAPER_N = 500, 4, 100, 100_000

COMPRESSED_NOTES = {
    "bytes": "array bytes per input and sigma (both streams): float32 rows, "
             "or per stream a float32 mean [d] and per row a float32 step, a "
             "float32 bound and d int8/int16 codes (cache_codec); file "
             "headers and metadata (a few hundred bytes) not included",
    "toy_real": "the toy CLIP's own noisy embeddings of compressed.toy_inputs "
                "toy test images (sampler, key per input), n0 + "
                "compressed.toy_n rows per input and sigma. C = 10: the toy "
                "default prompt ('a photo of a {}.'); C = 1000: random unit "
                "class vectors (the toy world has 10 classes), like the speed "
                "sections' novel prompt",
    "ambiguous": "share of all rows (selection and estimation) whose class "
                 "the compressed row leaves in doubt; the share of the worst "
                 "input beside the mean",
    "regeneration": "encoder_rows: rows regenerated per input (all prompts "
                    "share them); encoder_passes: what that costs, each "
                    "stream's rows in whole batches of batch_size (the "
                    "standard run's shape), as a share of n0 + n",
    "identical": "regenerate mode (cached_ovc.encoder_regenerator on the toy "
                 "CLIP) against standard RS's certificate from the same draws, "
                 "every input, sigma and format, C = 10",
    "synthetic": "rows drawn from a Gaussian fit of the architecture's real "
                 "noisy embeddings (random weights, config.n rows at "
                 "config.sigma), L2-normalised, as the n = 100,000 section "
                 "builds them; class vectors random unit rows. A Gaussian fit "
                 "of a few hundred rows has no heavy-tailed coordinates, so "
                 "the codes' step (the largest residual coordinate) and the "
                 "logit gaps of random class vectors need not be those of real "
                 "CLIP embeddings and prompts: their ambiguous shares are "
                 "indicative only; their bytes are exact (they depend on d). "
                 "For the toy (ci), the fit is of its own rows above (the "
                 "first input at the first of toy_sigmas)",
    "timing": "cached_ovc.certify_cached on memory-mapped .npy files (codes "
              "memory-mapped, the small arrays read whole), conservative mode "
              "(the synthetic rows are not an encoder's output, so they cannot "
              "be regenerated; regenerate_s_estimate adds the encoder passes "
              "their ambiguous rows would cost at this encoder's measured "
              "rate). memory: arrays in memory, least of repeats; cold: right "
              "after dropping the format's files from the page cache, each "
              "format in turn in every repeat",
}


def _bytes_per_input(rows: int, d: int, fmt: str, streams: int = 2) -> int:
  """Array bytes of `rows` rows in `streams` streams (see the notes)."""
  if fmt == "float32":
    return rows * d * 4
  code = {"int16": 2, "int8": 1}[fmt]
  return rows * (d * code + 8) + streams * d * 4


def storage_table(formats) -> dict:
  """The paper's full settings per backbone and format, in bytes."""
  rows = PAPER_N0 + PAPER_N
  out = {}
  for name, d in PAPER_BACKBONES.items():
    per = {fmt: _bytes_per_input(rows, d, fmt) for fmt in ("float32",
                                                           *formats)}
    out[name] = {"embed_dim": d,
                 **{fmt: per[fmt] * PAPER_INPUTS * PAPER_SIGMAS
                    for fmt in per}}
  out["total"] = {fmt: sum(v[fmt] for k, v in out.items() if k != "total")
                  for fmt in ("float32", *formats)}
  return out


def _nbytes(cache) -> int:
  return sum(int(r.nbytes) for r in cache)


def _ambiguity(compressed, class_embeddings, batch_size: int) -> dict:
  """Ambiguous rows of one cache for one prompt, and the regeneration cost."""
  from ovc_jax.certifiers import cached_ovc  # pylint: disable=g-import-not-at-top
  ambiguous = passes = 0
  for rows in compressed:
    m = int(rows.codes.shape[0])
    k = int(cached_ovc.count_predictions_bounded(
        rows, class_embeddings).ambiguous.sum())
    ambiguous += k
    chunk = min(batch_size, m)
    passes += -(-k // chunk) * chunk
  return {"ambiguous": ambiguous, "passes": passes}


def _toy_real(config) -> tuple[dict, dict]:
  """Bytes, ambiguous shares and regeneration on the toy CLIP's own rows;
  and, for the timing part, the toy's rows at the first sigma and its
  encoder's rate (images/s through the sampler)."""
  from ovc_jax import certificates, datasets, models, preprocessing, sampler, zeroshot  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  cfg = config.compressed
  clip = models.load_clip("toy", dtype=config.dtype)
  test = datasets.load_dataset("toy")
  classifier = EmbeddingClassifier(clip.model.embed_images)
  d = int(clip.model.config.embed_dim)
  prompts = {10: zeroshot.class_embeddings(clip, "a photo of a {}.",
                                           test.class_names)}
  for classes in config.class_counts:
    if classes != 10:
      prompts[classes] = unit_rows(jax.random.key(config.seed + 11),
                                   (classes, d))
  params = classifier.params(clip.params, prompts[10])
  n0, n, batch = int(config.n0), int(cfg.toy_n), int(config.batch_size)
  rows = n0 + n
  count = int(cfg.toy_inputs)
  xs = jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(test.images[:count], jnp.float32) / 255, clip.preprocess)
  out = {"inputs": count, "n0": n0, "n": n, "embed_dim": d, "sigmas": {}}
  toy = {}
  for sigma in cfg.toy_sigmas:
    smoothing = SmoothingParams(sigma=float(sigma), n0=n0, n=n,
                                alpha=config.alpha, batch_size=batch)
    per_fmt = {fmt: {"bytes": [], "bound_median": [], "identical": [],
                     "classes": {str(c): {"ambiguous": [], "passes": [],
                                          "encoder_rows": []}
                                 for c in prompts}}
               for fmt in cfg.formats}
    f32_bytes = []
    for i in range(count):
      key = sampler.input_key(config.seed, i)
      run = lambda x=xs[i], k=key, s=float(sigma): (
          sampler.sample_certification_draws(
              classifier, params, x, k, sigma=s, num_classes=10, n0=n0, n=n,
              batch_size=batch, outputs=("counts", "embeddings")))
      draws = jax.block_until_ready(run())
      if not toy:  # compiled: the encoder's rate, and rows for the timing
        toy = {"rows": draws.estimation["embeddings"],
               "images_per_s": rows / min_seconds(run, 1)}
      reference = certificates.certificates_from_counts(
          draws.selection["counts"], draws.estimation["counts"], n=n,
          sigma=float(sigma), alpha=config.alpha)[0]
      cache = cached_ovc.embeddings_from_draws(draws)
      f32_bytes.append(_nbytes(cache))
      regenerate = cached_ovc.encoder_regenerator(classifier, params, xs[i],
                                                  key, smoothing)
      for fmt in cfg.formats:
        compressed = cached_ovc.compress_draws(cache, fmt)
        entry = per_fmt[fmt]
        entry["bytes"].append(sum(r.nbytes for r in compressed))
        entry["bound_median"].append(float(np.median(np.concatenate(
            [r.bound for r in compressed]))))
        for classes, u in prompts.items():
          amb = _ambiguity(compressed, u, batch)
          c = entry["classes"][str(classes)]
          c["ambiguous"].append(amb["ambiguous"] / rows)
          c["passes"].append(amb["passes"])
          c["encoder_rows"].append(amb["ambiguous"])
        cert = cached_ovc.certify_cached(compressed, prompts[10], smoothing,
                                         regenerate=regenerate)
        entry["identical"].append(bool(
            cert.prediction == reference.prediction
            and cert.radius == reference.radius
            and cert.pA_lower == reference.pA_lower
            and np.array_equal(cert.counts, reference.counts)))
    f32 = statistics.mean(f32_bytes)
    row = {"rows_per_input": rows, "float32_bytes": f32}
    for fmt, entry in per_fmt.items():
      nbytes = statistics.mean(entry["bytes"])
      row[fmt] = {
          "bytes": nbytes, "ratio": nbytes / f32,
          "bound_median": statistics.median(entry["bound_median"]),
          "identical_to_standard": all(entry["identical"]),
          "classes": {c: {"ambiguous_share": statistics.mean(v["ambiguous"]),
                          "ambiguous_share_max": max(v["ambiguous"]),
                          "encoder_rows": statistics.mean(v["encoder_rows"]),
                          "encoder_passes": statistics.mean(v["passes"]),
                          "encoder_pass_share":
                              statistics.mean(v["passes"]) / rows}
                      for c, v in entry["classes"].items()}}
    out["sigmas"][f"{float(sigma):g}"] = row
  return out, toy


def _real_rows(backbone, x, config):
  """config.n real noisy embeddings of the backbone at config.sigma, and its
  encoder's rate through the sampler (images/s, compilation excluded)."""
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  classifier = EmbeddingClassifier(backbone.model.embed_images)
  d = int(backbone.model.config.embed_dim)
  params = classifier.params(backbone.params, unit_rows(jax.random.key(1),
                                                        (10, d)))
  key = sampler.input_key(config.seed, 0)

  def draw():
    return sampler.sample_under_noise(
        classifier, params, x, key, num_samples=int(config.n),
        sigma=config.sigma, batch_size=int(config.batch_size),
        outputs=("embeddings",))["embeddings"]

  rows = jax.block_until_ready(draw())  # compiles
  seconds = min_seconds(draw, 1)
  return rows, int(config.n) / seconds


def _save(directory: str, cache) -> list[str]:
  """The cache's arrays as .npy files (float32 rows, or each
  CompressedRows field); returns the paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for stream, rows in zip(("selection", "estimation"), cache):
    arrays = ({"rows": rows} if isinstance(rows, np.ndarray)
              else rows._asdict())
    for field, array in arrays.items():
      path = os.path.join(directory, f"{stream}_{field}.npy")
      np.save(path, np.asarray(array))
      paths.append(path)
  return paths


def _load(directory: str, fmt: str):
  """The cache as Cached-OVC reads it from disk: the big array memory-mapped."""
  from ovc_jax.cache_codec import CompressedRows  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc  # pylint: disable=g-import-not-at-top
  streams = []
  for stream in ("selection", "estimation"):
    path = lambda field, s=stream: os.path.join(directory, f"{s}_{field}.npy")
    if fmt == "float32":
      streams.append(np.load(path("rows"), mmap_mode="r"))
    else:
      streams.append(CompressedRows(
          np.load(path("mean")), np.load(path("scale")),
          np.load(path("codes"), mmap_mode="r"), np.load(path("bound"))))
  return cached_ovc.EmbeddingDraws(*streams)


def _timing(name: str, config, workdir: str, toy: dict) -> dict:
  """Bytes, ambiguous shares and Cached-OVC's time at large.n on synthetic
  rows of one architecture's shape (the toy's: fitted to its rows above)."""
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import cached_ovc  # pylint: disable=g-import-not-at-top
  cfg = config.compressed
  if name == "toy":
    real, images_per_s = toy["rows"], toy["images_per_s"]
  else:
    backbone = load_backbone(name, config.dtype, config.seed)
    real, images_per_s = _real_rows(backbone, benchmark_input(backbone),
                                    config)
  d = int(real.shape[1])
  n, n0 = int(config.large.n), int(config.n0)
  k_sel, k_est = jax.random.split(jax.random.key(config.seed + 7))
  cache = cached_ovc.EmbeddingDraws(
      np.asarray(synthetic_embeddings(real, n0, k_sel)),
      np.asarray(synthetic_embeddings(real, n, k_est)))
  formats = ("float32", *cfg.formats)
  caches = {"float32": cache, **{fmt: cached_ovc.compress_draws(cache, fmt)
                                 for fmt in cfg.formats}}
  root = os.path.join(workdir, "caches_compressed", name)
  directories = {fmt: os.path.join(root, fmt) for fmt in formats}
  files = {fmt: _save(directories[fmt], caches[fmt]) for fmt in formats}
  smoothing = SmoothingParams(sigma=config.sigma, n0=n0, n=n,
                              alpha=config.alpha,
                              batch_size=int(config.batch_size))
  conservative = cached_ovc.CachedParams(ambiguous="conservative")
  out = {"embed_dim": d, "n": n, "n0": n0,
         "encoder_images_per_s": images_per_s,
         "bytes": {fmt: _nbytes(caches[fmt]) for fmt in formats},
         "file_bytes": {fmt: sum(os.path.getsize(f) for f in files[fmt])
                        for fmt in formats},
         "classes": {}}
  out["ratio"] = {fmt: out["bytes"][fmt] / out["bytes"]["float32"]
                  for fmt in formats}
  repeats = int(cfg.repeats)
  disk_file = os.path.join(workdir, "disk_speed_test_compressed.bin")
  write_disk_test_file(disk_file, int(config.large.disk_bytes))
  gbps = []
  for classes in config.class_counts:
    u = unit_rows(jax.random.key(config.seed + 2), (classes, d))
    row = {}
    certs = {}
    for fmt in formats:
      held = caches[fmt]
      certs[fmt] = cached_ovc.certify_cached(held, u, smoothing,
                                             conservative)  # compiles
      row[fmt] = {"memory": timings(
          lambda h=held: cached_ovc.certify_cached(h, u, smoothing,
                                                   conservative), repeats,
          min_total_s=float(cfg.min_total_s))}
    cold = {fmt: [] for fmt in formats}
    for _ in range(repeats):
      gbps.append(disk_read_gbps(disk_file))
      for fmt in formats:
        drop_from_page_cache(files[fmt])
        source = _load(directories[fmt], fmt)
        cold[fmt].append(min_seconds(
            lambda s=source: cached_ovc.certify_cached(s, u, smoothing,
                                                       conservative), 1))
        del source
    rows = n0 + n
    for fmt in formats:
      cert = certs[fmt]
      row[fmt]["cold"] = {"min_s": min(cold[fmt]),
                          "median_s": statistics.median(cold[fmt])}
      row[fmt]["ambiguous_share"] = cert.ambiguous / rows
      if fmt != "float32":
        amb = _ambiguity(caches[fmt], u, int(config.batch_size))
        row[fmt]["encoder_passes"] = amb["passes"]
        row[fmt]["regenerate_s_estimate"] = (
            row[fmt]["cold"]["min_s"] + amb["passes"] / images_per_s)
        for where in ("memory", "cold"):
          row[f"speedup_{fmt}_{where}"] = (row["float32"][where]["min_s"]
                                           / row[fmt][where]["min_s"])
      row[fmt]["radius"] = cert.radius
    row["conservative_radius_at_most_exact"] = all(
        certs[fmt].radius <= certs["float32"].radius for fmt in formats)
    out["classes"][str(classes)] = row
  out["disk_gbps"] = statistics.median(gbps)
  os.remove(disk_file)
  shutil.rmtree(root, ignore_errors=True)
  return out


def benchmark_compressed(config, workdir: str, progress=None) -> dict:
  """The section (see COMPRESSED_NOTES): the toy CLIP's real rows, then the
  timing on synthetic rows of each of compressed.architectures."""
  cfg = config.compressed
  start = time.perf_counter()
  out = {"notes": dict(COMPRESSED_NOTES), "formats": list(cfg.formats),
         "timing": {},
         "storage": storage_table(tuple(cfg.formats)),
         "paper_setting": {"inputs": PAPER_INPUTS, "sigmas": PAPER_SIGMAS,
                           "rows": PAPER_N0 + PAPER_N}}
  out["toy_real"], toy = _toy_real(config)
  if progress is not None:
    progress.update(note="compressed: toy CLIP rows")
  for name in cfg.architectures:
    out["timing"][name] = _timing(name, config, workdir, toy)
    if progress is not None:
      progress.update(note=f"compressed: {name}")
  out["section_s"] = time.perf_counter() - start
  return out


def print_compressed(section: dict, stream) -> None:
  """The section's tables."""
  w = stream.write
  formats = section["formats"]
  toy = section["toy_real"]
  w(f"\nCompressed caches. Toy CLIP's own noisy embeddings ({toy['inputs']} "
    f"inputs, n0 + n = {toy['n0'] + toy['n']:,} rows, d = "
    f"{toy['embed_dim']}): bytes per input and sigma, share of ambiguous "
    "rows (mean over inputs; worst input), encoder passes to regenerate "
    "them; regenerate mode identical to standard RS:\n")
  classes = list(next(iter(toy["sigmas"].values()))[formats[0]]["classes"])
  w(f"{'sigma':>6} {'format':>7} {'bytes':>10} {'ratio':>7} "
    + " ".join(f"{'amb C=' + c:>16} {'passes C=' + c:>13}" for c in classes)
    + f" {'identical':>9}\n")
  for sigma, row in toy["sigmas"].items():
    w(f"{sigma:>6} {'float32':>7} {row['float32_bytes']:>10,.0f} "
      f"{1.0:>7.3f}\n")
    for fmt in formats:
      r = row[fmt]
      cells = " ".join(
          f"{r['classes'][c]['ambiguous_share']:>8.3%} "
          f"({r['classes'][c]['ambiguous_share_max']:>5.2%}) "
          f"{r['classes'][c]['encoder_passes']:>13.0f}" for c in classes)
      w(f"{sigma:>6} {fmt:>7} {r['bytes']:>10,.0f} {r['ratio']:>7.3f} "
        f"{cells} {str(r['identical_to_standard']):>9}\n")
  for name, t in section["timing"].items():
    w(f"\n{name}-shaped synthetic rows (d = {t['embed_dim']}, n = "
      f"{t['n']:,}): ratio "
      + ", ".join(f"{fmt} {t['ratio'][fmt]:.3f}" for fmt in formats)
      + f"; disk {t['disk_gbps']:.2f} GB/s; encoder "
        f"{t['encoder_images_per_s']:.1f} img/s. Cached-OVC seconds "
        "(conservative), least of repeats:\n")
    w(f"{'C':>5} {'format':>7} {'memory':>9} {'cold':>9} {'x memory':>9} "
      f"{'x cold':>7} {'ambiguous':>10} {'passes':>8} {'regen est':>10}\n")
    for c, row in t["classes"].items():
      for fmt in ("float32", *formats):
        r = row[fmt]
        extra = ("" if fmt == "float32" else
                 f"{row[f'speedup_{fmt}_memory']:>9.2f} "
                 f"{row[f'speedup_{fmt}_cold']:>7.2f} "
                 f"{r['ambiguous_share']:>10.3%} {r['encoder_passes']:>8} "
                 f"{r['regenerate_s_estimate']:>10.3g}")
        w(f"{c:>5} {fmt:>7} {r['memory']['min_s']:>9.4g} "
          f"{r['cold']['min_s']:>9.4g} {extra}\n")
  storage = section["storage"]
  w("\nStorage at the paper's full setting (500 inputs x 4 sigmas x 100,100 "
    "rows), GB:\n")
  w(f"{'backbone':>9} {'d':>5} " + " ".join(f"{f:>9}" for f in ("float32",
                                                             *formats)) + "\n")
  for name, row in storage.items():
    d = row.get("embed_dim", "")
    w(f"{name:>9} {d:>5} " + " ".join(f"{row[f] / 1e9:>9,.1f}"
                                      for f in ("float32", *formats)) + "\n")
