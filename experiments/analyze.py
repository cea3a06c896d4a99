r"""Certified accuracy against radius, drawn and tabulated, from result TSVs.

  python -m experiments.analyze --workdir=workdirs/certify             # one curve per method and sigma
  python -m experiments.analyze --workdir=DIR --by=sigma --out=curves.png
  python -m experiments.analyze --tsv=a.tsv,b.tsv --labels=sigma0.25,sigma0.5   # any Cohen-format files

Curves of several prompts of the same group (e.g. the novel prompts of one
method and sigma) are averaged. MVN-OVC curves are labelled approximate; a
curve identical to another (Cached-OVC and standard RS) is drawn with markers
and says so. The figure goes to WORKDIR/analysis.png (./analysis.png with
--tsv) unless --out says otherwise: certify's own certified_accuracy.png is
left alone.
"""

from __future__ import annotations

import contextlib
import os

from absl import app
from absl import flags
from experiments import common
from experiments.common import curves
from ovc_jax.errors import ConfigError

_FLAGS = {}
DEFAULT_NAME = "analysis.png"


def define_flags() -> None:
  """The entry point's flags, defined when this module is the program."""
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "A certify run's workdir.")
  _FLAGS["tsv"] = flags.DEFINE_list("tsv", [], "Cohen-format TSV files (instead of --workdir).")
  _FLAGS["labels"] = flags.DEFINE_list("labels", [], "Legend labels for --tsv files.")
  _FLAGS["by"] = flags.DEFINE_enum(
      "by", "method", ["method", "sigma"],
      "One curve per method (and sigma), or per sigma (and method).")
  _FLAGS["out"] = flags.DEFINE_string(
      "out", None, f"PNG path (default: WORKDIR/{DEFAULT_NAME}, or "
      f"./{DEFAULT_NAME} with --tsv).")
  _FLAGS["max_radius"] = flags.DEFINE_float(
      "max_radius", None, "Right end of the radius axis.")


def run(workdir: str | None, tsvs: list[str], labels: list[str], *,
        by: str = "method", out: str | None = None,
        max_radius: float | None = None) -> str:
  """Draws and tabulates; returns the figure's path.

  A figure written into a workdir is written under its lock: not while a
  certify run writes there.
  """
  if bool(workdir) == bool(tsvs):
    raise ConfigError("give either --workdir or --tsv")
  if workdir and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is not a folder" if
                      os.path.exists(workdir) else
                      f"--workdir {workdir} does not exist")
  if max_radius is not None and not (max_radius > 0 and max_radius < float("inf")):
    raise ConfigError(f"--max_radius must be a finite number > 0; got {max_radius}")
  if tsvs:
    labels = labels or [os.path.basename(p) for p in tsvs]
    if len(labels) != len(tsvs):
      raise ConfigError("--labels needs one label per --tsv file")
    groups = {label: [p] for label, p in zip(labels, tsvs)}
  else:
    groups = curves.workdir_groups(workdir, by)
  out = out or os.path.join(workdir or ".", DEFAULT_NAME)
  if os.path.isdir(out):
    raise ConfigError(f"--out {out} is a folder; give a PNG file path")
  common.check_workdir_path(os.path.dirname(os.path.abspath(out)), "--out")
  lock = (common.workdir_lock(workdir) if workdir else contextlib.nullcontext())
  with lock:
    curves.draw(groups, out, x_label=curves.axis_label(workdir),
                max_radius=max_radius, title=curves.workdir_title(workdir))
  return out


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_FLAGS["workdir"].value, _FLAGS["tsv"].value, _FLAGS["labels"].value,
      by=_FLAGS["by"].value, out=_FLAGS["out"].value,
      max_radius=_FLAGS["max_radius"].value)


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
