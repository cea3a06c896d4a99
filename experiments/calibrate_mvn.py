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
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from ml_collections import config_dict
import numpy as np

from experiments import certify
from experiments import common
from ovc_jax import sampler
from ovc_jax.certifiers import cached_ovc, mvn_ovc, standard
from ovc_jax.errors import ConfigError

_FLAGS = {}


def define_flags() -> None:
  """Defined only when this module is the program (experiments.paper imports it)."""
  _FLAGS["workdir"] = flags.DEFINE_string(
      "certify_workdir", os.path.join("workdirs", "certify"),
      "A finished ovc-mode certify run.")
  _FLAGS["out"] = flags.DEFINE_string(
      "out", None, "Output directory (default: the certify workdir).")
  _FLAGS["step"] = flags.DEFINE_float(
      "round_to", 0.005, "Round the recommended delta up to a multiple of this.")


def margin_radius(cert: standard.Certificate, delta: float,
                  sigma: float) -> float:
  """The MVN radius with margin delta, from its no-margin result."""
  if cert.prediction == standard.ABSTAIN or cert.pA_lower - delta <= 0.5:
    return 0.0
  return standard.radius_from_lower_bound(cert.pA_lower - delta, sigma)


def compare(setup) -> dict[float, list[tuple[standard.Certificate, standard.Certificate]]]:
  """{sigma: [(mvn without margin, exact)]} over the run's inputs and prompts."""
  config = setup.config
  stack = jnp.stack([p.class_embeddings for p in setup.known + setup.novel])
  run = common.ResumableRun(setup.workdir, config.to_dict())
  if not run.done:
    raise ConfigError(f"{setup.workdir} has no finished inputs")
  pairs = {float(s): [] for s in config.sigmas}
  for idx in run.done:
    image, _ = setup.dataset[idx]
    key = sampler.input_key(config.seed, idx)
    for sigma in config.sigmas:
      prov = certify.provenance(setup, sigma, key, image)
      emb = certify._load_embeddings(setup, sigma, idx, prov)  # pylint: disable=protected-access
      fit = certify._load_gaussian(setup, sigma, idx, prov)  # pylint: disable=protected-access
      exact = cached_ovc.certify_cached_many(emb, stack, sigma=float(sigma),
                                             alpha=config.alpha)
      mvn = mvn_ovc.certify_mvn_many(fit, stack, key, sigma=float(sigma),
                                     n0=config.n0, n=config.n,
                                     alpha=config.alpha, delta=0.0)
      pairs[float(sigma)] += list(zip(mvn, exact))
  return pairs


def draw(pairs, delta: float, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=120, sharey=True)
  top = 0.0
  for sigma, items in pairs.items():
    exact = np.array([e.radius for _, e in items])
    raw = np.array([m.radius for m, _ in items])
    margin = np.array([margin_radius(m, delta, sigma) for m, _ in items])
    top = max(top, exact.max(), raw.max())
    axes[0].scatter(exact, raw, s=8, alpha=0.6, label=f"σ={sigma:g}")
    axes[1].scatter(exact, margin, s=8, alpha=0.6, label=f"σ={sigma:g}")
  for ax, title in zip(axes, ("MVN-OVC without margin",
                              f"MVN-OVC with margin δ={delta:g}")):
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", linewidth=0.8,
            label="MVN = exact")
    ax.set_xlabel("exact certified radius (standard RS = Cached-OVC)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("MVN-OVC radius (approximate)")
  fig.tight_layout()
  common.save_figure(fig, path)


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
  setup = certify.build_setup(config, workdir)
  pairs = compare(setup)
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
  draw(pairs, recommended, figure)
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
