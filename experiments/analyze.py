r"""Certified accuracy against radius, drawn and tabulated, from result TSVs.

  python -m experiments.analyze --workdir=workdirs/certify             # one curve per method and sigma
  python -m experiments.analyze --workdir=DIR --by=sigma --out=curves.png
  python -m experiments.analyze --tsv=a.tsv,b.tsv --labels=sigma0.25,sigma0.5   # any Cohen-format files

Curves of several prompts of the same group (e.g. the novel prompts of one
method and sigma) are averaged. MVN-OVC curves are labelled approximate.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from experiments import common
from experiments.common import curves
from ovc_jax.errors import ConfigError

_FLAGS = {}


def define_flags() -> None:
  """The entry point's flags, defined when this module is the program."""
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "A certify run's workdir.")
  _FLAGS["tsv"] = flags.DEFINE_list("tsv", [], "Cohen-format TSV files (instead of --workdir).")
  _FLAGS["labels"] = flags.DEFINE_list("labels", [], "Legend labels for --tsv files.")
  _FLAGS["by"] = flags.DEFINE_enum(
      "by", "method", ["method", "sigma"],
      "One curve per method (and sigma), or per sigma (and method).")
  _FLAGS["out"] = flags.DEFINE_string(
      "out", None, "PNG path (default: WORKDIR/certified_accuracy.png).")
  _FLAGS["max_radius"] = flags.DEFINE_float(
      "max_radius", None, "Right end of the radius axis.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir, tsvs = _FLAGS["workdir"].value, _FLAGS["tsv"].value
  if bool(workdir) == bool(tsvs):
    raise ConfigError("give either --workdir or --tsv")
  if tsvs:
    labels = _FLAGS["labels"].value or [os.path.basename(p) for p in tsvs]
    if len(labels) != len(tsvs):
      raise ConfigError("--labels needs one label per --tsv file")
    groups = {label: [p] for label, p in zip(labels, tsvs)}
  else:
    groups = curves.workdir_groups(workdir, _FLAGS["by"].value)
  out = _FLAGS["out"].value or os.path.join(workdir or ".", "certified_accuracy.png")
  curves.draw(groups, out, x_label=curves.axis_label(workdir),
       max_radius=_FLAGS["max_radius"].value)


if __name__ == "__main__":
  define_flags()
  app.run(main)
