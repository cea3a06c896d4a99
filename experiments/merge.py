r"""Merges the parts of a multi-process certify run into its usual TSVs.

  python -m experiments.merge --workdir=DIR

A run started with `python -m experiments.certify --distributed` on N
processes writes DIR/parts/process_<k>_of_<N>/; process 0 merges them when
every process is done. This command does the same later, e.g. when the
processes finished at different times or the barrier timed out: it writes
DIR/tsv/<method>/sigma_<s>/<prompt>.tsv (rows in dataset index order, as a
one-process run writes them), DIR/done.txt and DIR/summary.json. A part that
is missing inputs is refused, in one line naming them and their process. See
docs/DISTRIBUTED.md.
"""

from absl import app
from absl import flags

from experiments import common
from experiments.common import certify_job
from experiments.common import distributed

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The multi-process certify run's workdir.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  setup, summary = distributed.merge_workdir(_WORKDIR.value)
  certify_job.print_report(setup, summary)
  distributed.print_time(summary)


if __name__ == "__main__":
  common.run_app(main)
