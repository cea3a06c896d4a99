"""The record of a multi-process certify workdir: how many processes wrote it.

WORKDIR/distributed.json records the number of processes of a run started
with --distributed: a restart with another number is refused (the parts would
not line up), and so is a one-process run on a multi-process workdir. Both
the one-process job (`certify_job.run`) and the multi-process one
(`distributed`) check it, so it lives apart from either.
"""

from __future__ import annotations

import json
import os

from experiments import common

PARTS = "parts"
RECORD = "distributed.json"
SPLIT_RULE = "strided: process k of n certifies indices[k::n]"


class DistributedError(common.WorkdirError):
  """A multi-process run cannot start, finish or be merged."""


def read_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, RECORD)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise DistributedError(f"{path} is corrupted ({e}); restore it or pass "
                           "another --workdir") from e
  if not isinstance(record, dict) or not isinstance(
      record.get("num_processes"), int):
    raise DistributedError(f"{path} is corrupted (no num_processes); restore "
                           "it or pass another --workdir")
  return record


def check_record(workdir: str, num_processes: int,
                 num_inputs: int | None = None) -> None:
  """Records the number of processes in a new workdir; refuses another one.

  With `num_inputs` None it only checks (before the model is loaded) and
  writes nothing.

  Raises:
    DistributedError: the workdir was started with another number of
      processes, or holds a one-process run.
  """
  record = read_record(workdir)
  if record is None:
    if os.path.exists(os.path.join(workdir, "done.txt")):
      raise DistributedError(
          f"workdir {workdir} holds a one-process run (done.txt, no {RECORD}); "
          "resume it without --distributed, or pass another --workdir")
    if num_inputs is None:
      return
    common.write_json(os.path.join(workdir, RECORD), {
        "num_processes": num_processes, "split": SPLIT_RULE,
        "inputs": num_inputs,
        "parts": os.path.join(PARTS, f"process_<k>_of_{num_processes}")})
    return
  if record["num_processes"] != num_processes:
    raise DistributedError(
        f"workdir {workdir} was started by {record['num_processes']} processes "
        f"({RECORD}), not {num_processes}: its inputs are split among "
        f"{record['num_processes']} parts; restart with "
        f"{record['num_processes']} processes (--num_processes="
        f"{record['num_processes']}), or pass another --workdir")


def check_single_process(workdir: str) -> None:
  """Refuses a one-process run on a workdir of a multi-process run."""
  record = read_record(workdir)
  if record is not None and record["num_processes"] > 1:
    raise DistributedError(
        f"workdir {workdir} belongs to a run of {record['num_processes']} "
        f"processes ({RECORD}): resume it with --distributed and "
        f"{record['num_processes']} processes, merge finished parts with "
        f"`python -m experiments.merge --workdir={workdir}`, or pass another "
        "--workdir")
