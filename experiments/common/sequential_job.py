"""The certify job's sequential mode: stop once the answer is known.

For each input and sigma, the known prompts are certified by sequential,
anytime-valid CERTIFY on one encoder pass that goes on until every known
prompt has stopped (`ovc.certify_known_prompts_sequential`); each novel
prompt is then certified from the draws that pass made, by Cached-OVC
(extending the same keyed stream where its own rule needs more draws) and by
MVN-OVC (approximate). With `sequential.compare_fixed`, the same inputs and
keys are also certified by fixed-n CERTIFY at n = --config.n (known prompts)
and Cached-OVC on that pass (novel prompts, identical to standard RS), so that
the curves and the encoder passes can be compared in one run.

Every TSV of this mode has Cohen's columns, the job's usual extra columns and
`draws` (estimation draws used), `stop` (why it stopped: abstain, radius,
n_max; "fixed" for fixed-n rows) and `encoder_passes` (noisy images the
encoder embedded for the row: the shared pass of the known prompts on each
known row, the tail a novel prompt added, n0 + n for fixed-n rows).
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from experiments import common
from ovc_jax import ovc
from ovc_jax import results
from ovc_jax.certifiers.sequential import STOP_REASONS, SequentialParams
from ovc_jax.errors import ConfigError

COLUMNS = ("draws", "stop", "encoder_passes")
# (method, role) of each sequential-mode table, and how tables name them.
SEQUENTIAL_METHODS = {"sequential": "sequential CERTIFY",
                      "sequential_cached": "sequential Cached-OVC",
                      "sequential_mvn": "sequential MVN-OVC (approximate)"}
FIXED_METHODS = ("standard", "cached")


def _precision(value, flag: str) -> float:
  try:
    e = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"--config.sequential.{flag} must be a number >= 0 "
                      f"(0: off); got {value!r}") from None
  if not e >= 0 or not math.isfinite(e):
    raise ConfigError(f"--config.sequential.{flag} must be a finite number "
                      f">= 0 (precision = it x sigma; 0: off); got {e}")
  return e


def seq_params(config, sigma: float) -> SequentialParams:
  """The stopping rule of one sigma; a ConfigError names the flag."""
  s = config.sequential
  precision = _precision(s.precision_sigmas, "precision_sigmas")
  try:
    r = float(s.max_radius_sigmas)
  except (TypeError, ValueError):
    raise ConfigError("--config.sequential.max_radius_sigmas must be a number "
                      f"> 0; got {s.max_radius_sigmas!r}") from None
  if not r > 0 or not math.isfinite(r):
    raise ConfigError("--config.sequential.max_radius_sigmas must be a finite "
                      f"number > 0 (max_radius = it x sigma); got {r}")
  schedule = tuple(s.schedule) if s.schedule else None
  try:
    return SequentialParams(max_radius=r * sigma, n_max=s.n_max,
                            first_block=s.first_block, growth=s.growth,
                            schedule=schedule, alpha_split=s.alpha_split,
                            precision=precision * sigma or None)
  except ConfigError as e:
    text = str(e)
    flags = [name for name, words in (
        ("n_max", ("n_max",)), ("first_block", ("first block",)),
        ("growth", ("growth",)), ("schedule", ("schedule", "block size")),
        ("alpha_split", ("alpha split",))) if any(w in text for w in words)]
    raise ConfigError(f"{text}; set " + " or ".join(
        f"--config.sequential.{f}" for f in flags or ["*"])) from e


OLD_RULE = "old"  # the previous rule: 1000, 2000, 4000, ... (at most n_max); no precision


def replays(config) -> list[str]:
  """Tags of the rules replayed on the fixed-n draws: "p0.08" (precision
  0.08 sigma; "p0": off) on the configured schedule, then OLD_RULE."""
  s = config.sequential
  try:
    values = list(s.replay_precision_sigmas)
  except TypeError:
    raise ConfigError("--config.sequential.replay_precision_sigmas must be a "
                      "list of numbers >= 0; got "
                      f"{s.replay_precision_sigmas!r}") from None
  tags = [f"p{_precision(v, 'replay_precision_sigmas'):g}" for v in values]
  if not tags:
    return []
  if not s.compare_fixed:
    raise ConfigError("--config.sequential.replay_precision_sigmas replays "
                      "rules on the fixed-n draws: it needs "
                      "--config.sequential.compare_fixed=True")
  if config.n < s.n_max:
    raise ConfigError(f"--config.sequential.replay_precision_sigmas needs "
                      f"--config.n >= --config.sequential.n_max ({s.n_max}); "
                      f"got n = {config.n}")
  return tags + [OLD_RULE]


def replay_params(config, sigma: float, tag: str) -> SequentialParams:
  base = seq_params(config, sigma)
  if tag == OLD_RULE:
    return base.replace(first_block=min(1000, base.n_max), growth=2.0,
                        schedule=None,
                        precision=None)
  return base.replace(precision=float(tag[1:]) * sigma or None)


def method_label(method: str) -> str:
  """How the tables name a method of this mode."""
  if method in SEQUENTIAL_METHODS:
    return SEQUENTIAL_METHODS[method]
  role, tag = method.split("@")
  return f"{SEQUENTIAL_METHODS[role]} @{tag}"


def groups(setup):
  """(role, method, prompt) of every table of one (sigma, base)."""
  yield from (("known", "sequential", p) for p in setup.known)
  yield from (("novel", m, p) for p in setup.novel
              for m in ("sequential_cached", "sequential_mvn"))
  if setup.config.sequential.compare_fixed:
    yield from (("known", "standard", p) for p in setup.known)
    yield from (("novel", "cached", p) for p in setup.novel)
  for tag in replays(setup.config):
    yield from (("known", f"sequential@{tag}", p) for p in setup.known)
    yield from (("novel", f"sequential_cached@{tag}", p) for p in setup.novel)


def certify_input(setup, job, idx: int, x, key, sigma: float, base: str):
  """Every row of one input at one sigma for one base classifier."""
  c = setup.config
  params = job.ovc_params(c, sigma)
  sp = seq_params(c, sigma)
  b = setup.base(base)
  stack = jnp.stack([p.class_embeddings for p in setup.known])
  known, secs = common.timed(lambda: ovc.certify_known_prompts_sequential(
      b.classifier, b.encoder_params, x, key, stack, params, sp))
  rows = [job.Row("sequential", p, sigma, r.certificate, secs, None, base,
                  (r.draws, r.reason, known.encoder_passes))
          for p, r in zip(setup.known, known.results)]
  cache = known.embedding_draws
  for p in setup.novel:
    for method in ("cached", "mvn"):
      novel, secs = common.timed(lambda: ovc.certify_novel_prompt_sequential(
          method, b.classifier, b.encoder_params, x, key, cache,
          p.class_embeddings, params, sp))
      if method == "cached":
        cache = novel.embedding_draws  # later prompts reuse the grown cache
      rows.append(job.Row(f"sequential_{method}", p, sigma,
                          novel.result.certificate, secs, None, base,
                          (novel.result.draws, novel.result.reason,
                           novel.encoder_passes)))
  if c.sequential.compare_fixed:
    fixed, secs = common.timed(lambda: ovc.certify_known_prompts(
        b.classifier, b.encoder_params, x, key, stack, params))
    passes = c.n0 + c.n
    rows += [job.Row("standard", p, sigma, cert, secs, None, base,
                     (c.n, "fixed", passes))
             for p, cert in zip(setup.known, fixed.certificates)]
    for p in setup.novel:
      result, secs = common.timed(lambda: ovc.certify_novel_prompt(
          "cached", b.classifier, b.encoder_params, x, key, fixed.caches,
          p.class_embeddings, params))
      rows.append(job.Row("cached", p, sigma, result.certificate, secs, result,
                          base, (c.n, "fixed", 0)))
    novel_stack = [p.class_embeddings for p in setup.novel]
    for tag in replays(c):
      replay, secs = common.timed(lambda: ovc.replay_sequential(
          fixed.caches.embedding_draws, stack, novel_stack, params,
          replay_params(c, sigma, tag)))
      # encoder_passes: the whole input's on every row (a live run's count).
      for role, prompts, found in (("sequential", setup.known, replay.known),
                                   ("sequential_cached", setup.novel,
                                    replay.novel)):
        rows += [job.Row(f"{role}@{tag}", p, sigma, r.certificate, secs, None,
                         base, (r.draws, r.reason, replay.encoder_passes))
                 for p, r in zip(prompts, found)]
  return rows


def _radius_lost(seq_paths, fixed_paths, max_radius: float) -> float:
  """The largest radius (clipped at max_radius) a pair certified by fixed n
  lost to the sequential rule; a class fixed n certified and the rule did not
  counts its whole radius."""
  lost = 0.0
  for a, b in zip(seq_paths, fixed_paths):
    seq, fixed = results.read_tsv(a), results.read_tsv(b)
    r_seq = np.where(seq["predict"] == fixed["predict"],
                     np.minimum(seq["radius"], max_radius), 0.0)
    r_fixed = np.where(fixed["predict"] >= 0,
                       np.minimum(fixed["radius"], max_radius), 0.0)
    lost = max(lost, float(np.max(r_fixed - r_seq, initial=0.0)))
  return lost


def _compare(entry, setup, path, radii, max_radius, seq_known, seq_novel):
  """Adds the curves' largest gaps and the radius lost against fixed n."""
  for role, seq_m, fix_m, prompts in (
      ("known", seq_known, "standard", setup.known),
      ("novel", seq_novel, "cached", setup.novel)):
    if not prompts:
      continue
    a = _accuracy([path(seq_m, p) for p in prompts], radii)
    f = _accuracy([path(fix_m, p) for p in prompts], radii)
    entry[f"{role}_largest_gap_pp"] = float(np.max(np.abs(a - f)) * 100)
    entry[f"{role}_radius_lost_max"] = _radius_lost(
        [path(seq_m, p) for p in prompts], [path(fix_m, p) for p in prompts],
        max_radius)
    entry[f"{role}_curves"] = {"radii": radii.tolist(),
                               "sequential": a.tolist(), "fixed": f.tolist()}


def _accuracy(paths, radii) -> np.ndarray:
  """Certified accuracy at `radii`, averaged over the tables."""
  return np.mean([[results.summarize_tsv(p, radii)["certified_accuracy"]
                   [f"{r:g}"] for r in radii] for p in paths], axis=0)


def summarize(setup, job) -> dict:
  """Encoder passes, draws and the curves' largest gap, per (base, sigma)."""
  c = setup.config
  out = {}
  for sigma in c.sigmas:
    sp = seq_params(c, sigma)
    radii = np.round(np.linspace(0.0, sp.max_radius, 11), 6)
    for base in (b.name for b in setup.base_classifiers):
      path = lambda m, p: job.tsv_path(setup, m, p, sigma, base)
      known = [results.read_tsv(path("sequential", p)) for p in setup.known]
      shared = known[0]["encoder_passes"]           # one value per input
      tails = sum(results.read_tsv(path("sequential_cached", p))
                  ["encoder_passes"] for p in setup.novel)
      per_input = shared + (tails if setup.novel else 0)
      entry = {
          "max_radius": sp.max_radius,
          "checkpoints": list(sp.checkpoints()),
          "inputs": len(shared),
          "encoder_passes_per_input": per_input.tolist(),
          "encoder_passes_total": int(per_input.sum()),
          "mean_draws_per_known_prompt": float(np.mean(
              [k["draws"] for k in known])),
          "mean_draws_per_novel_prompt_cached": float(np.mean(
              [results.read_tsv(path("sequential_cached", p))["draws"]
               for p in setup.novel])) if setup.novel else None,
          "precision": sp.precision,
          "stops": {reason: int(sum(np.sum(k["stop"] == reason) for k in known))
                    for reason in STOP_REASONS},
      }
      if c.sequential.compare_fixed:
        fixed_total = len(shared) * (c.n0 + c.n)
        entry["fixed_n"] = c.n
        entry["fixed_encoder_passes_total"] = fixed_total
        entry["passes_ratio"] = fixed_total / max(entry["encoder_passes_total"], 1)
        _compare(entry, setup, path, radii, sp.max_radius, "sequential",
                 "sequential_cached")
        entry["replays"] = {}
        for tag in replays(c):
          known_r = [results.read_tsv(path(f"sequential@{tag}", p))
                     for p in setup.known]
          passes = int(known_r[0]["encoder_passes"].sum())
          rp = replay_params(c, sigma, tag)
          e = {"precision": rp.precision, "checkpoints": list(rp.checkpoints()),
               "encoder_passes_total": passes,
               "passes_ratio": fixed_total / max(passes, 1),
               "mean_draws_per_known_prompt": float(np.mean(
                   [k["draws"] for k in known_r])),
               "stops": {reason: int(sum(np.sum(k["stop"] == reason)
                                         for k in known_r))
                         for reason in STOP_REASONS}}
          _compare(e, setup, path, radii, sp.max_radius, f"sequential@{tag}",
                   f"sequential_cached@{tag}")
          for role in ("known", "novel"):
            e.pop(f"{role}_curves", None)
          entry["replays"][tag] = e
      out[os.path.join(base, f"sigma_{sigma:g}")] = entry
  return out


def _draw_tradeoff(ax, entry: dict, sigma: float) -> None:
  """Encoder passes saved against the curves' largest gap, one point per rule
  (the run's own and each replay), known and novel prompts."""
  import matplotlib.ticker as ticker  # pylint: disable=g-import-not-at-top
  own = (f"run, p{entry['precision'] / sigma:g}" if entry.get("precision")
         else "run")
  points = [(own, entry)] + list(entry.get("replays", {}).items())
  for role, marker, color in (("known", "o", "tab:blue"),
                              ("novel", "s", "tab:orange")):
    xs = [e["passes_ratio"] for _, e in points]
    ys = [e.get(f"{role}_largest_gap_pp", np.nan) for _, e in points]
    ax.plot(xs, ys, marker, color=color, label=f"{role} prompts")
    for (tag, _), x, y in zip(points, xs, ys):
      ax.annotate(tag, (x, y), fontsize=6, xytext=(3, 3),
                  textcoords="offset points")
  ax.axhline(1.0, color="tab:gray", linewidth=0.8, linestyle=":")
  ax.set_xscale("log")
  ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("encoder passes: fixed n / rule (x fewer)")
  ax.set_ylabel("largest certified-accuracy gap (pp)")
  ax.set_title("trade-off: precision (x sigma) replayed on the fixed-n draws",
               fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def draw(setup, job, summary: dict, out: str | None = None) -> str:
  """Draws-per-input histogram and the curves beside fixed-n (PNG)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  c = setup.config
  entries = list(summary.items())
  rows = 3 if any(e.get("replays") for _, e in entries) else 2
  fig, axes = plt.subplots(rows, len(entries),
                           figsize=(5.4 * len(entries), 3.8 * rows), dpi=120,
                           squeeze=False)
  for col, (name, e) in enumerate(entries):
    ax = axes[0][col]
    base, sigma_dir = os.path.split(name)
    sigma = float(sigma_dir.replace("sigma_", ""))
    draws = np.concatenate([results.read_tsv(job.tsv_path(
        setup, "sequential", p, sigma, base))["draws"] for p in setup.known])
    # Draws take checkpoint values only: one bar per checkpoint.
    checkpoints = e["checkpoints"]
    shared = np.asarray(e["encoder_passes_per_input"]) - c.n0
    where = np.arange(len(checkpoints))
    per_prompt = [int(np.sum(draws == n)) / max(len(draws), 1)
                  for n in checkpoints]
    per_input = [int(np.sum((shared > lo) & (shared <= n))) / max(len(shared), 1)
                 for lo, n in zip([-1] + checkpoints[:-1], checkpoints)]
    ax.bar(where - 0.2, per_prompt, 0.4, color="tab:blue",
           label="(input, known prompt): its own stop")
    ax.bar(where + 0.2, per_input, 0.4, color="tab:red",
           label="input: encoder passes - n0 (all prompts, tails)")
    ax.set_xticks(where, [f"{n:,}" for n in checkpoints], rotation=45,
                  fontsize=7)
    ax.set_xlabel("estimation draws at the stopping checkpoint")
    ax.set_ylabel("fraction")
    ratio = e.get("passes_ratio")
    ax.set_title(f"σ = {sigma:g}: mean draws {e['mean_draws_per_known_prompt']:,.0f}"
                 + (f", passes {ratio:.1f}x fewer than n = {c.n:,}"
                    if ratio else ""), fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[1][col]
    for role, style in (("known", "-"), ("novel", "--")):
      curves = e.get(f"{role}_curves")
      if not curves:
        continue
      ax.plot(curves["radii"], curves["fixed"], style, color="tab:gray",
              linewidth=4, alpha=0.5,
              label=f"fixed n = {c.n:,} ({role} prompts)")
      ax.plot(curves["radii"], curves["sequential"], style, color="tab:blue",
              label=f"sequential ({role} prompts)")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if rows == 3:
      _draw_tradeoff(axes[2][col], e, sigma)
  fig.suptitle(f"Sequential CERTIFY: {job.model_title(setup)} on {c.dataset}"
               f"\nn_max = {c.sequential.n_max:,}, α = {c.alpha:g}", fontsize=9)
  fig.tight_layout()
  out = out or os.path.join(setup.workdir, "sequential.png")
  common.save_figure(fig, out)
  return out
