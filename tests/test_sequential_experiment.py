"""The certify experiment's sequential mode, CI-sized, and its bad inputs."""

import json
import os
import re

import numpy as np
import pytest

from experiments.common import certify_job
from ovc_jax import results
from ovc_jax.errors import ConfigError

from test_reliability_experiments import (assert_one_line_error, certify,
                                          tiny_config)

SEQ = {"mode": "sequential", "n": 800, "sequential.n_max": 800,
       "sequential.first_block": 200, "sequential.growth": 2.0,
       "sequential.precision_sigmas": 0.0, "sequential.max_radius_sigmas": 1.0}


def test_sequential_mode_writes_draws_and_matches_fixed_n(tmp_path):
  summary, _ = certify(tiny_config(
      **SEQ, **{"sequential.replay_precision_sigmas": (0.0, 0.2)}),
      tmp_path / "w")
  root = tmp_path / "w" / "tsv"
  for method in ("sequential", "sequential_cached", "sequential_mvn",
                 "standard", "cached"):
    paths = results.list_tsvs(str(root / method))
    assert paths, method
    with open(paths[0]) as f:
      header = f.readline().rstrip("\n").split("\t")
    assert header[:6] == list(results.COHEN_COLUMNS)
    # Fixed-n Cached-OVC's tables also say how many samples a compressed
    # cache left in doubt and how many were regenerated (the sequential mode
    # keeps float32 caches only).
    counted = ["ambiguous", "regenerated"] if method == "cached" else []
    assert header[-3 - len(counted):] == (
        ["draws", "stop", "encoder_passes"] + counted), method
  entry = summary["sequential"]["sigma_0.25"]
  assert entry["checkpoints"] == [200, 400, 800]
  assert entry["inputs"] == 3
  # Draws are checkpoints; the shared pass is n0 + the largest of them.
  known = [results.read_tsv(p) for p in
           results.list_tsvs(str(root / "sequential"))]
  for k in known:
    assert set(k["draws"]) <= {200, 400, 800}
    assert set(k["stop"]) <= {"abstain", "radius", "n_max"}
  largest = np.max([k["draws"] for k in known], axis=0)
  np.testing.assert_array_equal(known[0]["encoder_passes"], 50 + largest)
  # Both pick cA on the same selection draws: the same class wherever both
  # certify. A stop for the radius certifies at least max_radius.
  fixed = [results.read_tsv(p) for p in
           results.list_tsvs(str(root / "standard"))]
  for k, f in zip(known, fixed):
    both = (k["predict"] >= 0) & (f["predict"] >= 0)
    np.testing.assert_array_equal(k["predict"][both], f["predict"][both])
    assert np.all(k["radius"][k["stop"] == "radius"] >= 0.25)
  assert entry["fixed_encoder_passes_total"] == 3 * (50 + 800)
  assert entry["passes_ratio"] == pytest.approx(
      entry["fixed_encoder_passes_total"] / entry["encoder_passes_total"])
  assert os.path.isfile(summary["sequential_figure"])
  # Replays on the fixed-n draws: "p0" is this run's own rule, row for row
  # (the live run and the replay see the same keyed draws).
  for live, replay in (("sequential", "sequential@p0"),
                       ("sequential_cached", "sequential_cached@p0")):
    a = results.list_tsvs(str(root / live))
    b = results.list_tsvs(str(root / replay))
    assert len(a) == len(b) > 0
    for pa, pb in zip(a, b):
      ra, rb = results.read_tsv(pa), results.read_tsv(pb)
      for col in ("predict", "radius", "draws", "stop"):
        np.testing.assert_array_equal(ra[col], rb[col])
  assert set(entry["replays"]) == {"p0", "p0.2", "old"}
  assert entry["replays"]["p0"]["encoder_passes_total"] <= (
      entry["encoder_passes_total"])  # the live count adds novel tails alike
  assert entry["replays"]["p0"]["known_largest_gap_pp"] == pytest.approx(
      entry["known_largest_gap_pp"])
  coarse = entry["replays"]["p0.2"]
  assert coarse["precision"] == pytest.approx(0.05)
  assert coarse["encoder_passes_total"] <= (
      entry["replays"]["p0"]["encoder_passes_total"])
  assert entry["replays"]["old"]["checkpoints"] == [800]
  assert entry["known_radius_lost_max"] >= 0.0
  with open(tmp_path / "w" / "summary.json") as fh:
    assert json.load(fh)["sequential"] == json.loads(json.dumps(
        summary["sequential"]))


@pytest.mark.parametrize("field, value, fragment", [
    ("sequential.max_radius_sigmas", 0.0, "max_radius_sigmas must be"),
    ("sequential.max_radius_sigmas", -1.0, "max_radius_sigmas must be"),
    ("sequential.first_block", 1000, "n_max (800) must be >= the first block"),
    ("sequential.first_block", 0, "first block must be an integer >= 1"),
    ("sequential.schedule", (200, 200, 800), "strictly increasing"),
    ("sequential.schedule", (0, 800), "block size must be >= 1"),
    ("sequential.schedule", (200, 400), "must end at n_max"),
    ("sequential.precision_sigmas", -0.1, "precision_sigmas must be"),
    ("sequential.replay_precision_sigmas", (0.1, -1.0),
     "replay_precision_sigmas must be"),
])
def test_bad_sequential_settings_are_refused_before_anything_is_written(
    tmp_path, field, value, fragment):
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    certify(tiny_config(**{**SEQ, field: value}), tmp_path / "w")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("overrides, fragment", [
    ({"sequential.n_max": 1600}, "needs --config.n >= --config.sequential.n_max"),
    ({"sequential.compare_fixed": False}, "needs --config.sequential.compare_fixed"),
])
def test_replays_need_the_fixed_n_draws(tmp_path, overrides, fragment):
  config = tiny_config(**{**SEQ, "sequential.replay_precision_sigmas": (0.1,),
                          **overrides})
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    certify(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_a_bad_schedule_flag_is_one_line(warm_python, tmp_path):
  proc = warm_python.run("experiments.certify", f"--workdir={tmp_path / 'w'}",
                         "--config=experiments/configs/certify.py:sequential",
                         "--config.sequential.schedule=4000,2000,100000")
  assert_one_line_error(proc, "strictly increasing",
                        "--config.sequential.schedule")
  assert not (tmp_path / "w").exists()


def test_paper_sequential_variant_writes_its_table_and_figure(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  from experiments import paper  # pylint: disable=g-import-not-at-top
  from experiments.configs import paper as paper_configs  # pylint: disable=g-import-not-at-top
  c = paper_configs.get_config("ci,sequential")
  c.noise_spaces, c.sigmas, c.skip = ("normalized",), (0.25,), 600
  workdir = str(tmp_path / "paper")
  report = paper.run(c, workdir, stream=io.StringIO())
  (row,) = report["sequential"]
  assert row["backbone"] == "toy" and row["inputs"] == 2
  assert row["fixed_n_passes"] == 2 * (c.n0 + c.n)
  assert row["passes_ratio"] == pytest.approx(
      row["fixed_n_passes"] / row["encoder_passes"])
  with open(os.path.join(workdir, "tables", "sequential.md")) as f:
    assert "passes_ratio" in f.readline()
  assert os.path.isfile(os.path.join(workdir, "figures", "sequential_toy.png"))


def test_sequential_exact_entry_point_writes_its_table_and_figure(
    warm_python, tmp_path):
  """CI-sized: n_max 1600, two pA, one precision."""
  out = tmp_path / "exact"
  proc = warm_python.run("experiments.sequential_exact", f"--out={out}",
                 "--n_max=1600", "--p_a=0.6,0.999", "--precision_sigmas=0.2",
                 "--schedule=100x1.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (out / "table.md").read_text()
  assert "| pA | old (1000x2) | 100x1.5, 0.2σ |" in table
  rows = [line for line in table.splitlines() if line.startswith("| 0.")]
  assert len(rows) == 2
  # At pA = 0.999 the old rule certifies max_radius at its first look.
  assert rows[1].split("|")[2].strip().startswith("1,000 /")
  assert (out / "rules.png").stat().st_size > 10_000
  bad = warm_python.run("experiments.sequential_exact",
                        f"--out={tmp_path / 'bad'}", "--schedule=1.5x500")
  assert_one_line_error(bad, "--schedule must read FIRSTxGROWTH")
  assert not (tmp_path / "bad").exists()
