"""One certify run across several processes (and hosts), merged into one workdir.

`python -m experiments.certify --distributed ...` started once per process
(by Slurm's srun, mpirun, a TPU pod's `--worker=all`, or by hand) calls
`jax.distributed.initialize()` and then:

  split     the run's selected dataset indices (in dataset order) are divided
            strided: process k of n certifies indices[k::n]. Every process
            gets floor(N/n) or ceil(N/n) inputs, and inputs that are slower
            in some stretch of the dataset are spread over all processes.
  certify   one input at a time on the process's local devices, each input's
            noise keyed by (seed, dataset index) only
            (`ovc_jax.sampler.input_key`), so every row equals the one a
            one-process run writes. Rows go to the process's own part:
              WORKDIR/parts/process_<k>_of_<n>/{config.json,done.txt,tsv/}
            through `ResumableRun` (exactly-once rows, its own lock), and
            caches to the shared WORKDIR/caches/sigma_<s>/<idx>/ (each input's
            by the process that certified it).
  barrier   the distributed runtime's key-value-store barrier
            (`DistributedRuntimeClient.wait_at_barrier`, with a timeout); no
            device collectives are needed, so it works on CPU, GPU and TPU
            alike. (`multihost_utils.sync_global_devices` also works on CPU
            here, through gloo, but waits without a timeout.)
  merge     process 0 checks every part is of this run (its config.json,
            the weights' hashes, the number of processes) and complete,
            then writes the usual
            WORKDIR/tsv/<method>/sigma_<s>/<prompt>.tsv with rows in dataset
            index order (what a one-process run writes), WORKDIR/done.txt and
            WORKDIR/summary.json (with per-process seconds per input, the
            wall time and the throughput) and every figure a one-process
            run draws. `python -m experiments.merge
            --workdir=DIR` does the same later, for processes that finished
            at different times.

WORKDIR/distributed.json records the number of processes: a restart with
another number is refused (the parts would not line up), and so is a
one-process run on a multi-process workdir.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import socket
import sys
import time
from typing import Iterable, Sequence

from experiments import common
from experiments.common import certify_job
# The workdir's record of the number of processes; certify_job checks it too.
from experiments.common.distributed_record import PARTS
from experiments.common.distributed_record import RECORD
from experiments.common.distributed_record import SPLIT_RULE
from experiments.common.distributed_record import DistributedError
from experiments.common.distributed_record import check_record
from experiments.common.distributed_record import check_single_process  # pylint: disable=unused-import
from experiments.common.distributed_record import read_record
from ovc_jax.errors import ConfigError

TIMING = "timing.json"
BARRIER_DONE = "ovc_certify_parts_done"

# When this process started (near enough: experiments.certify imports this
# module at its start, after JAX): the wall time counts model loading and
# compilation, not the seconds Python takes to import JAX.
_PROCESS_START = time.time()


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """This process's place in a run: process `process_id` of `num_processes`."""

  process_id: int = 0
  num_processes: int = 1

  @property
  def is_distributed(self) -> bool:
    return self.num_processes > 1

  def __str__(self) -> str:
    return f"process {self.process_id} of {self.num_processes}"


# ---------------------------------------------------------------------------
# Starting up


def parse_coordinator_address(address: str) -> tuple[str, int]:
  """(host, port) of --coordinator_address HOST:PORT ([IPv6]:PORT too).

  Raises:
    ConfigError: not HOST:PORT, an empty host or a port outside [1, 65535].
  """
  text = str(address).strip()
  host, sep, port = text.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ConfigError(
        f"--coordinator_address must be HOST:PORT with a port in [1, 65535] "
        f"(e.g. 127.0.0.1:12355, process 0's host); got {address!r}")
  try:
    socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
  except (OSError, UnicodeError) as e:
    raise ConfigError(f"--coordinator_address={address}: host {host!r} cannot "
                      f"be resolved ({e}); give process 0's host name or IP "
                      "address") from e
  return host, int(port)


def _check_port_free(address: str, port: int) -> None:
  """Process 0 starts the coordinator on `port` of every interface; a port
  already taken would end in JAX's native abort."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise ConfigError(
          f"--coordinator_address={address}: port {port} is in use on this "
          f"host ({e.strerror}), where process 0 starts the coordinator; "
          "pick a free port for every process") from e


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
  """Waits until something listens at host:port (process 0's coordinator).

  JAX's own wait for the coordinator ends in a native abort (exit status
  134) when it times out; this one ends in one line.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"no coordinator answered at --coordinator_address={host}:{port} "
            f"within {timeout_s:g} s (--barrier_timeout): start process 0 "
            "with the same address, or check the address") from None
      time.sleep(0.2)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               initialization_timeout: float = 300) -> ProcessInfo:
  """`jax.distributed.initialize`, before any JAX computation.

  Arguments left None are filled in by JAX's cluster detection (TPU pods,
  Slurm, Open MPI, ...); on a machine it cannot detect, give all three.
  A given coordinator address is checked first (HOST:PORT, a port in range,
  a host that resolves); a process other than 0 waits at most
  `initialization_timeout` seconds for process 0's coordinator to listen.

  Raises:
    ConfigError: a bad combination of arguments or a bad address.
    DistributedError: the runtime could not start (one line).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes must be >= 1; got {num_processes}")
  if process_id is not None and process_id < 0:
    raise ConfigError(f"--process_id must be >= 0; got {process_id}")
  if (num_processes is not None and process_id is not None
      and process_id >= num_processes):
    raise ConfigError(f"--process_id={process_id} must be below "
                      f"--num_processes={num_processes}")
  if not initialization_timeout > 0:
    raise ConfigError(f"--barrier_timeout must be > 0 seconds; got "
                      f"{initialization_timeout:g}")
  timeout_s = max(1, int(math.ceil(initialization_timeout)))
  if coordinator_address is not None:
    host, port = parse_coordinator_address(coordinator_address)
    if process_id == 0 and (num_processes or 2) > 1:
      _check_port_free(coordinator_address, port)
    if process_id is not None and process_id > 0 and (num_processes or 2) > 1:
      _wait_for_coordinator(host, port, timeout_s)
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except (ValueError, RuntimeError, IndexError, TypeError) as e:
    text = " ".join(str(e).split())[:400]
    hint = ("" if kwargs else "; outside a TPU pod, Slurm or Open MPI job, pass "
            "--coordinator_address=HOST:PORT --num_processes=N --process_id=K")
    raise DistributedError(
        f"jax.distributed.initialize failed: {text}{hint}") from e
  return ProcessInfo(jax.process_index(), jax.process_count())


def current() -> ProcessInfo:
  """This process's ProcessInfo (0 of 1 when JAX runs single-process)."""
  import jax  # pylint: disable=g-import-not-at-top
  return ProcessInfo(jax.process_index(), jax.process_count())


# ---------------------------------------------------------------------------
# Splitting


def shard(indices: Sequence[int], process_id: int,
          num_processes: int) -> list[int]:
  """The dataset indices process `process_id` certifies: indices[k::n]."""
  return list(indices)[process_id::num_processes]


def owner(position: int, num_processes: int) -> int:
  """The process that certifies the input at `position` in the indices."""
  return position % num_processes


def part_dir(workdir: str, process_id: int, num_processes: int) -> str:
  return os.path.join(workdir, PARTS,
                      f"process_{process_id}_of_{num_processes}")


# ---------------------------------------------------------------------------
# Barrier


RESTART_ADVICE = ("restart the whole job (every process, with the same "
                  "flags): each process redoes only its own missing inputs")


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reaches `name` (no-op in a one-process run).

  Raises:
    DistributedError: not every process arrived within `timeout_s`, or the
      runtime lost another process on the way (its heartbeat stopped: it was
      killed or crashed); the message says which.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    return
  start = time.monotonic()
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError)
    raise barrier_error(name, timeout_s, time.monotonic() - start, e) from e


def barrier_error(name: str, timeout_s: float, waited_s: float,
                  cause: BaseException) -> DistributedError:
  """The one line of a failed barrier: a timeout, or a process that died."""
  detail = " ".join(str(cause).split())[:200]
  if waited_s < 0.9 * timeout_s:
    # Not the timeout: the coordination service gave up on a peer.
    return PeerLostError(
        f"another process of this job stopped (killed or crashed: the "
        f"coordination service lost its heartbeat) while this one waited "
        f"{waited_s:.0f} s at barrier {name!r}; its part is incomplete and it "
        f"cannot rejoin: {RESTART_ADVICE} ({detail})")
  return DistributedError(
      f"not every process reached barrier {name!r} within {timeout_s:g} s "
      f"(--barrier_timeout) ({detail})")


class PeerLostError(DistributedError):
  """Another process of the job died: only a restart of the job helps."""


# ---------------------------------------------------------------------------
# Parts


def read_done(path: str) -> list[int]:
  """The input indices a done.txt lists (an unfinished last line is not)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  return [int(line) for line in lines[:-1] if line.strip().isdigit()]


def _ranges(values: Iterable[int]) -> str:
  values = list(values)
  shown = ", ".join(str(v) for v in values[:20])
  return shown + (f", ... ({len(values)} in all)" if len(values) > 20 else "")


def missing_inputs(workdir: str, indices: Sequence[int],
                   num_processes: int) -> dict[int, list[int]]:
  """{process: its input indices its part has not finished} (only nonempty)."""
  out = {}
  for k in range(num_processes):
    done = set(read_done(os.path.join(part_dir(workdir, k, num_processes),
                                      "done.txt")))
    missing = [i for i in shard(indices, k, num_processes) if i not in done]
    if missing:
      out[k] = missing
  return out


def check_parts(workdir: str, indices: Sequence[int],
                num_processes: int) -> None:
  """Raises DistributedError, one line naming the missing inputs and their
  owners, unless every part holds all its inputs."""
  missing = missing_inputs(workdir, indices, num_processes)
  if missing:
    parts = "; ".join(
        f"process {k} ({os.path.join(PARTS, os.path.basename(part_dir(workdir, k, num_processes)))})"
        f" has not certified input{'s' if len(v) > 1 else ''} {_ranges(v)}"
        for k, v in missing.items())
    raise DistributedError(
        f"cannot merge {workdir}: {parts}; run those processes again with the "
        "same flags (each redoes only its own missing inputs), then merge")


def merge_tables(workdir: str, tables: dict[str, str], indices: Sequence[int],
                 num_processes: int) -> None:
  """Writes each table of `tables` ({top-level tsv path: header}) from the
  parts' copies, rows in the order of `indices`. Every table is read and
  checked first: a damaged part leaves the top-level tsv/ as it was."""
  order = {idx: position for position, idx in enumerate(indices)}
  merged = {}
  for path, header in tables.items():
    rel = os.path.relpath(path, workdir)
    rows: dict[int, str] = {}
    for k in range(num_processes):
      part = part_dir(workdir, k, num_processes)
      done = set(read_done(os.path.join(part, "done.txt")))
      part_path = os.path.join(part, rel)
      if not os.path.exists(part_path):
        continue
      with open(part_path) as f:
        lines = f.read().split("\n")
      for line in lines[1:-1]:  # the last element is '' or a partial row
        idx = line.split("\t", 1)[0]
        if idx.isdigit() and int(idx) in done and int(idx) in order:
          rows.setdefault(int(idx), line + "\n")
    absent = [i for i in indices if i not in rows]
    if absent:
      owners = sorted({owner(order[i], num_processes) for i in absent})
      where = "; ".join(
          f"{os.path.join(_part_name(k, num_processes), rel)} lacks the rows "
          f"of input{'s' if len(mine) > 1 else ''} {_ranges(mine)}"
          for k in owners
          for mine in [[i for i in absent
                        if owner(order[i], num_processes) == k]])
      raise DistributedError(
          f"cannot merge {workdir}: {where} (listed as done in that part's "
          "done.txt); the part is damaged: delete those inputs from its "
          "done.txt and run its process again")
    merged[path] = header + "".join(rows[i] for i in sorted(rows, key=order.get))
  for path, text in merged.items():
    common.atomic_write_text(path, text)


def _part_name(process_id: int, num_processes: int) -> str:
  """parts/process_<k>_of_<n>: a part's folder relative to the workdir."""
  return os.path.join(PARTS, f"process_{process_id}_of_{num_processes}")


def check_parts_belong(workdir: str, num_processes: int) -> None:
  """Refuses parts of another run: parts of another number of processes, or
  a part whose config.json (seed, n, ..., the weights' hashes) differs from
  the workdir's.

  Raises:
    DistributedError: one line naming the part and the first difference.
  """
  parts = os.path.join(workdir, PARTS)
  if os.path.isdir(parts):
    for name in sorted(os.listdir(parts)):
      m = re.fullmatch(r"process_(\d+)_of_(\d+)", name)
      if m and int(m.group(2)) != num_processes:
        raise DistributedError(
            f"cannot merge {workdir}: {os.path.join(PARTS, name)} is a part of "
            f"a run of {m.group(2)} processes, but the workdir's {RECORD} "
            f"records {num_processes}: its inputs do not line up; remove it or "
            "pass another --workdir")
  top = _read_config(os.path.join(workdir, "config.json"))
  for k in range(num_processes):
    path = os.path.join(part_dir(workdir, k, num_processes), "config.json")
    if not os.path.exists(path):
      continue  # a part not started: check_parts names its inputs
    part = _read_config(path)
    diff = common.first_difference(
        {**top, common.WEIGHTS_KEY: None}, {**part, common.WEIGHTS_KEY: None},
        ("in the workdir", "in the part"))
    if diff is None:
      mine = top.get(common.WEIGHTS_KEY) or {}
      theirs = part.get(common.WEIGHTS_KEY) or {}
      for kind in sorted(set(mine) & set(theirs)):
        if mine[kind] != theirs[kind]:
          diff = (f"model weights {kind}: {mine[kind]} in the workdir, "
                  f"{theirs[kind]} in the part")
          break
    if diff is not None:
      raise DistributedError(
          f"cannot merge {workdir}: {_part_name(k, num_processes)} holds a part "
          f"of a different run ({diff}): merging would mix two runs' rows; "
          "remove that part and run its process again with the workdir's "
          "flags, or pass another --workdir")


def _read_config(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise DistributedError(f"cannot merge: {path} is unreadable or corrupted "
                           f"({e})") from e
  if not isinstance(value, dict):
    raise DistributedError(f"cannot merge: {path} is corrupted (not a JSON "
                           "object)")
  return value


def _timing(workdir: str, num_processes: int) -> list[dict]:
  out = []
  for k in range(num_processes):
    path = os.path.join(part_dir(workdir, k, num_processes), TIMING)
    try:
      with open(path) as f:
        out.append(json.load(f))
    except (OSError, ValueError):
      out.append({"process_id": k, "note": f"no {TIMING}"})
  return out


def time_summary(workdir: str, num_inputs: int, num_processes: int) -> dict:
  """Per-process seconds per input, the wall time and the throughput."""
  parts = _timing(workdir, num_processes)
  starts = [p["started"] for p in parts if "started" in p]
  ends = [p["finished"] for p in parts if "finished" in p]
  wall = (max(ends) - min(starts)) if starts and ends else None
  return {
      "num_processes": num_processes,
      "split": SPLIT_RULE,
      "processes": parts,
      "wall_seconds": wall,
      "inputs_per_hour": (num_inputs / wall * 3600.0) if wall else None,
      "note": ("per process: its last session (a resumed part counts only the "
               "inputs it certified then); wall_seconds: first start (after "
               "importing JAX) to last finish of those sessions, model "
               "loading, compilation and the warm-up input included; "
               "seconds_per_input excludes them"),
  }


# ---------------------------------------------------------------------------
# Running one process and merging


def _certify_part(setup, process: ProcessInfo, stream) -> dict:
  """Certifies this process's inputs into its part; returns its timing."""
  started = _PROCESS_START
  part = dataclasses.replace(
      setup, workdir=part_dir(setup.workdir, process.process_id,
                              process.num_processes),
      indices=shard(setup.indices, process.process_id, process.num_processes))
  with certify_job.journal(part) as journal_:
    tables = certify_job.all_tables(part)
    journal_.prepare(tables)
    todo = journal_.remaining(part.indices)
    if not todo:
      stream.write(f"{process}: all {len(part.indices)} of its inputs are done "
                   f"in {part.workdir}\n")
    if todo:
      stream.write(f"{process}: warming up (compiling) on input {todo[0]}...\n")
      certify_job.certify_input(part, todo[0])
    progress = common.Progress(len(part.indices), "inputs", stream=stream,
                               already_done=len(part.indices) - len(todo),
                               per=certify_job.progress_note(part))
    loop_start = time.perf_counter()
    for idx in todo:
      rows = certify_job.certify_input(part, idx)
      label = int(part.dataset.labels[idx])
      # Each row's own path: its method, prompt, sigma and base classifier.
      journal_.commit(idx, {
          r.path(part): (tables[r.path(part)],
                         r.line(idx, label, setup.config.alpha))
          for r in rows})
      progress.update(note=f"input {idx} ({process})")
    seconds = time.perf_counter() - loop_start
  timing = {"process_id": process.process_id,
            "inputs_owned": len(part.indices),
            "inputs_certified": len(todo),
            "seconds": seconds,
            "seconds_per_input": seconds / len(todo) if todo else None,
            "started": started, "finished": time.time()}
  common.write_json(os.path.join(part.workdir, TIMING), timing)
  return timing


def run_process(config, workdir: str, process: ProcessInfo, *,
                barrier_timeout_s: float = 24 * 3600.0, stream=sys.stderr):
  """One process of a multi-process certify run; process 0 also merges.

  Returns:
    (setup, summary) on process 0, (setup, None) on the others.
  """
  common.check_workdir_path(workdir)
  if config.cache_dir:
    common.check_workdir_path(config.cache_dir, "--config.cache_dir")
  # Refused before the model is loaded: another number of processes.
  check_record(workdir, process.num_processes)
  setup = certify_job.build_setup(config, workdir)
  if len(setup.indices) < process.num_processes:
    raise ConfigError(
        f"{len(setup.indices)} inputs selected for {process.num_processes} "
        "processes: some would have nothing to do; use fewer processes or "
        "select more inputs (--config.skip, --config.max)")
  check_record(workdir, process.num_processes, len(setup.indices))
  common.check_workdir_config(workdir, certify_job.result_config(config),
                              "results",
                              weights=certify_job.weights_hashes(setup.loaded))
  if setup.is_toy and process.process_id == 0:
    stream.write(f"note: {certify_job.MODEL_NOTE}\n")
  _certify_part(setup, process, stream)
  stream.write(f"{process}: part done; waiting for the other processes\n")
  stream.flush()
  try:
    barrier(BARRIER_DONE, barrier_timeout_s)
  except DistributedError as e:
    if process.process_id != 0 or isinstance(e, PeerLostError):
      raise
    raise DistributedError(
        f"{e}; when every process has finished, run `python -m "
        f"experiments.merge --workdir={workdir}`") from e
  if process.process_id != 0:
    return setup, None
  return setup, merge_setup(setup, stream=stream)


def merge_setup(setup, *, stream=sys.stderr) -> dict:
  """Merges a multi-process workdir's parts; writes tsv/, done.txt and
  summary.json (and the figure) at its top. Returns the summary."""
  workdir = setup.workdir
  record = read_record(workdir)
  if record is None:
    raise DistributedError(f"{workdir} is not a multi-process certify workdir "
                           f"(no {RECORD})")
  n = record["num_processes"]
  with common.workdir_lock(workdir):
    check_parts_belong(workdir, n)
    check_parts(workdir, setup.indices, n)
    merge_tables(workdir, certify_job.all_tables(setup), setup.indices, n)
    common.atomic_write_text(os.path.join(workdir, "done.txt"),
                             "".join(f"{i}\n" for i in setup.indices))
    summary = certify_job.summarize_run(setup)
    summary["config"] = setup.config.to_dict()
    timing = time_summary(workdir, len(setup.indices), n)
    summary["recomputed_inputs"] = sum(
        p.get("inputs_certified", 0) for p in timing["processes"])
    summary["distributed"] = timing
    # Every figure a one-process run draws, and their summary keys.
    certify_job.draw_figures(setup, summary)
    common.write_json(os.path.join(workdir, "summary.json"), summary)
  stream.write(f"merged {n} parts into {workdir}/tsv/ ({len(setup.indices)} "
               "inputs, dataset index order)\n")
  return summary


def merge_workdir(workdir: str, stream=sys.stderr):
  """`experiments.merge`: the parts of a finished multi-process workdir."""
  if not os.path.isdir(workdir):
    raise DistributedError(f"no workdir {workdir}")
  record = read_record(workdir)
  if record is None:
    raise DistributedError(f"{workdir} is not a multi-process certify workdir "
                           f"(no {RECORD})")
  config = certify_job.config_from_workdir(workdir)
  setup = certify_job.build_setup(config, workdir)
  # The same weights as the parts were certified with.
  common.check_workdir_config(workdir, certify_job.result_config(config),
                              "results",
                              weights=certify_job.weights_hashes(setup.loaded))
  return setup, merge_setup(setup, stream=stream)


def print_time(summary: dict, stream=sys.stdout) -> None:
  t = summary.get("distributed")
  if not t:
    return
  w = stream.write
  w(f"\n{t['num_processes']} processes ({t['split']}):\n")
  for p in t["processes"]:
    spi = p.get("seconds_per_input")
    w(f"  process {p.get('process_id')}: {p.get('inputs_certified', 0)} of "
      f"{p.get('inputs_owned', '?')} inputs certified in its last session"
      + (f", {spi:.3f} s/input" if spi else "") + "\n")
  if t["wall_seconds"]:
    w(f"  wall time {t['wall_seconds']:.1f} s, {t['inputs_per_hour']:.1f} "
      "inputs/hour\n")
