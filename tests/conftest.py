"""Fixtures shared by more than one test file."""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_certify_run(tmp_path_factory):
  """One plain `experiments.certify` run of test_experiments.TINY (one
  process, one device, no other flags), made once per session for every file
  that compares against it or reads it: (workdir, completed process, wall
  seconds). Users may add files to the workdir but must not change its TSVs,
  done.txt or summary.json.
  """
  from test_experiments import TINY, run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("certify"))
  start = time.perf_counter()
  proc = run("experiments.certify", f"--workdir={workdir}", *TINY)
  return workdir, proc, time.perf_counter() - start
