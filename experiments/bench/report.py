"""What a benchmark run prints and draws: the tables and the speedup chart."""

from __future__ import annotations

import sys

from experiments import common
from experiments.bench.batched import print_batched
from experiments.bench.compressed import print_compressed


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
  if report.get("compressed"):
    print_compressed(report["compressed"], stream)
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
