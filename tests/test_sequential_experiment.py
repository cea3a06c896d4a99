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
       "sequential.first_block": 200, "sequential.max_radius_sigmas": 1.0}


def test_sequential_mode_writes_draws_and_matches_fixed_n(tmp_path):
  summary, _ = certify(tiny_config(**SEQ), tmp_path / "w")
  root = tmp_path / "w" / "tsv"
  for method in ("sequential", "sequential_cached", "sequential_mvn",
                 "standard", "cached"):
    paths = results.list_tsvs(str(root / method))
    assert paths, method
    with open(paths[0]) as f:
      header = f.readline().rstrip("\n").split("\t")
    assert header[:6] == list(results.COHEN_COLUMNS)
    assert header[-3:] == ["draws", "stop", "encoder_passes"]
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
])
def test_bad_sequential_settings_are_refused_before_anything_is_written(
    tmp_path, field, value, fragment):
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    certify(tiny_config(**{**SEQ, field: value}), tmp_path / "w")
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
