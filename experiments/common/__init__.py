"""What every experiment entry point shares, one module per job.

Library code takes plain arguments; this package is where flags and configs
meet it. A mistake of the user's, a file-system problem and Ctrl-C end the
program with one line `error: ...` on stderr and a non-zero exit status, never
a traceback.

  cli            exit_on_user_error, run_app, define_config_flag, config_help:
                 flags and configs in, one-line errors out
  config_lists   check_number_list, check_name_list: list-valued config fields
  files          atomic_write_text, write_json, save_figure: whole files or
                 none; WorkdirError, disk errors as one line
  workdir        workdir_lock (one run per workdir), check_workdir_path,
                 check_workdir_config (config.json)
  resumable      ResumableRun: exactly-once TSV rows across kills and restarts
  progress       Progress (rate and ETA), format_duration, timed

The names below are re-exported, so `common.X` works for each of them. The
job modules (certify_job, distributed, sequential_job, ...) import these,
never the other way round.
"""

from experiments.common.cli import INTERRUPTED_EXIT_STATUS
from experiments.common.cli import config_fields
from experiments.common.cli import config_help
from experiments.common.cli import define_config_flag
from experiments.common.cli import exit_on_user_error
from experiments.common.cli import parse_flags
from experiments.common.cli import run_app
from experiments.common.config_lists import check_name_list
from experiments.common.config_lists import check_number_list
from experiments.common.files import WorkdirError
from experiments.common.files import atomic_write_text
from experiments.common.files import discard_dir
from experiments.common.files import disk_error
from experiments.common.files import os_error_message
from experiments.common.files import remove_empty_dirs
from experiments.common.files import save_figure
from experiments.common.files import write_json
from experiments.common.progress import Progress
from experiments.common.progress import format_duration
from experiments.common.progress import timed
from experiments.common.resumable import ResumableRun
from experiments.common.workdir import LOCK_NAME
from experiments.common.workdir import WEIGHTS_KEY
from experiments.common.workdir import acquire_workdir
from experiments.common.workdir import check_workdir_config
from experiments.common.workdir import check_workdir_path
from experiments.common.workdir import first_difference
from experiments.common.workdir import release_workdir
from experiments.common.workdir import workdir_lock
from ovc_jax.errors import ConfigError
from ovc_jax.errors import OVCError

__all__ = [
    "INTERRUPTED_EXIT_STATUS", "LOCK_NAME", "WEIGHTS_KEY", "ConfigError",
    "OVCError", "Progress", "ResumableRun", "WorkdirError",
    "acquire_workdir", "atomic_write_text", "check_name_list",
    "check_number_list", "check_workdir_config", "check_workdir_path",
    "config_fields", "config_help", "define_config_flag", "discard_dir",
    "disk_error", "exit_on_user_error", "first_difference",
    "format_duration", "os_error_message", "parse_flags",
    "release_workdir", "remove_empty_dirs", "run_app", "save_figure",
    "timed", "workdir_lock", "write_json",
]
