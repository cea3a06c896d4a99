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
with the same flags, it resumes and finishes with the same rows.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from experiments.common import certify_job

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "certify.py"),
    "Certify config file (with :variants).", lock_config=True)
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
  app.run(main)
