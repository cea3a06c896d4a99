"""The certify experiment's clipure variant: CLIPure-Cos certified beside plain CLIP."""

import json
import os
import subprocess
import sys

import numpy as np

from ovc_jax import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def test_clipure_variant_certifies_both_with_the_same_keys(tmp_path):
  workdir = str(tmp_path / "w")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.certify",
       "--config=experiments/configs/certify.py:clipure", f"--workdir={workdir}",
       "--config.skip=500", "--config.n0=30", "--config.n=200",
       "--config.irs.n_p=100", "--config.batch_size=100",
       "--config.num_novel=1", "--config.clipure.step_size=0.1"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  # Cached-OVC from the purified caches is standard RS on the purified
  # classifier, bit for bit.
  assert summary["cached_identical_to_standard"] == {
      "sigma_0.25": True, "clipure_cos/sigma_0.25": True}
  assert os.path.isfile(summary["comparison_figure"])
  plain = results.list_tsvs(os.path.join(workdir, "tsv", "standard"))
  purified = results.list_tsvs(os.path.join(workdir, "tsv", "clipure_cos",
                                            "standard"))
  assert len(plain) == len(purified) == 18  # 17 known + 1 novel prompt
  for a, b in zip(sorted(plain), sorted(purified)):
    ra, rb = results.read_tsv(a), results.read_tsv(b)
    np.testing.assert_array_equal(ra["idx"], rb["idx"])
    np.testing.assert_array_equal(ra["label"], rb["label"])
  # A small step purifies: some certificates differ from plain CLIP's.
  differ = [not np.array_equal(results.read_tsv(a)["radius"],
                               results.read_tsv(b)["radius"])
            for a, b in zip(sorted(plain), sorted(purified))]
  assert any(differ)
  assert (os.path.isdir(os.path.join(workdir, "caches", "clipure_cos",
                                     "sigma_0.25")))
