"""Fixtures shared by more than one test file."""

import time
import warnings

import pytest

import jax

from commands import COMPILATION_CACHE, ENV
from warm_python import WarmPython

# The tests' own compilations go to the session's persistent compilation
# cache too (tests/commands.py), shared with the commands they start and with
# the other xdist worker: the same programs are compiled in many of them. A
# program loaded from the cache is the one compiling gives.
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
def tiny_certify_run(tmp_path_factory, warm_python):
  """One plain `python -m experiments.certify` run of test_experiments.TINY
  (one process, one device, no other flags), made once per session for every
  file that compares against it or reads it: (workdir, completed process,
  wall seconds). Tests may add files to the workdir but must not change its
  TSVs, done.txt, config.json or summary.json.
  """
  from test_experiments import TINY, run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("certify"))
  start = time.perf_counter()
  proc = run("experiments.certify", f"--workdir={workdir}", *TINY,
             warm=warm_python)
  return workdir, proc, time.perf_counter() - start


@pytest.fixture(scope="session")
def clipure_certify_run(tmp_path_factory, warm_python):
  """One plain run of the certify experiment's clipure variant (plain CLIP
  and CLIPure-Cos) at test_experiments.TINY with two small purification
  steps (test_distributed.CLIPURE): (workdir, wall seconds). Read by the
  two-process test, which must reproduce its rows, and by the clipure
  variant's own checks. Its users share the xdist group "clipure_run", so
  under `-n 2` it is made once. Read-only for its users.
  """
  from test_distributed import CLIPURE, TIMEOUT_S  # pylint: disable=g-import-not-at-top
  from test_experiments import TINY, run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("clipure_one_process"))
  start = time.perf_counter()
  run("experiments.certify", f"--workdir={workdir}", *CLIPURE, *TINY,
      timeout=TIMEOUT_S, warm=warm_python)
  return workdir, time.perf_counter() - start


@pytest.hookimpl(trylast=True)  # after xdist has tagged the grouped tests
def pytest_collection_modifyitems(config, items):
  """The tests marked `heavy` (a minute or more of CPU) first, in their
  order: started last, one of them would keep one core busy while the other
  waits (`-n 2`). The rest keep their order.

  On an xdist worker, a warning if xdist has not tagged the grouped tests
  (pytest 9.2 with pytest-xdist 3.8): then each worker would make every
  shared run itself. Nothing fails, but the suite takes minutes longer.
  """
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
  if not getattr(config.option, "loadgroup", False):
    return
  untagged = [item.nodeid for item in items
              if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if untagged:
    warnings.warn(pytest.PytestConfigWarning(
        f"pytest {pytest.__version__} and this pytest-xdist ignore the test "
        f"groups (--dist loadgroup; e.g. {untagged[0]}): both workers make "
        "each shared run. Install the test extra's pytest (<9.2)."))
