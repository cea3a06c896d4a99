"""Multi-process certification (experiments/common/distributed.py), on CPU.

Two processes on this machine (coordinator at 127.0.0.1 on a free port, two
forced host devices each) certify a CI-sized toy run of the clipure variant
(plain CLIP and CLIPure-Cos, two base classifiers); process 0 merges their
parts. The merged TSVs must equal a one-process run's row for row (every
column but time) for standard RS and the three OVC methods of both base
classifiers, also after a SIGKILL mid-run and a restart, and the merged
workdir must hold every figure the one-process run draws. Every child
process runs under a timeout and is killed in a `finally`, whatever the
test's outcome.

The rules of merging (parts of another run, damaged parts, the sequential
mode's figure) are checked in this process on parts certified here one after
the other (no JAX runtime: the barrier is a no-op without one).
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments.common import distributed
from ovc_jax import results
from ovc_jax.errors import OVCError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import commands  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_experiments import ENV, REPO, TINY, run, tsv_rows_without_time  # pylint: disable=g-import-not-at-top,wrong-import-position

CHILD_ENV = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
TIMEOUT_S = 300  # per child process
# Every variant that writes more than one base classifier: clipure (CLIPure-
# Cos beside plain CLIP). Two small steps keep it CI-sized and still purify.
CLIPURE = ["--config=experiments/configs/certify.py:clipure",
           "--config.clipure.steps=2", "--config.clipure.step_size=0.1"]
METHODS = {"standard", "irs", "cached", "mvn"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def processes(workdir, n=2, extra=tuple(CLIPURE), paused=False):
  """Starts n certify processes of one run; always kills them at the end.

  paused: each process pauses mid-input once it has finished an input of its
  share (commands.paused_certify), until it is killed.
  """
  port = free_port()
  procs = []
  try:
    for k in range(n):
      args = [f"--workdir={workdir}", *extra, *TINY, "--distributed",
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


@pytest.mark.heavy
@pytest.mark.xdist_group("clipure_run")
def test_two_processes_killed_restarted_and_merged_equal_one_process(
    clipure_certify_run, warm_python, tmp_path):
  """SIGKILL mid-run, a refused merge, a restart: the one-process rows.

  (One flow, not two tests, to keep the file CI-sized: the restart is a
  complete two-process run of the inputs left.)
  """
  ref, ref_seconds = clipure_certify_run  # one process, one device
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
  proc = warm_python.run("experiments.certify", f"--workdir={workdir}",
                         *CLIPURE, *TINY, timeout=TIMEOUT_S)
  assert proc.returncode == 1 and "2 processes" in proc.stderr

  start = time.perf_counter()
  with processes(workdir) as procs:  # the restart
    outs = wait_all(procs)
  seconds = time.perf_counter() - start
  for k, (rc, _, err) in enumerate(outs):
    assert rc == 0, (k, err[-3000:])
  merged = tsv_rows_without_time(workdir)
  # standard RS (known and novel prompts) and the three OVC methods, of
  # plain CLIP (tsv/<method>/) and of CLIPure-Cos (tsv/clipure_cos/<method>/)
  folders = [p.split(os.sep) for p in merged]
  assert {f[1] for f in folders if f[1] != "clipure_cos"} == METHODS
  assert {f[2] for f in folders if f[1] == "clipure_cos"} == METHODS
  assert merged == tsv_rows_without_time(ref)
  # Each part wrote each base classifier's rows into its own tables.
  for k in range(2):
    part = distributed.part_dir(workdir, k, 2)
    assert tsv_rows_without_time(part).keys() == merged.keys()
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
  # Every figure the one-process run draws, under the same summary keys.
  figures = {k for k in ref_summary if k.endswith("figure")}
  assert figures == {"figure", "comparison_figure"}
  for key in figures:
    assert os.path.basename(summary[key]) == os.path.basename(ref_summary[key])
    assert os.path.getsize(summary[key]) > 0 and summary[key].startswith(
        workdir)
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


# In-process parts: process 1's share, then process 0's (which merges), in
# this one process; the sequential mode, whose merge draws sequential.png.


# Its readers run on one xdist worker, so that it is made once.
SHARES_SEQUENTIAL_PARTS = pytest.mark.xdist_group("sequential_parts")


@pytest.fixture(scope="module")
def sequential_parts(tmp_path_factory):
  from test_reliability_experiments import tiny_config  # pylint: disable=g-import-not-at-top
  from test_sequential_experiment import SEQ  # pylint: disable=g-import-not-at-top
  config = tiny_config(**SEQ)
  workdir = str(tmp_path_factory.mktemp("sequential_parts") / "w")
  stream = io.StringIO()
  for k in (1, 0):
    _, summary = distributed.run_process(
        config, workdir, distributed.ProcessInfo(k, 2), stream=stream)
  return config, workdir, summary


@pytest.mark.heavy  # starts its xdist group early
@SHARES_SEQUENTIAL_PARTS
def test_a_merged_sequential_run_draws_every_figure(sequential_parts):
  _, workdir, summary = sequential_parts
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  for key, name in (("figure", "certified_accuracy.png"),
                    ("sequential_figure", "sequential.png")):
    assert written[key] == summary[key] == os.path.join(workdir, name)
    assert os.path.getsize(written[key]) > 0
  assert written["sequential"]["sigma_0.25"]["inputs"] == 3


def _copy(workdir, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(workdir, out)
  return out


def _top_tables(workdir):
  return {p: open(p).read() for p in results.list_tsvs(
      os.path.join(workdir, "tsv"))}


@SHARES_SEQUENTIAL_PARTS
def test_merge_names_the_damaged_part_and_writes_nothing(sequential_parts,
                                                          tmp_path):
  workdir = _copy(sequential_parts[1], tmp_path)
  part = distributed.part_dir(workdir, 1, 2)
  table = sorted(results.list_tsvs(os.path.join(part, "tsv")))[-1]
  with open(table) as f:
    lines = f.read().splitlines(keepends=True)
  with open(table, "w") as f:
    f.writelines(lines[:1])  # its rows lost, input 400 still listed as done
  before = _top_tables(workdir)
  with pytest.raises(distributed.DistributedError) as e:
    distributed.merge_workdir(workdir, stream=io.StringIO())
  message = str(e.value)
  rel = os.path.relpath(table, workdir)
  assert rel.startswith(os.path.join("parts", "process_1_of_2", "tsv"))
  assert f"{rel} lacks the rows of input 400" in message, message
  assert "\n" not in message
  assert _top_tables(workdir) == before  # no table rewritten


@SHARES_SEQUENTIAL_PARTS
@pytest.mark.parametrize("case", ["seed", "weights", "count"])
def test_merge_refuses_a_part_of_another_run(sequential_parts, tmp_path, case):
  workdir = _copy(sequential_parts[1], tmp_path)
  path = os.path.join(distributed.part_dir(workdir, 1, 2), "config.json")
  with open(path) as f:
    config = json.load(f)
  if case == "seed":
    config["seed"] = 1  # as if copied from a seed-1 run
    expected = ("parts/process_1_of_2 holds a part of a different run (seed: "
                "0 in the workdir, 1 in the part)")
  elif case == "weights":
    old = config["model_weights"]["sha256"]
    config["model_weights"]["sha256"] = "0" * 64
    expected = (f"holds a part of a different run (model weights sha256: {old}"
                f" in the workdir, {'0' * 64} in the part)")
  else:
    shutil.copytree(distributed.part_dir(workdir, 1, 2),
                    distributed.part_dir(workdir, 1, 3))
    expected = ("parts/process_1_of_3 is a part of a run of 3 processes, but "
                "the workdir's distributed.json records 2")
  with open(path, "w") as f:
    json.dump(config, f)
  before = _top_tables(workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  with pytest.raises(distributed.DistributedError) as e:
    distributed.merge_workdir(workdir, stream=io.StringIO())
  assert expected in str(e.value) and "\n" not in str(e.value)
  assert _top_tables(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "summary.json"))


@SHARES_SEQUENTIAL_PARTS
def test_a_lost_peer_says_restart_the_job_not_merge(sequential_parts,
                                                    tmp_path, monkeypatch):
  """The runtime lost process 1's heartbeat after 65 s of a 86,400 s wait:
  the line names that cause and the step that helps (not the timeout, not
  experiments.merge, which cannot help while a part is incomplete)."""
  config, workdir, _ = sequential_parts
  workdir = _copy(workdir, tmp_path)
  cause = RuntimeError("UNAVAILABLE: The following tasks are unhealthy "
                       "(stopped sending heartbeats): /job:jax_worker/task:1")

  def barrier(name, timeout_s):
    raise distributed.barrier_error(name, timeout_s, 65.0, cause)

  monkeypatch.setattr(distributed, "barrier", barrier)
  with pytest.raises(distributed.DistributedError) as e:
    distributed.run_process(config, workdir, distributed.ProcessInfo(0, 2),
                            stream=io.StringIO())
  message = str(e.value)
  assert "another process of this job stopped" in message
  assert "heartbeat" in message and "restart the whole job" in message
  assert "86400" not in message and "experiments.merge" not in message
  # A real timeout still says so, and process 0 still points to the merge.
  timeout = distributed.barrier_error("b", 10.0, 10.2, RuntimeError("x"))
  assert not isinstance(timeout, distributed.PeerLostError)
  assert "within 10 s (--barrier_timeout)" in str(timeout)


def test_another_process_count_is_refused_before_loading_weights(
    tmp_path, monkeypatch):
  from experiments.common import certify_job  # pylint: disable=g-import-not-at-top
  from test_reliability_experiments import tiny_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  distributed.check_record(workdir, 2, 3)

  def build_setup(*args):
    raise AssertionError("the model was loaded before the record was checked")

  monkeypatch.setattr(certify_job, "build_setup", build_setup)
  with pytest.raises(distributed.DistributedError,
                     match="started by 2 processes.*--num_processes=2"):
    distributed.run_process(tiny_config(), workdir,
                            distributed.ProcessInfo(0, 3),
                            stream=io.StringIO())
  # A check alone writes no record.
  fresh = str(tmp_path / "fresh")
  distributed.check_record(fresh, 2)
  assert distributed.read_record(fresh) is None


@pytest.mark.parametrize("address, fragment", [
    ("notahost", "must be HOST:PORT with a port in [1, 65535]"),
    ("127.0.0.1:99999", "must be HOST:PORT with a port in [1, 65535]"),
    ("127.0.0.1:0", "must be HOST:PORT"),
    (":1234", "must be HOST:PORT"),
    ("no-such-host.invalid:1234", "host 'no-such-host.invalid' cannot be "
     "resolved"),
])
def test_bad_coordinator_addresses_are_refused_before_starting(address,
                                                               fragment):
  with pytest.raises(OVCError) as e:
    distributed.initialize(address, 2, 1)
  assert fragment in str(e.value) and "--coordinator_address" in str(e.value)
  assert "\n" not in str(e.value)


def test_a_coordinator_that_never_answers_is_waited_for_a_bounded_time():
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError,
                     match=r"no coordinator answered at --coordinator_address="
                     r"127\.0\.0\.1:\d+ within 1 s \(--barrier_timeout\)"):
    distributed.initialize(f"127.0.0.1:{free_port()}", 2, 1,
                           initialization_timeout=1)
  assert time.monotonic() - start < 10


def test_a_bad_coordinator_address_on_the_command_line_is_one_line():
  proc = run("experiments.certify", "--distributed",
             "--coordinator_address=notahost", "--num_processes=2",
             "--process_id=1", check=False, timeout=TIMEOUT_S)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "--coordinator_address" in errors[0], (
      proc.stderr[-3000:])


def test_process_0_refuses_a_port_in_use():
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(OVCError, match=f"port {port} is in use on this host"):
      distributed.initialize(f"127.0.0.1:{port}", 2, 0)
