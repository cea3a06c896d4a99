"""Multi-process certification (experiments/common/distributed.py), on CPU.

Two processes on this machine (coordinator at 127.0.0.1 on a free port, two
forced host devices each) certify a CI-sized toy run; process 0 merges their
parts. The merged TSVs must equal a one-process run's row for row (every
column but time) for standard RS and the three OVC methods, also after a
SIGKILL mid-run and a restart. Every child process runs under a timeout and
is killed in a `finally`, whatever the test's outcome.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments.common import distributed
from ovc_jax.errors import OVCError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import commands  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_experiments import ENV, REPO, TINY, tsv_rows_without_time  # pylint: disable=g-import-not-at-top,wrong-import-position

CHILD_ENV = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
TIMEOUT_S = 300  # per child process


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(workdir, n=2, extra=(), paused=False):
  """Starts n certify processes of one run; always kills them at the end.

  paused: each process pauses mid-input once it has finished an input of its
  share (commands.paused_certify), until it is killed.
  """
  port = free_port()
  procs = []
  try:
    for k in range(n):
      args = [f"--workdir={workdir}", *TINY, *extra, "--distributed",
              f"--coordinator_address=127.0.0.1:{port}",
              f"--num_processes={n}", f"--process_id={k}"]
      procs.append(subprocess.Popen(
          commands.paused_certify(*args) if paused else
          [sys.executable, "-m", "experiments.certify", *args],
          cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True, start_new_session=True))
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      try:
        p.communicate(timeout=30)
      except subprocess.TimeoutExpired:
        pass


def wait_all(procs, timeout=TIMEOUT_S):
  deadline = time.time() + timeout
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=max(deadline - time.time(), 1))
    outs.append((p.returncode, out, err))
  return outs


@pytest.fixture(scope="module")
def reference(tiny_certify_run):
  """A plain one-process run (one device, no flags): conftest's session-wide
  TINY run, which tests/test_experiments.py reads too."""
  workdir, _, seconds = tiny_certify_run
  return workdir, seconds


def test_two_processes_killed_restarted_and_merged_equal_one_process(
    reference, warm_python, tmp_path):
  """SIGKILL mid-run, a refused merge, a restart: the one-process rows.

  (One flow, not two tests, to keep the file CI-sized: the restart is a
  complete two-process run of the inputs left.)
  """
  ref, ref_seconds = reference
  workdir = str(tmp_path / "killed")
  done0 = os.path.join(distributed.part_dir(workdir, 0, 2), "done.txt")
  # Process 0 (inputs 0 and 800) pauses in input 800 once input 0 is done;
  # process 1 (input 400) finishes its share and waits for it: both are
  # still running when the kills land, however slow the machine.
  with processes(workdir, paused=True) as procs:
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if distributed.read_done(done0):
        break
      time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "finished before the kill"
    procs[1].send_signal(signal.SIGKILL)  # one process dies mid-run...
    procs[1].wait()
    # ...and JAX's coordination service would take the job down after its
    # heartbeat timeout; a scheduler kills the rest at once.
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
  with open(os.path.join(ref, "done.txt")) as f:
    indices = [int(line) for line in f.read().split()]
  missing = distributed.missing_inputs(workdir, indices, 2)
  if not missing:  # both finished their shares before the signals landed
    os.truncate(os.path.join(distributed.part_dir(workdir, 1, 2), "done.txt"),
                0)
    missing = distributed.missing_inputs(workdir, indices, 2)
  done_before = len(indices) - sum(len(v) for v in missing.values())

  proc = warm_python.run("experiments.merge", f"--workdir={workdir}",
                         timeout=TIMEOUT_S)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cannot merge"), lines
  for k, idx in missing.items():
    assert f"process {k} " in lines[0]
    for i in idx:
      assert str(i) in lines[0]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  # A one-process run on it is refused.
  proc = warm_python.run("experiments.certify", f"--workdir={workdir}", *TINY,
                         timeout=TIMEOUT_S)
  assert proc.returncode == 1 and "2 processes" in proc.stderr

  start = time.perf_counter()
  with processes(workdir) as procs:  # the restart
    outs = wait_all(procs)
  seconds = time.perf_counter() - start
  for k, (rc, _, err) in enumerate(outs):
    assert rc == 0, (k, err[-3000:])
  merged = tsv_rows_without_time(workdir)
  # standard RS (known and novel prompts) and the three OVC methods
  assert {p.split(os.sep)[1] for p in merged} == {"standard", "irs", "cached",
                                                  "mvn"}
  assert merged == tsv_rows_without_time(ref)
  # Each part holds only its process's share: indices[k::2].
  for k in range(2):
    part = distributed.part_dir(workdir, k, 2)
    assert sorted(distributed.read_done(os.path.join(part, "done.txt"))) == (
        indices[k::2])
  with open(os.path.join(workdir, "done.txt")) as f:
    assert [int(line) for line in f.read().split()] == indices
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(ref, "summary.json")) as f:
    ref_summary = json.load(f)
  assert summary["inputs"] == ref_summary["inputs"]
  assert summary["cached_identical_to_standard"] == ref_summary[
      "cached_identical_to_standard"]
  for name, entry in ref_summary["methods"].items():
    assert summary["methods"][name]["certified_accuracy"] == entry[
        "certified_accuracy"]
  timing = summary["distributed"]
  assert timing["num_processes"] == 2
  assert timing["wall_seconds"] > 0 and timing["inputs_per_hour"] > 0
  assert "2 processes" in outs[0][1] and "inputs/hour" in outs[0][1]
  print(f"\nwall time: 1 process {ref_seconds:.1f} s (all inputs), 2 "
        f"processes {seconds:.1f} s (the restart)")
  # Each process redid only its own missing inputs.
  assert summary["recomputed_inputs"] == len(indices) - done_before
  for k, p in enumerate(summary["distributed"]["processes"]):
    assert p["inputs_certified"] == len(missing.get(k, []))


# In-process checks of the rules (no JAX runtime needed).


def test_strided_split_covers_every_input_once():
  indices = list(range(0, 1000, 7))
  for n in (1, 2, 3, 8):
    parts = [distributed.shard(indices, k, n) for k in range(n)]
    assert sorted(sum(parts, [])) == indices
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for position, idx in enumerate(indices):
      assert idx in parts[distributed.owner(position, n)]


def test_another_number_of_processes_is_refused(tmp_path):
  workdir = str(tmp_path)
  distributed.check_record(workdir, 2, 10)
  distributed.check_record(workdir, 2, 10)  # the same number: fine
  with pytest.raises(OVCError, match="started by 2 processes.*--num_processes=2"):
    distributed.check_record(workdir, 3, 10)
  with pytest.raises(OVCError, match="run of 2 processes"):
    distributed.check_single_process(workdir)


def test_merge_refuses_incomplete_parts(tmp_path):
  workdir = str(tmp_path)
  indices = [0, 10, 20, 30, 40]
  for k, done in ((0, [0, 20]), (1, [10])):
    part = distributed.part_dir(workdir, k, 2)
    os.makedirs(part)
    with open(os.path.join(part, "done.txt"), "w") as f:
      f.write("".join(f"{i}\n" for i in done) + "30")  # an unfinished line
  with pytest.raises(OVCError) as e:
    distributed.check_parts(workdir, indices, 2)
  message = str(e.value)
  assert "\n" not in message
  assert "process 0 (parts/process_0_of_2) has not certified input 40" in message
  assert "process 1 (parts/process_1_of_2) has not certified input 30" in message
