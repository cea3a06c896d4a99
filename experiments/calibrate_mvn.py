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

import json
import math
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_dict

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
  del argv
  workdir = _FLAGS['workdir'].value
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"{workdir} is not a certify workdir (no config.json)")
  with open(config_path) as f:
    config = config_dict.ConfigDict(json.load(f))
  if config.mode != "ovc":
    raise ConfigError("calibration needs an ovc-mode certify run (its caches "
                      "hold every prompt's exact counts)")
  setup = certify_job.build_setup(config, workdir)
  pairs = mvn_calibration.compare(setup)
  out_dir = _FLAGS['out'].value or workdir
  report = {"note": mvn_ovc.APPROXIMATE_NOTE, "per_sigma": {}}
  everything = []
  for sigma, items in pairs.items():
    cal = mvn_ovc.calibrate_margin(*map(list, zip(*items)))
    report["per_sigma"][f"{sigma:g}"] = cal._asdict()
    everything += items
  overall = mvn_ovc.calibrate_margin(*map(list, zip(*everything)))
  step = _FLAGS['step'].value
  recommended = math.ceil(overall.delta / step - 1e-9) * step if step > 0 else overall.delta
  report["overall"] = overall._asdict()
  report["recommended_delta"] = recommended
  report["inputs"] = len(common.ResumableRun(workdir, config.to_dict()).done)
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


if __name__ == "__main__":
  define_flags()
  app.run(main)
