r"""Calibrate MVN-OVC's margin delta against exact certificates.

  python -m experiments.calibrate_mvn --certify_workdir=workdirs/certify

On every input, sigma and prompt (known and novel) of a finished ovc-mode
certify run, compare MVN-OVC without margin to the exact certificate (Cached-
OVC, identical to standard RS), both read from that run's caches. Reports the
smallest delta for which no MVN radius exceeds the exact radius, the rate and
size of the overshoots without margin, and draws MVN radius against exact
radius without and with the margin (PNG). Writes calibration.json beside it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

from absl import app
from absl import flags

from experiments import common
from experiments.common import certify_job
from experiments.common import mvn_calibration
from ovc_jax.certifiers import mvn_ovc
from ovc_jax.errors import ConfigError

_FLAGS = {}


def define_flags() -> None:
  """The entry point's flags, defined when this module is the program."""
  _FLAGS["workdir"] = flags.DEFINE_string(
      "certify_workdir", os.path.join("workdirs", "certify"),
      "A finished ovc-mode certify run.")
  _FLAGS["out"] = flags.DEFINE_string(
      "out", None, "Output directory (default: the certify workdir).")
  _FLAGS["step"] = flags.DEFINE_float(
      "round_to", 0.005, "Round the recommended delta up to a multiple of this.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_FLAGS['workdir'].value, _FLAGS['out'].value, _FLAGS['step'].value)


def run(workdir: str, out_dir: str | None = None, step: float = 0.005) -> dict:
  """Calibrates on a finished certify run; returns calibration.json's report.

  The certify workdir and the output folder are locked while it works.
  """
  out_dir = out_dir or workdir
  common.check_workdir_path(workdir, "--certify_workdir")
  common.check_workdir_path(out_dir, "--out")
  config = certify_job.config_from_workdir(workdir)
  if config.mode != "ovc":
    raise ConfigError("calibration needs an ovc-mode certify run (its caches "
                      "hold every prompt's exact counts)")
  setup = certify_job.build_setup(config, workdir)
  # Nothing may change the certify run while it is read, nor the outputs
  # while they are written.
  with contextlib.ExitStack() as held:
    held.enter_context(common.workdir_lock(workdir, "--certify_workdir"))
    held.enter_context(common.workdir_lock(out_dir, "--out"))
    return calibrate(setup, out_dir, step)


def calibrate(setup, out_dir: str, step: float) -> dict:
  pairs = mvn_calibration.compare(setup)
  report = {"note": mvn_ovc.APPROXIMATE_NOTE, "per_sigma": {}}
  everything = []
  for sigma, items in pairs.items():
    cal = mvn_ovc.calibrate_margin(*map(list, zip(*items)))
    report["per_sigma"][f"{sigma:g}"] = cal._asdict()
    everything += items
  overall = mvn_ovc.calibrate_margin(*map(list, zip(*everything)))
  recommended = math.ceil(overall.delta / step - 1e-9) * step if step > 0 else overall.delta
  report["overall"] = overall._asdict()
  report["recommended_delta"] = recommended
  with certify_job.journal(setup) as journal:
    report["inputs"] = len(journal.done)
  report["prompts"] = len(setup.known) + len(setup.novel)
  figure = os.path.join(out_dir, "mvn_vs_exact.png")
  mvn_calibration.draw(pairs, recommended, figure)
  common.write_json(os.path.join(out_dir, "calibration.json"), report)
  w = sys.stdout.write
  w(f"{mvn_ovc.APPROXIMATE_NOTE}\n")
  w(f"{overall.pairs} (input, prompt, sigma) pairs from {report['inputs']} inputs\n")
  for sigma, entry in report["per_sigma"].items():
    w(f"  sigma={sigma}: overshoot rate without margin {entry['overshoot_rate']:.3f}, "
      f"mean overshoot {entry['mean_overshoot']:.4f}, max {entry['max_overshoot']:.4f}, "
      f"smallest safe delta {entry['delta']:.4f}\n")
  w(f"smallest delta with no MVN radius above the exact one: {overall.delta:.4f} "
    f"(recommended, rounded up: {recommended:g})\n")
  w(f"figure: {figure}\n")
  return report


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
