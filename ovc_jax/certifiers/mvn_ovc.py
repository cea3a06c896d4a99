"""MVN-OVC (paper Alg. 4): a fast approximation, NOT a certificate.

Fit a Gaussian N(mu, Sigma) to an input's noisy embeddings once per sigma and
keep only mu [d] and a factor F of Sigma = F F^T. Logits are linear in the
embedding, so for a new prompt with class matrix U they are approximately

    l ~ N(U mu, U Sigma U^T) = U mu + (U F) g,   g ~ N(0, I).

Draw n0 + n such logit vectors through the keyed sampler (g is its "noise"),
count the argmax and finish CERTIFY with pA_lower lowered by a margin delta:
R = sigma * PhiInv(pA_lower - delta). The embeddings are not Gaussian in
general (they are L2-normalised outputs of a deep network), so the result can
exceed the exact radius: it is an estimate, and every output says so. With a
linear encoder the embeddings are exactly Gaussian and MVN-OVC agrees with
Cached-OVC within sampling error (tests/test_mvn_ovc.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import ABSTAIN, Certificate, SmoothingParams
from ovc_jax.classifiers import argmax_or_no_class, check_class_embeddings
from ovc_jax.errors import ConfigError, InputError

APPROXIMATE_NOTE = "MVN-OVC: approximate, not a certificate"
DEFAULT_DELTA = 0.025


@dataclasses.dataclass(frozen=True)
class MVNParams:
  """MVN-OVC's own numbers, checked on construction.

  Attributes:
    delta: margin subtracted from pA_lower before the radius.
    batch_size: latent samples evaluated at once.
  """

  delta: float = DEFAULT_DELTA
  batch_size: int = 10_000

  def __post_init__(self):
    check_margin(self.delta)
    if (not isinstance(self.batch_size, (int, np.integer))
        or self.batch_size < 1):
      raise ConfigError(f"the MVN batch size must be an integer >= 1; got "
                        f"{self.batch_size}")


class GaussianFit(NamedTuple):
  """N(mean, factor @ factor.T): an input's embedding distribution at one sigma."""

  mean: jax.Array    # [d]
  factor: jax.Array  # [d, r]


@jax.jit
def _fit(embeddings):
  mean = jnp.mean(embeddings, axis=0)
  centred = embeddings - mean
  cov = jnp.einsum("nd,ne->de", centred, centred,
                   precision=jax.lax.Precision.HIGHEST) / (embeddings.shape[0] - 1)
  # eigh rather than Cholesky: the sample covariance may be singular (n < d,
  # or embeddings confined to a subspace), and the factor must still exist.
  eigvals, eigvecs = jnp.linalg.eigh(cov)
  return GaussianFit(mean, eigvecs * jnp.sqrt(jnp.maximum(eigvals, 0.0)))


def fit_gaussian(embeddings: jax.Array) -> GaussianFit:
  """Mean and covariance factor of `[m, d]` embeddings (m >= 2).

  A non-finite embedding (a noisy sample with no class) makes the fit
  non-finite, and `certify_mvn` then refuses it: dropping such samples would
  let MVN-OVC count as hits draws that standard RS counts as misses.
  """
  embeddings = jnp.asarray(embeddings, jnp.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] < 2:
    raise InputError(
        f"need at least 2 embeddings [m, d] to fit a Gaussian; got {embeddings.shape}")
  return _fit(embeddings)


@dataclasses.dataclass(frozen=True)
class GaussianLogitClassifier:
  """argmax of logits U mu + (U F) g for latent standard-normal inputs g [B, r].

  The sampler's base classifier for MVN-OVC: the sampler adds keyed N(0, 1)
  noise to a zero latent, and this maps it to the prompt's logits.
  Params: {"mean_logits": [C] or [P, C], "factor_logits": [C, r] or [P, C, r]}.
  """

  def __call__(self, params: Any, latents: jax.Array) -> dict[str, jax.Array]:
    spec = "br,cr->bc" if params["factor_logits"].ndim == 2 else "br,pcr->bpc"
    logits = params["mean_logits"] + jnp.einsum(
        spec, latents, params["factor_logits"],
        precision=jax.lax.Precision.HIGHEST)
    return {"predictions": argmax_or_no_class(logits)}


@jax.jit
def _logit_params(fit: GaussianFit, class_embeddings: jax.Array):
  hi = jax.lax.Precision.HIGHEST
  return {"mean_logits": jnp.einsum("...cd,d->...c", class_embeddings,
                                    fit.mean, precision=hi),
          "factor_logits": jnp.einsum("...cd,dr->...cr", class_embeddings,
                                      fit.factor, precision=hi)}


def check_fit(fit: GaussianFit) -> GaussianFit:
  """Raises InputError for a Gaussian fit of bad shape or with bad numbers."""
  mean, factor = jnp.asarray(fit.mean), jnp.asarray(fit.factor)
  if mean.ndim != 1 or factor.ndim != 2 or factor.shape[0] != mean.shape[0]:
    raise InputError(f"a Gaussian fit is a mean [d] and a factor [d, r]; got "
                     f"{mean.shape} and {factor.shape}")
  if not (bool(jnp.all(jnp.isfinite(mean)))
          and bool(jnp.all(jnp.isfinite(factor)))):
    raise InputError(
        "the Gaussian fit contains NaN or infinite values (were some noisy "
        "embeddings not finite?); MVN-OVC cannot use it")
  return GaussianFit(mean, factor)


def check_margin(delta: float) -> None:
  if not 0.0 <= delta < 1.0:
    raise ConfigError(f"the MVN margin delta must lie in [0, 1); got {delta}")


def certify_mvn_many(fit: GaussianFit, class_embeddings: jax.Array,
                     key: jax.Array, smoothing: SmoothingParams,
                     mvn: MVNParams = MVNParams()) -> list[Certificate]:
  """Approximate certificates of P prompts (U [P, C, d]); see module doc.

  Args:
    fit: the input's Gaussian fit at smoothing.sigma.
    class_embeddings: `[C, d]` or `[P, C, d]`.
    key: the input's key (the latent draws use its "gaussian" stream).
    smoothing: sigma (scales the radius), n0, n and alpha as in CERTIFY.
    mvn: the margin delta and the latent batch size.
  """
  fit = check_fit(fit)
  class_embeddings = check_class_embeddings(
      class_embeddings, embedding_size=int(fit.mean.shape[0]),
      embeddings_name="the Gaussian fit's embeddings").astype(jnp.float32)
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  params = _logit_params(fit, class_embeddings)
  latent = jnp.zeros(fit.factor.shape[1:], jnp.float32)
  draws = sampler.sample_certification_draws(
      GaussianLogitClassifier(), params, latent,
      sampler.stream_key(key, "gaussian"), sigma=1.0,
      num_classes=int(class_embeddings.shape[-2]), n0=smoothing.n0,
      n=smoothing.n, batch_size=mvn.batch_size)
  return certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"], n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha, margin=mvn.delta)


def certify_mvn(fit: GaussianFit, class_embeddings: jax.Array, key: jax.Array,
                smoothing: SmoothingParams,
                mvn: MVNParams = MVNParams()) -> Certificate:
  """Approximate certificate of one prompt (U [C, d]); see certify_mvn_many."""
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_mvn takes one prompt's [C, d] class matrix; "
                     "use certify_mvn_many for [P, C, d]")
  return certify_mvn_many(fit, class_embeddings, key, smoothing, mvn)[0]


def with_margin(cert: Certificate, delta: float, sigma: float) -> Certificate:
  """The result MVN-OVC gives with margin delta, from its no-margin result."""
  return certificates.certificate_from_lower_bound(
      cert.prediction, cert.pA_lower - delta, cert.counts, sigma)


def required_margin(mvn: Certificate,
                    exact: Certificate) -> float:
  """The smallest delta with which this MVN radius would not exceed the exact one.

  Args:
    mvn: MVN-OVC's result without margin (delta = 0).
    exact: the exact certificate (standard RS or Cached-OVC) of the same input,
      prompt and sigma.

  With margin delta the MVN radius is sigma * PhiInv(p - delta) for its class;
  it stays at or below the exact radius when p - delta <= the exact pA_lower
  (same class certified), and it must abstain (p - delta <= 0.5) otherwise.
  """
  if mvn.prediction == ABSTAIN:
    return 0.0
  if exact.prediction == mvn.prediction:
    target = exact.pA_lower
  else:
    target = 0.5
  return max(0.0, mvn.pA_lower - target)


class MarginCalibration(NamedTuple):
  """What `calibrate_margin` found over a set of (input, prompt) pairs.

  Attributes:
    delta: the smallest margin for which no MVN radius exceeds the exact one.
    overshoot_rate: fraction of pairs whose MVN radius (no margin) exceeds the
      exact radius.
    mean_overshoot: mean radius excess over the overshooting pairs (0 if none).
    max_overshoot: the largest radius excess.
    pairs: how many pairs were compared.
  """

  delta: float
  overshoot_rate: float
  mean_overshoot: float
  max_overshoot: float
  pairs: int


def calibrate_margin(mvn: list[Certificate],
                     exact: list[Certificate]) -> MarginCalibration:
  """Smallest delta that keeps every MVN radius at or below the exact radius."""
  if len(mvn) != len(exact) or not mvn:
    raise InputError("calibration needs equally many, and some, MVN and exact "
                     f"results; got {len(mvn)} and {len(exact)}")
  margins = np.array([required_margin(m, e) for m, e in zip(mvn, exact)])
  excess = np.array([m.radius - (e.radius if e.prediction == m.prediction else 0.0)
                     for m, e in zip(mvn, exact)])
  over = excess > 0
  return MarginCalibration(
      delta=float(margins.max()),
      overshoot_rate=float(over.mean()),
      mean_overshoot=float(excess[over].mean()) if over.any() else 0.0,
      max_overshoot=float(max(excess.max(), 0.0)),
      pairs=len(mvn))
