r"""Certify CLIP zero-shot classifiers with standard RS and the three OVC methods.

  python -m experiments.certify                      # embedded default, no flags
  python -m experiments.certify --config=experiments/configs/certify.py:cifar10,vit_b32,paper \
      --workdir=/tmp/cifar10_vit_b32

ovc mode (the default): for each input and sigma, certify every known prompt
(one encoder pass for all of them, which also fills the input's caches), then
certify every novel prompt four ways: standard RS, Modified-IRS, Cached-OVC
and MVN-OVC (approximate), each timed in this run.
single mode: one prompt, one method.

Writes WORKDIR/tsv/<method>/sigma_<s>/<prompt>.tsv (Cohen's columns and more),
WORKDIR/summary.json, and caches under WORKDIR/caches. Killed and restarted
with the same flags, it resumes and finishes with the same rows; a second run
on a workdir in use stops at once (the workdir is locked), and a finished
workdir is not computed again. `--help` lists the config's variants and fields.

Many processes or hosts: start the same command once per process with
--distributed (jax.distributed.initialize; on TPU pods, Slurm and Open MPI it
needs no more flags, elsewhere add --coordinator_address, --num_processes and
--process_id). Process k certifies the selected inputs k, k+n, k+2n, ... into
WORKDIR/parts/process_<k>_of_<n>/; process 0 merges them into the same
WORKDIR/tsv/ rows a one-process run writes. See docs/DISTRIBUTED.md.
"""

import os

from absl import app
from absl import flags

from experiments import common
from experiments.common import certify_job
from experiments.common import distributed
from experiments.configs import certify as certify_configs

_CONFIG = common.define_config_flag(certify_configs)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdirs", "certify"),
    "Where results, caches and the run's config go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() and certify this process's share of "
    "the inputs (docs/DISTRIBUTED.md). Its arguments are detected on TPU pods, "
    "Slurm and Open MPI; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --distributed: HOST:PORT of process 0's coordinator (default: "
    "detected).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "With --distributed: the number of processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "With --distributed: this process's id, 0 to num_processes-1 (default: "
    "detected).")
_BARRIER_TIMEOUT = flags.DEFINE_float(
    "barrier_timeout", 24 * 3600.0,
    "With --distributed: seconds process 0 waits for the others before "
    "merging (then `python -m experiments.merge` merges later); also bounds, "
    "up to 300 s, how long a process waits for the coordinator at start.")
# JAX's own default wait for the coordinator at start.
_START_TIMEOUT_S = 300.0


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  explicit = {"--coordinator_address": _COORDINATOR.value,
              "--num_processes": _NUM_PROCESSES.value,
              "--process_id": _PROCESS_ID.value}
  if not _DISTRIBUTED.value:
    given = [name for name, value in explicit.items() if value is not None]
    if given:
      raise app.UsageError(f"{', '.join(given)} needs --distributed")
    setup, summary = certify_job.run(_CONFIG.value, _WORKDIR.value)
    certify_job.print_report(setup, summary)
    return
  if not _BARRIER_TIMEOUT.value > 0:
    raise app.UsageError(f"--barrier_timeout must be > 0 seconds; got "
                         f"{_BARRIER_TIMEOUT.value:g}")
  process = distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      initialization_timeout=min(_START_TIMEOUT_S, _BARRIER_TIMEOUT.value))
  if not process.is_distributed:
    # One process after all: the plain run, its files exactly as ever.
    setup, summary = certify_job.run(_CONFIG.value, _WORKDIR.value)
    certify_job.print_report(setup, summary)
    return
  setup, summary = distributed.run_process(
      _CONFIG.value, _WORKDIR.value, process,
      barrier_timeout_s=_BARRIER_TIMEOUT.value)
  if summary is not None:
    certify_job.print_report(setup, summary)
    distributed.print_time(summary)


if __name__ == "__main__":
  common.run_app(main)
