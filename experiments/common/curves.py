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
BASE_LABELS = {"clipure_cos": "CLIPure-Cos"}


# Cohen's columns that hold numbers, checked before any curve is drawn.
NUMERIC_COLUMNS = ("idx", "label", "predict", "radius", "correct")
METHOD_ORDER = ("standard", "irs", "cached", "mvn")


def read_results(path: str) -> dict[str, np.ndarray]:
  """results.read_tsv, with a non-numeric Cohen column (radius, ...) refused
  in one line naming the file, the line, the column and the value."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read results file {path}: {e}") from e
  if lines:
    names = lines[0].split("\t")
    columns = [(j, name) for j, name in enumerate(names)
               if name in NUMERIC_COLUMNS]
    for number, line in enumerate(lines[1:], 2):
      fields = line.split("\t")
      if not line or len(fields) != len(names):
        continue  # read_tsv names the problem
      for j, name in columns:
        try:
          value = float(fields[j])
        except ValueError:
          value = None
        if value is None or (name != "radius" and not value.is_integer()):
          raise DataError(
              f"{path} line {number}: column {name!r} holds {fields[j]!r}, "
              f"not {'a number' if name == 'radius' else 'an integer'}: the "
              "file is damaged or not a results file")
  return results.read_tsv(path)


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
  order = {}
  for path in paths:
    parts = os.path.relpath(path, root).split(os.sep)
    if len(parts) < 3:
      raise DataError(f"{path} is not where a certify run writes its TSVs "
                      f"({root}/<method>/sigma_<s>/<prompt>.tsv)")
    method, sigma_dir, name = parts[-3:]
    role = name.split("-", 1)[0].rstrip("0123456789")
    sigma = sigma_dir.replace("sigma_", "")
    method_label = METHOD_LABELS.get(method, method)
    if len(parts) > 3:  # a base classifier other than plain CLIP
      method_label = f"{BASE_LABELS.get(parts[-4], parts[-4])}: {method_label}"
    label = (f"{method_label}, σ={sigma}" if by == "method"
             else f"σ={sigma}, {method_label}")
    label = f"{label} ({role} prompts)"
    groups[label].append(path)
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else 99
    try:
      sigma_value = float(sigma)
    except ValueError:
      sigma_value = 0.0
    key = ((rank, role != "known", sigma_value) if by == "method"
           else (sigma_value, rank, role != "known"))
    order[label] = key + (label,)
  return {label: groups[label] for label in sorted(groups, key=order.get)}


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


def _method_of(label: str) -> str:
  """The method's name in a curve label (the label itself if none)."""
  for name in sorted(METHOD_LABELS.values(), key=len, reverse=True):
    if name in label:
      return name
  return label


def model_label(backbone: str) -> str:
  """A short name of a certify config's backbone, for titles."""
  if backbone == "toy":
    return "toy-world CLIP (demo model)"
  if backbone.startswith(("openclip:", "openai:")):
    return ":".join(backbone.split(":")[:2])
  if os.path.isabs(backbone) or backbone.startswith("."):
    return os.path.basename(os.path.normpath(backbone))
  return backbone


def workdir_title(workdir: str | None) -> str:
  """A figure title naming the model, n and alpha of a certify workdir."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      c = json.load(f)
    model = model_label(c["backbone"])
    return (f"Certified accuracy: {model} on {c['dataset']}, n={int(c['n']):,}, "
            f"α={float(c['alpha']):g}")
  except (OSError, TypeError, ValueError, KeyError):
    return "Certified accuracy against L2 radius"


def draw(groups: dict[str, list[str]], out: str, *, x_label: str,
         max_radius: float | None = None, stream=sys.stdout,
         title: str | None = None) -> list[tuple]:
  """Draws certified accuracy against radius to `out` and prints the table.

  A curve identical to one drawn before it (Cached-OVC is standard RS, bit
  for bit) would hide under it: it is drawn dotted with open markers, and its
  legend entry says "identical to ...".

  Args:
    groups: {curve label: [TSV paths]}; a curve averages its files.
    out: the PNG path.
    x_label: the radius axis label (says which space the radius is in).
    max_radius: right end of the radius axis (default: the largest radius).
    stream: where the table goes.
    title: the figure's title (say the model, n and alpha).

  Returns:
    [(label, number of inputs, [certified accuracy at each table radius])].
  """
  loaded = {label: [read_results(p) for p in paths]
            for label, paths in groups.items()}
  if not loaded:
    raise DataError("no results to draw")
  top = max_radius or max(
      [float(c["radius"].max()) for cols in loaded.values() for c in cols] + [0.5])
  grid = np.linspace(0.0, top * 1.05, 200)
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  table_radii = [r for r in results.DEFAULT_RADII if r <= top] or [0.0]
  rows = []
  drawn = []  # (label, curve) of the curves drawn so far
  for label, columns in loaded.items():
    if any(len(c["radius"]) == 0 for c in columns):
      raise DataError(f"curve {label!r}: a results file has no rows")
    acc = np.mean([curve(c, grid) for c in columns], axis=0)
    same = next((other for other, a in drawn if np.array_equal(a, acc)), None)
    if same is not None:
      ax.plot(grid, acc, ":", marker="o", markevery=(6, 12), markersize=5,
              fillstyle="none", linewidth=2.0,
              label=f"{label}: identical to {_method_of(same)}")
    else:
      style = "--" if "approximate" in label else "-"
      ax.plot(grid, acc, style, label=label, linewidth=1.6)
    drawn.append((label, acc))
    rows.append((label, len(columns[0]["radius"]), [
        float(np.mean([curve(c, np.array([r]))[0] for c in columns]))
        for r in table_radii]))
  ax.set_xlabel(x_label)
  ax.set_ylabel("certified accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_xlim(0, grid[-1])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
  ax.set_title(title or "Certified accuracy against L2 radius", fontsize=10)
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
