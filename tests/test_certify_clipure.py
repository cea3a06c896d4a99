"""The certify experiment's clipure variant: CLIPure-Cos certified beside plain CLIP."""

import json
import os

import numpy as np
import pytest

from ovc_jax import results


@pytest.mark.heavy
@pytest.mark.xdist_group("clipure_run")
def test_clipure_variant_certifies_both_with_the_same_keys(clipure_certify_run):
  # The shared run (tests/conftest.py): TINY, two purification steps.
  workdir, _ = clipure_certify_run
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
  assert len(plain) == len(purified) == 18  # 16 known + 2 novel prompts
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
