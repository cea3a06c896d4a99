"""Commands run as `python -m MODULE ARGS...` from one warm interpreter.

Most of a command-line check that fails on a bad flag is starting Python and
importing JAX and the project (about 4 s of CPU each time). This server
imports them once (JAX's backend is not started, so no thread runs yet), then
forks once per command: the child runs the module as `python -m` does
(`runpy`, `sys.argv`, `__main__`, flags parsed at import and in `app.run`),
with stdin from /dev/null and stdout and stderr to files, and exits as a
fresh interpreter would (SystemExit's status or message, a traceback and
status 1 on any other exception, atexit handlers run). Each command is a
separate process: a pid of its own, its own exit status, nothing shared with
the next one. Tests about processes themselves (kill, Ctrl-C, two processes
at once, resume) start fresh interpreters instead.

  server = WarmPython(env)            # starts the server (imports ~4 s, once)
  proc = server.run("experiments.certify", "--workdir=...", timeout=300)
  proc.returncode, proc.stdout, proc.stderr  # as subprocess.run's
  server.close()
"""

import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every experiment imports before its flags are defined.
PRELOADED = ("jax", "jax.numpy", "numpy", "absl.app", "absl.flags",
             "absl.logging", "ml_collections.config_flags", "matplotlib",
             "experiments.common", "experiments.common.certify_job",
             "experiments.common.distributed", "experiments.common.curves")


class WarmPython:
  """A client of one server process (see the module docstring)."""

  def __init__(self, env: dict[str, str]):
    self._server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = self._server.stdout.readline()
    if ready.strip() != "ready":
      self.close()
      raise RuntimeError(f"the warm Python server did not start: {ready!r}")

  def run(self, module: str, *args: str,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` in the repository root, like
    subprocess.run(..., capture_output=True, text=True, timeout=timeout)."""
    with tempfile.TemporaryDirectory(prefix="warm-python-") as folder:
      out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
      request = {"module": module, "args": list(args), "stdout": out,
                 "stderr": err, "timeout": timeout}
      self._server.stdin.write(json.dumps(request) + "\n")
      self._server.stdin.flush()
      reply = self._server.stdout.readline()
      if not reply:
        raise RuntimeError("the warm Python server died")
      reply = json.loads(reply)
      with open(out, encoding="utf-8", errors="replace") as f:
        stdout = f.read()
      with open(err, encoding="utf-8", errors="replace") as f:
        stderr = f.read()
    argv = [sys.executable, "-m", module, *args]
    if reply["timed_out"]:
      raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, reply["returncode"], stdout,
                                       stderr)

  def close(self) -> None:
    if self._server.poll() is None:
      self._server.stdin.close()  # the server exits at end of input
      try:
        self._server.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._server.kill()
        self._server.wait()


# ---------------------------------------------------------------------------
# The server (this file run as a script).


def _exit_status(code) -> int:
  """What the interpreter exits with for SystemExit(code)."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  sys.stderr.write(f"{code}\n")
  return 1


def _child(request: dict) -> None:
  """Runs one command in the forked child; never returns."""
  import atexit  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  status = 1
  try:
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
      os.dup2(target, fd)
      os.close(target)
    sys.argv = [request["module"], *request["args"]]
    try:
      runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
      status = 0
    except SystemExit as e:
      status = _exit_status(e.code)
    except KeyboardInterrupt:
      traceback.print_exc()
      status = 130
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      status = 1
    try:
      atexit._run_exitfuncs()  # pylint: disable=protected-access
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(status)  # pylint: disable=protected-access


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
  """(exit status as subprocess reports it, timed out) of child `pid`."""
  deadline = time.monotonic() + timeout
  delay = 0.001
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status), False
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      _, status = os.waitpid(pid, 0)
      return os.waitstatus_to_exitcode(status), True
    time.sleep(delay)
    delay = min(delay * 2, 0.05)


def serve() -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  sys.path[0] = REPO  # as `python -m` in the repository root has it
  for name in PRELOADED:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  # Forking is safe only while JAX has started no backend (and no thread).
  assert not xla_bridge._backends, "a preloaded module started JAX"  # pylint: disable=protected-access
  requests, replies = sys.stdin, sys.stdout
  replies.write("ready\n")
  replies.flush()
  for line in requests:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(request)
    returncode, timed_out = _wait(pid, request["timeout"])
    replies.write(json.dumps({"returncode": returncode,
                              "timed_out": timed_out}) + "\n")
    replies.flush()


if __name__ == "__main__":
  serve()
