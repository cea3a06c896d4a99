r"""The paper's tables and figures (docs/METHOD.md, section 6), on any backbone.

  python -m experiments.paper --workdir=workdirs/paper          # embedded default (toy CLIP), CPU
  python -m experiments.paper --workdir=DIR --config=experiments/configs/paper.py:cifar10,paper \
      --config.backbones=vit_b32,rn50,openclip_vit_b32

Runs the certify experiment in ovc mode for every backbone and noise space
(resumable, one sub-workdir each under DIR/runs/), then writes, from those
runs' TSVs and caches:

  tables/certified_accuracy.{csv,md}   certified accuracy at radii, per backbone, space and sigma
  tables/irs_speedup.{csv,md}          Modified-IRS speedup and how often IRS applied
  tables/memory_speedup.{csv,md}       bytes per input and speedup of Cached-OVC and MVN-OVC
  tables/mvn_calibration.{csv,md}      MVN overshoot without margin, smallest safe delta
  figures/certified_accuracy_<backbone>.png   curves per sigma, normalised and pixel space
  figures/irs_applied_vs_sigma.png
  figures/agreement_<backbone>.png      agreement of each novel prompt with each known prompt
  figures/similarity_vs_pA_<backbone>.png
  figures/cached_vs_standard.png        Cached-OVC radius against standard radius
  figures/mvn_vs_exact.png              MVN radius against exact radius, without and with margin
  figures/speedup.png                   speedup bar chart per backbone and method
  figures/speedup_vs_embedding_time.png
  paper.json                            everything above as numbers

With the `sequential` variant it also runs the certify experiment's sequential
mode per backbone (normalised space; sequential CERTIFY beside fixed-n at
n = --config.n on the same keys, under DIR/runs/<backbone>/sequential/) and
writes tables/sequential.{csv,md} (draws, encoder passes saved, largest gap
in certified accuracy up to max_radius) and figures/sequential_<backbone>.png.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys

from absl import flags
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import common
from experiments.common import certify_job
from experiments.common import mvn_calibration
from experiments.common import sequential_job
from experiments.configs import certify as certify_configs
from experiments.configs import paper as paper_configs
from ovc_jax import ovc
from ovc_jax import results
from ovc_jax.certifiers import modified_irs, mvn_ovc
from ovc_jax.classifiers import predict_from_embeddings
from ovc_jax.errors import ConfigError

_CONFIG = common.define_config_flag(paper_configs)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("workdirs", "paper"),
                               "Where runs, tables and figures go.")

RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
METHODS = ("irs", "cached", "mvn")
LABELS = {"standard": "standard RS", "irs": "Modified-IRS",
          "cached": "Cached-OVC", "mvn": "MVN-OVC (approximate)"}


def backbone_label(backbone: str) -> str:
  """A file-name-safe name: the BACKBONES key, or a slug of a path or spec."""
  if backbone in certify_configs.BACKBONES:
    return backbone
  return certify_job.slug(os.path.basename(os.path.normpath(backbone.split(":")[-1])))


def certify_config(c, backbone: str, noise_space: str):
  """The certify experiment's config for one backbone and noise space."""
  cc = certify_configs.get_config()
  cc.dataset = c.dataset
  cc.data_dir = c.data_dir
  cc.download = c.download
  cc.backbone = certify_configs.BACKBONES.get(backbone, backbone)
  cc.noise_space = noise_space
  cc.sigmas = tuple(c.sigmas)
  cc.n0, cc.n, cc.alpha, cc.batch_size = c.n0, c.n, c.alpha, c.batch_size
  cc.skip, cc.max, cc.seed = c.skip, c.max, c.seed
  cc.mode = "ovc"
  cc.num_novel = c.num_novel
  cc.irs.n_p, cc.irs.gamma, cc.irs.alpha_zeta = c.n_p, c.gamma, c.alpha
  cc.mvn.delta = c.mvn_delta
  cc.dtype = c.dtype
  return cc


def sequential_config(c, backbone: str):
  """The certify config of one backbone's sequential run (normalised space):
  sequential CERTIFY with n_max = c.n beside fixed-n at c.n."""
  cc = certify_config(c, backbone, "normalized")
  cc.mode = "sequential"
  cc.sequential.n_max = c.n
  cc.sequential.max_radius_sigmas = c.sequential_max_radius_sigmas
  cc.sequential.first_block = min(cc.sequential.first_block, c.n)
  return cc


def sequential_table(runs, out: str) -> list[dict]:
  """One row per (backbone, sigma) of the sequential runs; their figures."""
  rows = []
  for backbone, (setup, summary) in runs.items():
    for name, e in summary["sequential"].items():
      rows.append({
          "backbone": backbone, "sigma": float(name.split("sigma_")[-1]),
          "inputs": e["inputs"], "max_radius": e["max_radius"],
          "mean_draws_known": e["mean_draws_per_known_prompt"],
          "encoder_passes": e["encoder_passes_total"],
          "fixed_n_passes": e["fixed_encoder_passes_total"],
          "passes_ratio": e["passes_ratio"],
          "largest_gap_pp_known": e.get("known_largest_gap_pp", float("nan")),
          "largest_gap_pp_novel": e.get("novel_largest_gap_pp", float("nan"))})
    sequential_job.draw(setup, certify_job, summary["sequential"],
                        out=os.path.join(out, f"sequential_{backbone}.png"))
  return rows


def write_table(rows: list[dict], stem: str) -> None:
  """rows -> stem.csv and stem.md (same columns, same numbers), each whole."""
  columns = list(rows[0])
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  writer.writerows(rows)
  common.atomic_write_text(stem + ".csv", text.getvalue())

  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  common.atomic_write_text(stem + ".md", "\n".join(lines) + "\n")


def mean_curve(paths: list[str], radii) -> np.ndarray:
  return np.mean([[results.summarize_tsv(p, radii)["certified_accuracy"][f"{r:g}"]
                   for r in radii] for p in paths], axis=0)


def certified_accuracy(runs, out: str) -> list[dict]:
  """Table and one figure per backbone: known prompts' standard RS curves."""
  rows = []
  by_backbone = {}
  for (backbone, space), (setup, _) in runs.items():
    for sigma in setup.config.sigmas:
      paths = [certify_job.tsv_path(setup, "standard", p, sigma) for p in setup.known]
      acc = mean_curve(paths, RADII)
      rows.append({"backbone": backbone, "noise_space": space, "sigma": sigma,
                   **{f"r>={r:g}": float(a) for r, a in zip(RADII, acc)}})
      by_backbone.setdefault(backbone, {})[(space, sigma)] = paths
  for backbone, groups in by_backbone.items():
    spaces = sorted({s for s, _ in groups})
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.2 * len(spaces), 4.2),
                             dpi=120, squeeze=False)
    for ax, space in zip(axes[0], spaces):
      for (s, sigma), paths in sorted(groups.items()):
        if s != space:
          continue
        top = max(results.read_tsv(p)["radius"].max() for p in paths)
        grid = np.linspace(0, max(top, 0.1) * 1.05, 120)
        ax.plot(grid, mean_curve(paths, grid), label=f"σ={sigma:g}")
      ax.set_xlabel("L2 radius (" + ("normalised input space" if space == "normalized"
                                     else "[0, 1] pixel space") + ")")
      ax.set_ylabel("certified accuracy (mean over known prompts)")
      ax.set_ylim(0, 1.02)
      ax.set_title(f"{backbone}: noise in {space} space")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, os.path.join(out, f"certified_accuracy_{backbone}.png"))
  return rows


def irs_table(runs, out: str) -> list[dict]:
  rows = []
  for (backbone, space), (setup, summary) in runs.items():
    for sigma in setup.config.sigmas:
      methods = summary["methods"]
      irs = methods[f"novel/irs/sigma_{sigma:g}"]
      std = methods[f"novel/standard/sigma_{sigma:g}"]
      applied = np.mean([np.mean(results.read_tsv(
          certify_job.tsv_path(setup, "irs", p, sigma))["irs_applied"])
                         for p in setup.novel])
      rows.append({"backbone": backbone, "dataset": setup.config.dataset,
                   "noise_space": space, "sigma": sigma,
                   "standard_s": std["seconds_per_input"],
                   "irs_s": irs["seconds_per_input"],
                   "speedup": irs["speedup_over_standard"],
                   "irs_applied_fraction": float(applied)})
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  for backbone in sorted({r["backbone"] for r in rows}):
    for space in sorted({r["noise_space"] for r in rows}):
      pts = [(r["sigma"], r["irs_applied_fraction"]) for r in rows
             if r["backbone"] == backbone and r["noise_space"] == space]
      if pts:
        ax.plot(*zip(*pts), "o-", label=f"{backbone}, {space} space")
  ax.set_xlabel("σ")
  ax.set_ylabel("fraction of novel-prompt certificates where IRS applied")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, "irs_applied_vs_sigma.png"))
  return rows


def _known_and_embeddings(setup, sigma, idx):
  source = certify_job.stored_caches(setup, sigma, idx)
  embeddings = source.load_embeddings()
  if ovc.is_compressed(embeddings):
    raise ConfigError(
        f"the caches in {source.directory} are compressed; the agreement "
        "analysis reads exact (float32) embeddings: certify again into "
        "another --workdir")
  return source.load_known(), embeddings


def agreement(setup, backbone: str, out: str) -> dict:
  """Mean agreement of each novel prompt with each known prompt on the n_p draws.

  Novel predictions on the probe draws come from the embedding cache (the same
  numbers a forward pass gives: Cached-OVC is exact); known ones from the
  known-prompt cache. Also: prompt similarity against the gap in pA_lower.
  """
  c = setup.config
  novel = jnp.stack([p.class_embeddings for p in setup.novel])
  sigmas = list(c.sigmas)
  matrices, points = {}, []
  known_u = np.stack([np.asarray(p.class_embeddings) for p in setup.known])
  for sigma in sigmas:
    total = np.zeros((len(setup.novel), len(setup.known)))
    with certify_job.journal(setup) as journal:
      done = list(journal.done)
    for idx in done:
      known, emb = _known_and_embeddings(setup, sigma, idx)
      probe = np.asarray(predict_from_embeddings(
          jnp.asarray(emb.estimation[:c.irs.n_p]), novel))  # [n_p, P_novel]
      total += np.mean(probe[:, :, None] == known.estimation_predictions[:, None, :],
                       axis=0)
    matrices[f"{sigma:g}"] = (total / max(len(done), 1)).tolist()
    for j, p_novel in enumerate(setup.novel):
      sim = modified_irs.prompt_similarity(np.asarray(p_novel.class_embeddings),
                                           known_u)
      novel_p = results.read_tsv(certify_job.tsv_path(setup, "standard", p_novel, sigma))["pA_lower"]
      for i, p_known in enumerate(setup.known):
        known_p = results.read_tsv(certify_job.tsv_path(setup, "standard", p_known, sigma))["pA_lower"]
        points += [(float(sim[i]), float(g), sigma)
                   for g in np.abs(known_p - novel_p)]
  fig, axes = plt.subplots(1, len(sigmas), figsize=(4.6 * len(sigmas), 3.6),
                           dpi=120, squeeze=False)
  for ax, sigma in zip(axes[0], sigmas):
    im = ax.imshow(np.array(matrices[f"{sigma:g}"]), vmin=0.5, vmax=1.0,
                   cmap="viridis", aspect="auto")
    ax.set_xlabel("known prompt")
    ax.set_ylabel("novel prompt")
    ax.set_yticks(range(len(setup.novel)),
                  [p.template[:28] for p in setup.novel], fontsize=6)
    ax.set_title(f"agreement on the n_p draws, σ={sigma:g}", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of equal predictions")
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, f"agreement_{backbone}.png"))
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  for sigma in sigmas:
    pts = np.array([(s, g) for s, g, sg in points if sg == sigma])
    ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, label=f"σ={sigma:g}")
  ax.set_xlabel("cosine similarity of the class-embedding matrices")
  ax.set_ylabel("|pA_lower(known) − pA_lower(novel)| per input")
  ax.set_title(f"{backbone}: prompt similarity against pA difference", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, f"similarity_vs_pA_{backbone}.png"))
  return {"agreement": matrices,
          "similarity_vs_pA_gap": [list(p) for p in points]}


def cached_vs_standard(runs, out: str) -> dict:
  xs, ys = [], []
  for (_, _), (setup, _) in runs.items():
    for sigma in setup.config.sigmas:
      for p in setup.novel:
        xs += list(results.read_tsv(certify_job.tsv_path(setup, "standard", p, sigma))["radius"])
        ys += list(results.read_tsv(certify_job.tsv_path(setup, "cached", p, sigma))["radius"])
  xs, ys = np.array(xs), np.array(ys)
  fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
  top = max(xs.max(), ys.max(), 0.1) * 1.05
  ax.plot([0, top], [0, top], "k--", linewidth=0.8, label="equal")
  ax.scatter(xs, ys, s=10, alpha=0.6, label="(input, novel prompt, σ)")
  ax.set_xlabel("standard RS radius")
  ax.set_ylabel("Cached-OVC radius")
  ax.set_title("Cached-OVC is exact: every point on the diagonal", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, "cached_vs_standard.png"))
  return {"points": int(len(xs)), "all_equal": bool(np.array_equal(xs, ys))}


def mvn_margin(runs, out: str, step: float = 0.005) -> tuple[list[dict], dict]:
  """MVN-OVC against the exact certificates of every run (table and figure)."""
  pairs = {}
  for (backbone, space), (setup, _) in runs.items():
    for sigma, items in mvn_calibration.compare(setup).items():
      pairs.setdefault(sigma, []).extend(items)
  rows = []
  for sigma, items in sorted(pairs.items()):
    cal = mvn_ovc.calibrate_margin(*map(list, zip(*items)))
    rows.append({"sigma": sigma, **cal._asdict()})
  overall = mvn_ovc.calibrate_margin(
      *map(list, zip(*[i for items in pairs.values() for i in items])))
  delta = math.ceil(overall.delta / step - 1e-9) * step
  mvn_calibration.draw(pairs, delta, os.path.join(out, "mvn_vs_exact.png"))
  return rows, {"overall": overall._asdict(), "recommended_delta": delta}


def memory_speedup(runs, out: str) -> list[dict]:
  rows = []
  for (backbone, space), (setup, summary) in runs.items():
    for sigma in setup.config.sigmas:
      m = summary["methods"]
      nbytes = summary["cache_bytes_per_input_per_sigma"][f"sigma_{sigma:g}"]
      known_s = m[f"known/standard/sigma_{sigma:g}"]["seconds_per_input"]
      rows.append({
          "backbone": backbone, "noise_space": space, "sigma": sigma,
          "cached_bytes": nbytes.get("embeddings", 0),
          "mvn_bytes": nbytes.get("gaussian", 0),
          "embedding_time_s": known_s,
          **{f"speedup_{k}": m[f"novel/{k}/sigma_{sigma:g}"]["speedup_over_standard"]
             for k in METHODS}})
  labels = [f"{r['backbone']}\n{r['noise_space'][:4]} σ={r['sigma']:g}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2), dpi=120)
  width = 0.8 / len(METHODS)
  for k, method in enumerate(METHODS):
    ax.bar(np.arange(len(rows)) + k * width, [r[f"speedup_{method}"] for r in rows],
           width, label=LABELS[method])
  ax.set_xticks(np.arange(len(rows)) + width, labels, fontsize=7)
  ax.set_yscale("log")
  ax.axhline(1.0, color="k", linewidth=0.8)
  ax.set_ylabel("speedup over standard RS (×, log scale)")
  ax.set_title("Seconds per input for a novel prompt, measured in the same run",
               fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, "speedup.png"))
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  for method in ("cached", "mvn"):
    ax.scatter([r["embedding_time_s"] for r in rows],
               [r[f"speedup_{method}"] for r in rows], label=LABELS[method])
    for r in rows:
      ax.annotate(r["backbone"], (r["embedding_time_s"], r[f"speedup_{method}"]),
                  fontsize=6)
  ax.set_xlabel("seconds to embed the n0 + n noisy samples of an input")
  ax.set_ylabel("speedup over standard RS (×)")
  ax.set_yscale("log")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  common.save_figure(fig, os.path.join(out, "speedup_vs_embedding_time.png"))
  return rows


def validate(c) -> None:
  """The paper config's own checks (each certify run checks the rest)."""
  # --config.backbones=a,b arrives as one string: the lists are normalised.
  c.backbones = common.check_name_list(c.backbones, "backbones")
  c.noise_spaces = common.check_name_list(c.noise_spaces, "noise_spaces",
                                          ("normalized", "pixel"))
  common.check_number_list(c.sigmas, "sigmas")
  labels = [backbone_label(b) for b in c.backbones]
  if len(set(labels)) != len(labels):
    raise ConfigError(
        f"--config.backbones {tuple(c.backbones)} name two backbones with the "
        "same file name; give each a distinct folder name")


def run(c, workdir: str, stream=sys.stderr) -> dict:
  """Every run, then every table and figure; returns what paper.json holds.

  The paper workdir is locked for the whole run (each certify run under it
  locks its own, too).
  """
  validate(c)
  with common.workdir_lock(workdir):
    return _run_locked(c, workdir, stream)


def _run_locked(c, workdir: str, stream) -> dict:
  runs = {}
  for backbone in c.backbones:
    for space in c.noise_spaces:
      stream.write(f"== certify: backbone {backbone}, noise in {space} space\n")
      runs[(backbone_label(backbone), space)] = certify_job.run(
          certify_config(c, backbone, space),
          os.path.join(workdir, "runs", backbone_label(backbone), space),
          stream=stream)
  sequential_runs = {}
  if c.sequential:
    for backbone in c.backbones:
      stream.write(f"== certify, sequential: backbone {backbone}\n")
      sequential_runs[backbone_label(backbone)] = certify_job.run(
          sequential_config(c, backbone),
          os.path.join(workdir, "runs", backbone_label(backbone),
                       "sequential"), stream=stream)
  tables, figures = os.path.join(workdir, "tables"), os.path.join(workdir, "figures")
  os.makedirs(figures, exist_ok=True)
  report = {"backbones": [backbone_label(b) for b in c.backbones],
            "dataset": c.dataset,
            "model_notes": {b: runs[(b, s)][1]["model"]["note"] for b, s in runs}}
  report["certified_accuracy"] = certified_accuracy(runs, figures)
  write_table(report["certified_accuracy"], os.path.join(tables, "certified_accuracy"))
  report["irs"] = irs_table(runs, figures)
  write_table(report["irs"], os.path.join(tables, "irs_speedup"))
  normalized = {k: v for k, v in runs.items() if k[1] == "normalized"} or runs
  report["agreement"] = {b: agreement(setup, b, figures)
                         for (b, _), (setup, _) in normalized.items()}
  report["cached_vs_standard"] = cached_vs_standard(runs, figures)
  mvn_rows, report["mvn_margin"] = mvn_margin(normalized, figures)
  write_table(mvn_rows, os.path.join(tables, "mvn_calibration"))
  report["mvn_calibration"] = mvn_rows
  report["memory_speedup"] = memory_speedup(runs, figures)
  write_table(report["memory_speedup"], os.path.join(tables, "memory_speedup"))
  if sequential_runs:
    report["sequential"] = sequential_table(sequential_runs, figures)
    write_table(report["sequential"], os.path.join(tables, "sequential"))
  common.write_json(os.path.join(workdir, "paper.json"), report)
  return report


@common.exit_on_user_error
def main(argv) -> None:
  del argv
  workdir = _WORKDIR.value
  report = run(_CONFIG.value, workdir)
  w = sys.stdout.write
  w(f"\nCached-OVC radius equal to standard RS on all {report['cached_vs_standard']['points']} "
    f"points: {report['cached_vs_standard']['all_equal']}\n")
  w(f"MVN margin needed: {report['mvn_margin']['overall']['delta']:.4f} "
    f"(recommended {report['mvn_margin']['recommended_delta']:g}); "
    f"{mvn_ovc.APPROXIMATE_NOTE}\n")
  for name in ("certified_accuracy", "irs_speedup", "memory_speedup", "mvn_calibration"):
    with open(os.path.join(workdir, "tables", name + ".md")) as f:
      w(f"\n{name}:\n{f.read()}")
  w(f"\nfigures: {os.path.join(workdir, 'figures')}\n")


if __name__ == "__main__":
  common.run_app(main)
