"""The targets a run is checked against, and the check."""

from __future__ import annotations


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


def compressed_targets(section: dict) -> list[dict]:
  """The compressed-cache section's targets: int8 bytes, the toy default's
  ambiguous share at every sigma, the cold-disk speedup at C = 10, and
  regenerate mode's identity with standard RS."""
  checks = []
  toy = section["toy_real"]["sigmas"]
  if "int8" in section["formats"]:
    for sigma, row in toy.items():
      checks.append({"target": f"int8 cache bytes / float32 <= 0.27 (toy CLIP, "
                               f"sigma {sigma})",
                     "measured": row["int8"]["ratio"],
                     "met": row["int8"]["ratio"] <= 0.27})
      share = row["int8"]["classes"]["10"]["ambiguous_share"]
      checks.append({"target": f"int8 ambiguous share <= 0.01 (toy default, "
                               f"C = 10, sigma {sigma})",
                     "measured": share, "met": share <= 0.01})
    for arch, timing in section["timing"].items():
      checks.append({"target": f"int8 cache bytes / float32 <= 0.27 "
                               f"({arch}-shaped rows, d = "
                               f"{timing['embed_dim']})",
                     "measured": timing["ratio"]["int8"],
                     "met": timing["ratio"]["int8"] <= 0.27})
      row = timing["classes"].get("10")
      if row is not None:
        got = row["speedup_int8_cold"]
        checks.append({"target": f"Cached-OVC int8 / float32 speedup from a "
                                 f"cold disk >= 2.5 ({arch}-shaped rows, C = "
                                 f"10, n = {timing['n']:,})",
                       "measured": got, "met": got >= 2.5})
  identical = all(row[fmt]["identical_to_standard"] for row in toy.values()
                  for fmt in section["formats"])
  checks.append({"target": "regenerate mode identical to standard RS (toy "
                           "CLIP, every input, sigma and format)",
                 "measured": float(identical), "met": identical})
  return checks


def check_targets(report: dict) -> list[dict]:
  checks = []
  if report.get("compressed"):
    checks += compressed_targets(report["compressed"])
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
