"""Modified-IRS (paper Alg. 2): reuse a known prompt's certificate for a novel one.

The known prompts of an input are certified together, with the input's key;
that leaves, per known prompt t, its certificate (cA_t, pA_lower_t), its
predictions on the n0 selection draws and on the first n_p estimation draws.
For a novel prompt t*:

  1. on the n0 selection draws, find the known prompt t^ that disagrees with t*
     least (ties: the known prompt whose class embeddings are most similar to
     t*'s, then the lowest index);
  2. on the first n_p estimation draws, count the disagreements d of t* with
     t^, and bound the disagreement rate: zeta = UpperConfBound(d, n_p, 1 - alpha_zeta);
  3. if zeta <= gamma: p = pA_lower_t^ - zeta, and the certificate is
     (cA_t^, sigma * PhiInv(p)) if p > 0.5, else ABSTAIN; it holds with
     probability >= 1 - alpha - alpha_zeta (IRS theorem: P[f_t* = cA] >=
     P[f_t^ = cA] - P[f_t* != f_t^]);
  4. otherwise, CERTIFY t* in full with the input's key, reusing its n0
     selection draws and its first n_p estimation draws: the certificate is
     then identical to standard RS, at confidence 1 - alpha.

Where this departs from the paper's Algorithm 2, and why: the paper picks t^
as the known prompt with the fewest disagreements on the same n_p draws that
then bound zeta, and those draws are also part of the n draws behind every
pA_lower_t. Taking a minimum over the known prompts biases both zeta and
pA_lower_t^ downward (a multiple-comparisons effect), so the stated confidence
would not hold. Choosing t^ on the selection draws, which neither bound uses,
keeps the 1 - alpha - alpha_zeta guarantee exact for any number of known
prompts, at the cost of n0 forward passes that a fallback needs anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from ovc_jax import bounds
from ovc_jax import certificates
from ovc_jax import errors
from ovc_jax import sampler
from ovc_jax.certifiers import standard
from ovc_jax.certificates import Certificate, SmoothingParams
from ovc_jax.errors import ConfigError

DEFAULT_GAMMA = 0.01


@dataclasses.dataclass(frozen=True)
class IRSParams:
  """Modified-IRS's own numbers.

  Attributes:
    n_p: probe draws, the first n_p of the n estimation draws.
    gamma: reuse the known certificate only if zeta <= gamma.
    alpha_zeta: confidence parameter of zeta (None: the certificate's alpha).
  """

  n_p: int
  gamma: float = DEFAULT_GAMMA
  alpha_zeta: float | None = None

  def zeta_alpha(self, smoothing: SmoothingParams) -> float:
    return smoothing.alpha if self.alpha_zeta is None else self.alpha_zeta

  def check(self, smoothing: SmoothingParams) -> None:
    """Raises ConfigError where these do not fit the smoothing parameters."""
    check_irs_args(n=smoothing.n, n_p=self.n_p, gamma=self.gamma,
                   alpha_zeta=self.zeta_alpha(smoothing))


class KnownPrompts(NamedTuple):
  """What certifying the known prompts of one input leaves for Modified-IRS."""

  selection_predictions: np.ndarray   # int [n0, P]
  estimation_predictions: np.ndarray  # int [n_p, P], the first n_p draws
  predictions: np.ndarray             # int [P], cA or ABSTAIN
  p_lower: np.ndarray                 # float [P]
  class_embeddings: np.ndarray        # [P, C, d], for the similarity tie-break


class IRSResult(NamedTuple):
  """A novel prompt's certificate and how it was obtained.

  Attributes:
    certificate: the certificate (its counts are the n_p-draw histogram of
      the novel prompt when IRS applied, the full counts otherwise).
    irs_applied: whether the known prompt's certificate was reused.
    known_index: the known prompt t^ compared against.
    disagreements: d, on the first n_p estimation draws.
    zeta: the upper confidence bound on the disagreement rate.
    confidence: the probability the certificate holds with.
    forward_passes: image-encoder evaluations this certification took.
  """

  certificate: Certificate
  irs_applied: bool
  known_index: int
  disagreements: int
  zeta: float
  confidence: float
  forward_passes: int


def _check_irs(irs: Any) -> None:
  errors.check_bundle(irs, IRSParams, "irs")


def default_num_probe_draws(n: int) -> int:
  """n_p = 10% of n, as in IRS."""
  return max(1, n // 10)


def check_irs_args(*, n: int, n_p: int, gamma: float, alpha_zeta: float) -> None:
  if not isinstance(n_p, (int, np.integer)) or n_p < 1:
    raise ConfigError(f"irs.n_p must be an integer >= 1; got {n_p}")
  if n_p > n:
    raise ConfigError(f"irs.n_p ({n_p}) cannot exceed n ({n}): the probe draws "
                      "are the first n_p of the n estimation draws")
  if not 0.0 <= gamma < 1.0:
    raise ConfigError(f"irs.gamma must lie in [0, 1); got {gamma}")
  if not 0.0 < alpha_zeta < 1.0:
    raise ConfigError(f"irs.alpha_zeta must lie in (0, 1); got {alpha_zeta}")


def known_prompts_from_draws(draws: sampler.Draws, certs: list[Certificate],
                             class_embeddings: jax.Array,
                             n_p: int) -> KnownPrompts:
  """The KnownPrompts record of P prompts certified together on `draws`
  (which hold "predictions" [m, P])."""
  sel, est = jax.device_get((draws.selection["predictions"],
                             draws.estimation["predictions"][:n_p]))
  return KnownPrompts(
      selection_predictions=np.asarray(sel),
      estimation_predictions=np.asarray(est),
      predictions=np.array([c.prediction for c in certs]),
      p_lower=np.array([c.pA_lower for c in certs]),
      class_embeddings=np.asarray(jax.device_get(class_embeddings)))


def certify_known(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
                  x: jax.Array, smoothing: SmoothingParams, irs: IRSParams, *,
                  num_classes: int | None = None,
                  mesh=None) -> tuple[list[Certificate], KnownPrompts]:
  """Certifies P known prompts (a class matrix [P, C, d]) at once.

  Returns their certificates (each identical to certifying that prompt alone
  with the key) and the KnownPrompts record Modified-IRS needs, which keeps
  the first irs.n_p estimation predictions.
  """
  _check_irs(irs)
  irs.check(smoothing)
  class_embeddings = apply_fn.class_embeddings(params)
  if class_embeddings.ndim != 3:
    raise ConfigError("known prompts must be stacked as [P, C, d]")
  draws = standard.certification_draws(
      key, apply_fn, params, x, smoothing, outputs=("counts", "predictions"),
      num_classes=num_classes, mesh=mesh)
  certs = certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"], n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha)
  return certs, known_prompts_from_draws(draws, certs, class_embeddings,
                                         irs.n_p)


def prompt_similarity(novel: np.ndarray, known: np.ndarray) -> np.ndarray:
  """Cosine similarity of the flattened class matrices: [P] for novel [C, d]."""
  a = np.asarray(novel, np.float64).reshape(-1)
  b = np.asarray(known, np.float64).reshape(known.shape[0], -1)
  return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a) + 1e-30)


def choose_known_prompt(selection_predictions: np.ndarray,
                        known: KnownPrompts,
                        class_embeddings: np.ndarray) -> int:
  """t^: fewest selection-draw disagreements, then most similar, then first."""
  disagree = np.sum(selection_predictions[:, None]
                    != known.selection_predictions, axis=0)
  similarity = prompt_similarity(class_embeddings, known.class_embeddings)
  # lexsort sorts by the last key first.
  order = np.lexsort((np.arange(disagree.size), -similarity, disagree))
  return int(order[0])


def certify_novel(key: jax.Array, apply_fn: sampler.ApplyFn, params: Any,
                  x: jax.Array, known: KnownPrompts,
                  smoothing: SmoothingParams, irs: IRSParams, *,
                  num_classes: int | None = None, mesh=None) -> IRSResult:
  """Modified-IRS for one novel prompt (a class matrix [C, d]).

  Args:
    key, apply_fn, params, x: the key the known prompts were certified
      with, and the novel prompt's base classifier and the input.
    known: what certifying the known prompts left.
    smoothing: as in CERTIFY (for the fallback; n0 must equal the known
      prompts' n0).
    irs: n_p (<= the n_p the known prompts kept), gamma and alpha_zeta.
    num_classes, mesh: as in `standard.certify`.
  """
  _check_irs(irs)
  alpha_zeta = irs.zeta_alpha(smoothing)
  irs.check(smoothing)
  n0, n_p = smoothing.n0, irs.n_p
  if known.selection_predictions.shape[0] != n0:
    raise ConfigError(f"the known prompts were certified with n0 = "
                      f"{known.selection_predictions.shape[0]}, not {n0}")
  if known.estimation_predictions.shape[0] < n_p:
    raise ConfigError(f"the known prompts kept {known.estimation_predictions.shape[0]} "
                      f"probe predictions; irs.n_p = {n_p} needs more")
  class_embeddings = apply_fn.class_embeddings(params)
  if class_embeddings.ndim != 2:
    raise ConfigError("certify_novel takes one novel prompt's [C, d] matrix")
  if class_embeddings.shape != known.class_embeddings.shape[1:]:
    raise ConfigError(
        f"the novel prompt's class matrix {tuple(class_embeddings.shape)} does "
        f"not match the known prompts' {known.class_embeddings.shape[1:]} "
        "(different class count?)")
  x = sampler.check_input(x)
  num_classes = sampler.num_classes_of(apply_fn, params, num_classes)

  def draw(stream, num_samples, outputs, first_index=0):
    return sampler.sample_under_noise(
        apply_fn, params, x, sampler.stream_key(key, stream),
        num_samples=num_samples, sigma=smoothing.sigma,
        batch_size=smoothing.batch_size, num_classes=num_classes,
        outputs=outputs, mesh=mesh, first_index=first_index)

  selection, probe = jax.device_get((
      draw("selection", n0, ("counts", "predictions")),
      draw("estimation", n_p, ("counts", "predictions"))))
  t_hat = choose_known_prompt(np.asarray(selection["predictions"]), known,
                              np.asarray(jax.device_get(class_embeddings)))
  d = int(np.sum(np.asarray(probe["predictions"])
                 != known.estimation_predictions[:n_p, t_hat]))
  zeta = float(bounds.clopper_pearson_upper(d, n_p, alpha_zeta))
  counts = np.asarray(probe["counts"], np.int64)

  if zeta <= irs.gamma:
    cert = certificates.certificate_from_lower_bound(
        int(known.predictions[t_hat]), float(known.p_lower[t_hat]) - zeta,
        counts, smoothing.sigma)
    return IRSResult(cert, True, t_hat, d, zeta,
                     1.0 - smoothing.alpha - alpha_zeta, n0 + n_p)

  # Fallback: the rest of the estimation stream, then CERTIFY's last lines.
  if smoothing.n > n_p:
    rest = draw("estimation", smoothing.n - n_p, ("counts",), first_index=n_p)
    counts = counts + np.asarray(jax.device_get(rest["counts"]), np.int64)
  cert = certificates.certificate_from_counts(
      selection["counts"], counts, n=smoothing.n, sigma=smoothing.sigma,
      alpha=smoothing.alpha)
  return IRSResult(cert, False, t_hat, d, zeta, 1.0 - smoothing.alpha,
                   n0 + smoothing.n)
