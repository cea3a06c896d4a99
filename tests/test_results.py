"""Cohen-format TSVs, their summaries, and the exactly-once resumable writer."""

import json
import os

import numpy as np
import pytest

from experiments import common
from ovc_jax import results
from ovc_jax.errors import ConfigError, DataError


def _write(path, rows, extra=("method",)):
  with open(path, "w") as f:
    f.write(results.header(extra))
    for r in rows:
      f.write(results.format_row(*r))


def test_row_format_is_cohens():
  line = results.format_row(20, 3, 3, 0.123456, 1.5, ("cached",))
  assert line == "20\t3\t3\t0.123\t1\t0:00:01.500000\tcached\n"
  line = results.format_row(40, 3, -1, 0.0, 0.25)
  assert line == "40\t3\t-1\t0.0\t0\t0:00:00.250000\n"
  assert results.parse_time("1 day, 2:03:04.500000") == 86400 + 7384.5


def test_summary_matches_a_cohen_style_computation(tmp_path):
  path = str(tmp_path / "r.tsv")
  rows = [(0, 1, 1, 0.8, 1.0, ("s",)), (20, 2, 2, 0.3, 2.0, ("s",)),
          (40, 3, -1, 0.0, 1.0, ("s",)), (60, 4, 5, 1.2, 1.0, ("s",))]
  _write(path, rows)
  s = results.summarize_tsv(path)
  # analyze.py: (df["correct"] & (df["radius"] >= r)).mean()
  assert s["certified_accuracy"]["0"] == 0.5
  assert s["certified_accuracy"]["0.5"] == 0.25
  assert s["certified_accuracy"]["1"] == 0.0
  assert s["abstention_rate"] == 0.25
  assert s["average_certified_radius"] == pytest.approx((0.8 + 0.3) / 4)
  assert s["seconds_per_input"] == pytest.approx(1.25)


def test_read_tsv_rejects_non_cohen_files(tmp_path):
  path = tmp_path / "bad.tsv"
  path.write_text("a\tb\n1\t2\n")
  with pytest.raises(DataError, match="Cohen's columns"):
    results.read_tsv(str(path))
  path.write_text(results.header() + "1\t2\n")
  with pytest.raises(DataError, match="fields"):
    results.read_tsv(str(path))


def test_resumable_run_drops_partial_and_uncommitted_rows(tmp_path):
  workdir = str(tmp_path / "w")
  config = {"sigma": 0.25, "n": 100}
  tsv_a, tsv_b = os.path.join(workdir, "a.tsv"), os.path.join(workdir, "b.tsv")
  header = results.header()
  run = common.ResumableRun(workdir, config)
  run.prepare({tsv_a: header, tsv_b: header})
  for idx in (0, 20):
    run.commit(idx, {p: (header, results.format_row(idx, 1, 1, 0.5, 1.0))
                     for p in (tsv_a, tsv_b)})
  # Simulate a kill while writing input 40: one file got its row, the other
  # half a row, and done.txt never heard of it.
  with open(tsv_a, "a") as f:
    f.write(results.format_row(40, 1, 1, 0.5, 1.0))
  with open(tsv_b, "a") as f:
    f.write("40\t1\t1\t0.")
  resumed = common.ResumableRun(workdir, config)
  assert resumed.remaining([0, 20, 40, 60]) == [40, 60]
  resumed.prepare({tsv_a: header, tsv_b: header})
  for path in (tsv_a, tsv_b):
    assert list(results.read_tsv(path)["idx"]) == [0, 20]


def test_resumable_run_ignores_a_partial_done_line(tmp_path):
  workdir = str(tmp_path / "w")
  run = common.ResumableRun(workdir, {"x": 1})
  run.commit(0, {})
  with open(os.path.join(workdir, "done.txt"), "a") as f:
    f.write("2")  # interrupted before its newline
  assert common.ResumableRun(workdir, {"x": 1}).done == [0]


def test_resumable_run_refuses_another_configuration(tmp_path):
  workdir = str(tmp_path / "w")
  common.ResumableRun(workdir, {"sigma": 0.25, "irs": {"gamma": 0.01}})
  with pytest.raises(ConfigError, match=r"different configuration \(irs.gamma"):
    common.ResumableRun(workdir, {"sigma": 0.25, "irs": {"gamma": 0.02}})
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["irs"]["gamma"] == 0.01


def test_progress_prints_done_left_and_eta():
  import io
  stream = io.StringIO()
  progress = common.Progress(10, "inputs", stream=stream, already_done=2)
  progress.update()
  line = stream.getvalue()
  assert "3/10 inputs done, 7 left" in line and "ETA" in line
