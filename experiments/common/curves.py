"""Certified accuracy against radius: curves from Cohen-format TSVs, drawn and tabulated."""

from __future__ import annotations

import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.common import save_figure
from ovc_jax import results
from ovc_jax.errors import DataError
from ovc_jax.ovc import NOVEL_CERTIFIERS

METHOD_LABELS = {name: c.label for name, c in NOVEL_CERTIFIERS.items()}


def curve(columns, radii: np.ndarray) -> np.ndarray:
  """Certified accuracy at each radius: mean of correct & radius >= r."""
  correct = columns["correct"].astype(bool)
  return np.array([np.mean(correct & (columns["radius"] >= r)) for r in radii])


def workdir_groups(workdir: str, by: str = "method") -> dict[str, list[str]]:
  """{group label: [tsv paths]} of a certify workdir's tsv/ tree.

  `by`: 'method' labels curves "method, sigma", 'sigma' "sigma, method".
  """
  root = os.path.join(workdir, "tsv")
  paths = results.list_tsvs(root)
  if not paths:
    raise DataError(f"no TSV files under {root}: is {workdir} a certify workdir?")
  groups = collections.defaultdict(list)
  for path in paths:
    method, sigma_dir, name = os.path.relpath(path, root).split(os.sep)[-3:]
    role = name.split("-", 1)[0].rstrip("0123456789")
    sigma = sigma_dir.replace("sigma_", "")
    label = (f"{METHOD_LABELS.get(method, method)}, σ={sigma}" if by == "method"
             else f"σ={sigma}, {METHOD_LABELS.get(method, method)}")
    groups[f"{label} ({role} prompts)"].append(path)
  return dict(sorted(groups.items()))


def axis_label(workdir: str | None) -> str:
  space = "normalised input space"
  if workdir:
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        if json.load(f).get("noise_space") == "pixel":
          space = "[0, 1] pixel space"
    except (OSError, json.JSONDecodeError):
      pass
  return f"L2 radius ({space})"


def draw(groups: dict[str, list[str]], out: str, *, x_label: str,
         max_radius: float | None = None, stream=sys.stdout) -> list[tuple]:
  """Draws certified accuracy against radius to `out` and prints the table.

  Args:
    groups: {curve label: [TSV paths]}; a curve averages its files.
    out: the PNG path.
    x_label: the radius axis label (says which space the radius is in).
    max_radius: right end of the radius axis (default: the largest radius).
    stream: where the table goes.

  Returns:
    [(label, number of inputs, [certified accuracy at each table radius])].
  """
  loaded = {label: [results.read_tsv(p) for p in paths]
            for label, paths in groups.items()}
  top = max_radius or max(
      [float(c["radius"].max()) for cols in loaded.values() for c in cols] + [0.5])
  grid = np.linspace(0.0, top * 1.05, 200)
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  table_radii = [r for r in results.DEFAULT_RADII if r <= top] or [0.0]
  rows = []
  for label, columns in loaded.items():
    acc = np.mean([curve(c, grid) for c in columns], axis=0)
    style = "--" if "approximate" in label else "-"
    ax.plot(grid, acc, style, label=label, linewidth=1.6)
    rows.append((label, len(columns[0]["radius"]), [
        float(np.mean([curve(c, np.array([r]))[0] for c in columns]))
        for r in table_radii]))
  ax.set_xlabel(x_label)
  ax.set_ylabel("certified accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_xlim(0, grid[-1])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper right")
  ax.set_title("Certified accuracy against L2 radius")
  fig.tight_layout()
  save_figure(fig, out)

  width = max(len(label) for label, _, _ in rows)
  stream.write(f"{'curve':{width}} {'inputs':>6} "
               + " ".join(f"r>={r:<5g}" for r in table_radii) + "\n")
  for label, n, accs in rows:
    stream.write(f"{label:{width}} {n:6d} "
                 + " ".join(f"{a:8.3f}" for a in accs) + "\n")
  stream.write(f"figure: {out}\n")
  return rows
