"""How the tests start the project's commands: where, and in what environment.

The commands the tests start compile the same programs again and again (a
run, its kill and its resume; the processes of a distributed run; training
stopped and resumed): ENV gives them one JAX persistent compilation cache,
one folder per test session, removed at its end. A program loaded from it is
the one compiling gives, so no result changes; only the seconds of
compilation go. PLAIN_ENV has no cache, for commands that time compilation
or memory themselves (the benchmark).
"""

import atexit
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAIN_ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 PYTHONUNBUFFERED="1")

# One cache for the whole session: pytest's first process makes it and
# removes it at its end; with `-n 2` the xdist workers it starts inherit the
# variable and share that folder.
_SHARED = "OVC_JAX_TESTS_COMPILATION_CACHE"
COMPILATION_CACHE = os.environ.get(_SHARED, "")
if not os.path.isdir(COMPILATION_CACHE):
  COMPILATION_CACHE = tempfile.mkdtemp(prefix="ovc-jax-tests-compilation-cache-")
  os.environ[_SHARED] = COMPILATION_CACHE
  atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)

ENV = dict(PLAIN_ENV, JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# `python -m experiments.certify ARGS...`, except that once this process has
# finished an input (a line added to its done.txt, of the workdir or of a
# multi-process run's part) it stops in the middle of its next input and
# waits there until it is signalled. A test that kills it or presses Ctrl-C
# after seeing done.txt grow thus always finds it mid-input, however fast the
# run is and however late the signal comes; only the moment changes, not the
# code the signal interrupts or what the command does with it. Ctrl-C gets
# the handler Python installs in a terminal: where the tests run with SIGINT
# ignored (pytest started as a background job of a non-interactive shell,
# `nohup ... &`), the child inherits that, and Python would leave SIGINT
# ignored, so that the run would never see the test's Ctrl-C.
_PAUSED_CERTIFY = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from experiments.common import certify_job
certify_novel = certify_job.certify_novel
done_at_start = {}
def done_lines(workdir):
  path = os.path.join(workdir, "done.txt")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\\n")
def paused_after_an_input(setup, *args, **kwargs):
  start = done_at_start.setdefault(setup.workdir, done_lines(setup.workdir))
  if done_lines(setup.workdir) > start:
    sys.stderr.write("paused mid-input until signalled\\n")
    sys.stderr.flush()
    while True:
      time.sleep(0.01)
  return certify_novel(setup, *args, **kwargs)
certify_job.certify_novel = paused_after_an_input
runpy.run_module("experiments.certify", run_name="__main__", alter_sys=True)
"""


def paused_certify(*args: str) -> list[str]:
  """The command line of `python -m experiments.certify ARGS...` that pauses
  after its first input (see _PAUSED_CERTIFY); run it in REPO."""
  return [sys.executable, "-c", _PAUSED_CERTIFY, *args]

