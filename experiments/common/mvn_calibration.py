"""MVN-OVC against the exact certificates of a finished ovc-mode certify run."""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.common import certify_job
from experiments.common import save_figure
from ovc_jax import ovc
from ovc_jax import sampler
from ovc_jax.certificates import Certificate
from ovc_jax.certifiers import cached_ovc, mvn_ovc
from ovc_jax.errors import ConfigError


def compare(setup) -> dict[float, list[tuple[Certificate, Certificate]]]:
  """{sigma: [(mvn without margin, exact)]} over the run's inputs and prompts."""
  config = setup.config
  stack = jnp.stack([p.class_embeddings for p in setup.known + setup.novel])
  with certify_job.journal(setup) as run:
    done = list(run.done)
  if not done:
    raise ConfigError(f"{setup.workdir} has no finished inputs")
  pairs = {float(s): [] for s in config.sigmas}
  for idx in done:
    key = sampler.input_key(config.seed, idx)
    for sigma in config.sigmas:
      # Checked as single-mode certify checks caches of an earlier run:
      # provenance, checksums, and a few embeddings regenerated.
      source = certify_job.stored_caches(setup, sigma, idx, verify=True)
      params = certify_job.ovc_params(config, sigma)
      draws = source.load_embeddings()
      # A compressed cache's ambiguous samples are recomputed: the exact
      # certificates whatever --config.cached_ambiguous says.
      regenerate = None
      if ovc.is_compressed(draws):
        base = setup.base("")
        image, _ = setup.dataset[idx]
        regenerate = ovc.regenerator(
            ovc.NovelInput(base.classifier, base.encoder_params,
                           certify_job.model_input(setup, image), key),
            stack, params.smoothing)
      exact = cached_ovc.certify_cached_many(
          draws, stack, params.smoothing, regenerate=regenerate)
      mvn = mvn_ovc.certify_mvn_many(
          key, source.load_gaussian(), stack, params.smoothing,
          mvn_ovc.MVNParams(delta=0.0, batch_size=config.mvn.batch_size))
      pairs[float(sigma)] += list(zip(mvn, exact))
  return pairs


def draw(pairs, delta: float, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=120, sharey=True)
  top = 0.0
  for sigma, items in pairs.items():
    exact = np.array([e.radius for _, e in items])
    raw = np.array([m.radius for m, _ in items])
    margin = np.array([mvn_ovc.with_margin(m, delta, sigma).radius
                       for m, _ in items])
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
  save_figure(fig, path)
