"""Certification results in Cohen et al.'s TSV format, and what is read off them.

Cohen et al.'s `certify.py` writes one row per input,

    idx  label  predict  radius  correct  time

with `radius` printed to 3 significant digits (`{:.3}`), `predict` = -1 for
an abstention and `time` a `datetime.timedelta` string. Their `analyze.py`
reads it with pandas and computes certified accuracy at radius r as the
fraction of rows with `correct == 1 and radius >= r`. ovc_jax writes the same
six columns first, so that `analyze.py` reads its files, and may add columns
after them (method, prompt, pA_lower, and the OVC methods' extras).

Every number of a run's JSON summary is computed from the TSV as written, so a
Cohen-style computation on the file gives the same numbers.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ovc_jax.errors import DataError

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5,
                 2.75, 3.0)


def format_time(seconds: float) -> str:
  """Cohen's time column: str(datetime.timedelta(seconds=...))."""
  return str(datetime.timedelta(seconds=seconds))


def parse_time(text: str) -> float:
  """Seconds from a `datetime.timedelta` string such as '0:00:01.250000'."""
  days = 0
  if "day" in text:
    day_part, text = text.split(",")
    days = int(day_part.split()[0])
  h, m, s = text.strip().split(":")
  return days * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def format_row(idx: int, label: int, prediction: int, radius: float,
               seconds: float, extra: Sequence[Any] = ()) -> str:
  """One TSV line (with newline), Cohen's six columns then `extra`."""
  correct = int(prediction == label)
  fields = [str(idx), str(label), str(prediction), "{:.3}".format(radius),
            str(correct), format_time(seconds)]
  fields += [_format_extra(v) for v in extra]
  return "\t".join(fields) + "\n"


def _format_extra(value: Any) -> str:
  if isinstance(value, bool):
    return str(int(value))
  if isinstance(value, float):
    return repr(value) if math.isfinite(value) else "nan"
  text = str(value)
  if "\t" in text or "\n" in text:
    raise ValueError(f"TSV field may not contain tabs or newlines: {text!r}")
  return text


def header(extra_columns: Sequence[str] = ()) -> str:
  return "\t".join(COHEN_COLUMNS + tuple(extra_columns)) + "\n"


def read_tsv(path: str) -> dict[str, np.ndarray]:
  """Reads a results TSV into columns; numeric columns become arrays."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise DataError(f"cannot read results file {path}: {e}") from e
  if not lines:
    raise DataError(f"results file {path} is empty")
  names = lines[0].split("\t")
  if tuple(names[:6]) != COHEN_COLUMNS:
    raise DataError(f"{path} does not start with Cohen's columns "
                    f"{COHEN_COLUMNS}; found {names[:6]}")
  rows = [line.split("\t") for line in lines[1:] if line]
  for i, row in enumerate(rows):
    if len(row) != len(names):
      raise DataError(f"{path} line {i + 2} has {len(row)} fields, "
                      f"the header {len(names)}")
  columns = {name: [row[j] for row in rows] for j, name in enumerate(names)}
  out: dict[str, np.ndarray] = {}
  for name, values in columns.items():
    if name == "time":
      out[name] = np.array([parse_time(v) for v in values], np.float64)
      continue
    try:
      out[name] = np.array([float(v) for v in values], np.float64)
    except ValueError:
      out[name] = np.array(values, dtype=object)
  for name in ("idx", "label", "predict", "correct"):
    out[name] = out[name].astype(np.int64)
  return out


def certified_accuracy(radius: np.ndarray, correct: np.ndarray,
                       radii: Iterable[float] = DEFAULT_RADII) -> dict[str, float]:
  """Fraction of inputs certified correct at each radius (Cohen's definition)."""
  radius = np.asarray(radius, np.float64)
  correct = np.asarray(correct).astype(bool)
  n = max(len(radius), 1)
  return {f"{r:g}": float(np.sum(correct & (radius >= r)) / n) for r in radii}


def summarize(columns: Mapping[str, np.ndarray],
              radii: Iterable[float] = DEFAULT_RADII) -> dict[str, Any]:
  """Certified accuracy, average certified radius, abstentions, time per input.

  The average certified radius (ACR) is the mean over all inputs of the
  radius of correct certificates (0 for wrong or abstaining ones).
  """
  radius, correct = columns["radius"], columns["correct"].astype(bool)
  n = len(radius)
  return {
      "inputs": int(n),
      "certified_accuracy": certified_accuracy(radius, correct, radii),
      "clean_accuracy": float(correct.mean()) if n else 0.0,
      "average_certified_radius": float(np.sum(radius * correct) / n) if n else 0.0,
      "abstention_rate": float(np.mean(columns["predict"] == -1)) if n else 0.0,
      "seconds_per_input": float(np.mean(columns["time"])) if n else 0.0,
  }


def summarize_tsv(path: str, radii: Iterable[float] = DEFAULT_RADII) -> dict[str, Any]:
  return summarize(read_tsv(path), radii)


def list_tsvs(directory: str) -> list[str]:
  """Every `.tsv` under `directory`, sorted."""
  found = []
  for root, _, files in os.walk(directory):
    found += [os.path.join(root, f) for f in files if f.endswith(".tsv")]
  return sorted(found)
