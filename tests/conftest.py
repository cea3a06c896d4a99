"""Fixtures shared by more than one test file."""

import time

import pytest

from commands import ENV
from warm_python import WarmPython


@pytest.fixture(scope="session")
def warm_python():
  """Runs `python -m MODULE ARGS...` as a forked copy of one interpreter
  that has JAX and the project imported (tests/warm_python.py): for commands
  that end before certifying anything (bad flags, refused workdirs, --help),
  where a fresh interpreter would only add seconds of imports."""
  server = WarmPython(ENV)
  yield server
  server.close()


@pytest.fixture(scope="session")
def tiny_certify_run(tmp_path_factory):
  """One plain `python -m experiments.certify` run of test_experiments.TINY
  (one process, one device, no other flags), made once per session for every
  file that compares against it or reads it: (workdir, completed process,
  wall seconds). Tests may add files to the workdir but must not change its
  TSVs, done.txt, config.json or summary.json.
  """
  from test_experiments import TINY, run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("certify"))
  start = time.perf_counter()
  proc = run("experiments.certify", f"--workdir={workdir}", *TINY)
  return workdir, proc, time.perf_counter() - start
