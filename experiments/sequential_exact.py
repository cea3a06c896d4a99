r"""The sequential rules' mean draws and radius loss against pA, computed exactly.

  python -m experiments.sequential_exact --out=workdirs/sequential_exact

For each pA of a grid and each rule (the previous rule, and the precision stop
on the finer schedule at several precisions), the exact stopping distribution
(`ovc_jax.sequential_exact`): mean estimation draws, expected radius lost
against fixed-n CERTIFY at n = n_max with the full alpha, and P[wrong
certificate]. Prints a markdown table, writes table.md and rules.png.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from experiments import common
from ovc_jax import sequential_exact
from ovc_jax.certifiers.sequential import SequentialParams
from ovc_jax.errors import ConfigError

_OUT = flags.DEFINE_string("out", os.path.join("workdirs", "sequential_exact"),
                           "Output folder (table.md, rules.png).")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Noise level.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Total alpha.")
_N_MAX = flags.DEFINE_integer("n_max", 100_000, "The most estimation draws.")
_MAX_RADIUS = flags.DEFINE_float("max_radius_sigmas", 2.0,
                                 "Stop once the radius reaches this x sigma.")
_P_A = flags.DEFINE_list("p_a", "0.55,0.6,0.7,0.8,0.9,0.95,0.97,0.977,0.99,0.999",
                         "The pA grid.")
_PRECISIONS = flags.DEFINE_list("precision_sigmas", "0.04,0.08,0.12,0.16",
                                "Precisions (x sigma) of the new rule.")
_SCHEDULE = flags.DEFINE_string("schedule", "500x1.5",
                                "The new rule's first block x growth.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sigma, n_max = _SIGMA.value, _N_MAX.value
  max_radius = _MAX_RADIUS.value * sigma
  p_grid = _numbers(_P_A.value, "--p_a", 0.0, 1.0)
  try:
    first, growth = _SCHEDULE.value.split("x")
    first, growth = int(first), float(growth)
  except ValueError:
    raise ConfigError(f"--schedule must read FIRSTxGROWTH, e.g. 500x1.5; got "
                      f"{_SCHEDULE.value!r}") from None
  rules = {"old (1000x2)": SequentialParams(max_radius=max_radius, n_max=n_max)}
  for e in _numbers(_PRECISIONS.value, "--precision_sigmas", 0.0, 10.0):
    rules[f"{_SCHEDULE.value}, {e:g}σ"] = SequentialParams(
        max_radius=max_radius, n_max=n_max, first_block=first, growth=growth,
        precision=e * sigma)
  rows = sequential_exact.compare_rules(p_grid, rules, sigma=sigma,
                                        alpha=_ALPHA.value, fixed_n=n_max)
  title = (f"σ = {sigma:g}, α = {_ALPHA.value:g}, n_max = {n_max:,}, "
           f"max_radius = {max_radius:g}")
  table = _markdown(rows, p_grid, list(rules))
  print(f"{title}\n\n{table}")
  os.makedirs(_OUT.value, exist_ok=True)
  common.atomic_write_text(os.path.join(_OUT.value, "table.md"),
                           f"{title}\n\n{table}")
  _draw(rows, list(rules), title, os.path.join(_OUT.value, "rules.png"))


def _numbers(values, flag: str, low: float, high: float) -> list[float]:
  try:
    out = [float(v) for v in values]
  except ValueError:
    raise ConfigError(f"{flag} must be numbers separated by commas; got "
                      f"{','.join(values)!r}") from None
  if not out or not all(low < v < high for v in out):
    raise ConfigError(f"{flag} must hold numbers in ({low:g}, {high:g}); got "
                      f"{out}")
  return out


def _markdown(rows, p_grid, names) -> str:
  """pA down, rules across: mean draws / expected radius lost."""
  cell = {(r.rule, r.p_a): r for r in rows}
  lines = ["| pA | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for p in p_grid:
    lines.append(f"| {p:g} | " + " | ".join(
        f"{cell[n, p].mean_draws:,.0f} / {cell[n, p].radius_loss:.4f}"
        for n in names) + " |")
  worst = max(r.wrong_probability for r in rows)
  return ("\n".join(lines) + "\n\ncells: mean estimation draws / expected "
          "radius lost against fixed n (clipped at max_radius); largest "
          f"P[wrong certificate] over all cells: {worst:.2e}\n")


def _draw(rows, names, title, path) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
  for name in names:
    mine = [r for r in rows if r.rule == name]
    left.plot([r.p_a for r in mine], [r.mean_draws for r in mine], "o-",
              label=name)
    right.plot([r.p_a for r in mine], [r.radius_loss for r in mine], "o-",
               label=name)
  left.set(xlabel="pA", ylabel="mean estimation draws", yscale="log")
  right.set(xlabel="pA", ylabel="expected radius lost against fixed n")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"Sequential rules, exact: {title}", fontsize=9)
  fig.tight_layout()
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.run_app(main)
