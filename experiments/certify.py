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
"""

import os

from absl import app
from absl import flags

from experiments import common
from experiments.common import certify_job
from experiments.configs import certify as certify_configs

_CONFIG = common.define_config_flag(certify_configs)
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdirs", "certify"),
    "Where results, caches and the run's config go.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup, summary = certify_job.run(_CONFIG.value, _WORKDIR.value)
  certify_job.print_report(setup, summary)


if __name__ == "__main__":
  common.run_app(main)
