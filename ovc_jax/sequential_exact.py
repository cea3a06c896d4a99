"""The sequential rule's behaviour for a given pA, computed exactly.

For a class cA drawn with probability pA per estimation draw, the counts
k_j at the checkpoints n_1 < ... < n_J form a Markov chain: k_j is k_{j-1}
plus an independent Binomial(n_j - n_{j-1}, pA). `stopping_distribution`
carries the probability mass of every count that has not stopped yet from
checkpoint to checkpoint (one convolution with the block's binomial
probabilities), applies the rule of `ovc_jax.certifiers.sequential` itself
(`stop_reasons`, the very function the certifier calls) to every count, and
takes the mass that stops out. Nothing is sampled: the numbers are exact up to
float64 rounding of the convolutions (about 1e-13 absolute).

What it returns, for one pA, rule and schedule: the probability of stopping
at each checkpoint for each reason, the mean draws, the probability of a
wrong certificate (a certified radius above sigma * PhiInv(pA), or any
certificate when pA <= 1/2) and the expected radius, clipped at max_radius
(the curves are drawn up to it). cA is taken as given: the selection draws
are independent of the estimation stream.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import signal
from scipy import stats

from ovc_jax.certifiers import sequential
from ovc_jax.certifiers.sequential import SequentialParams
from ovc_jax.errors import ConfigError


class StoppingDistribution(NamedTuple):
  """Where and why the rule stops for one pA.

  Attributes:
    p_a: the probability of cA per draw.
    checkpoints: n_1 .. n_J, int64 [J].
    stop_probability: float64 [J, R]: P[stop at checkpoint j for reason r],
      r indexing `sequential.STOP_REASONS`; sums to 1.
    mean_draws: E[n_tau], the estimation draws used.
    wrong_probability: P[the certificate is wrong].
    expected_radius: E[min(radius, max_radius)] (0 when it abstains).
  """

  p_a: float
  checkpoints: np.ndarray
  stop_probability: np.ndarray
  mean_draws: float
  wrong_probability: float
  expected_radius: float

  def reason_probability(self) -> dict[str, float]:
    """P[stop for each reason], over all checkpoints."""
    return {r: float(p) for r, p in zip(sequential.STOP_REASONS,
                                        self.stop_probability.sum(axis=0))}


def _binomial_pmf(n: int, p: float) -> np.ndarray:
  return stats.binom.pmf(np.arange(n + 1), n, p)


def stopping_distribution(p_a: float, *, sigma: float, alpha: float,
                          params: SequentialParams) -> StoppingDistribution:
  """The exact stopping distribution of the sequential rule at pA.

  Args:
    p_a: P[f(x + e) = cA], in [0, 1].
    sigma: the noise level.
    alpha: the rule's total alpha.
    params: the schedule, max_radius and precision.
  """
  if not 0.0 <= p_a <= 1.0:
    raise ConfigError(f"p_a must lie in [0, 1]; got {p_a}")
  if not 0.0 < alpha < 1.0:
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")
  checkpoints = np.asarray(params.checkpoints(), np.int64)
  alphas = params.checkpoint_alphas(alpha)
  last = len(checkpoints) - 1
  truth = (float(sigma * stats.norm.ppf(p_a)) if p_a > 0.5 else -np.inf)
  stop = np.zeros((len(checkpoints), len(sequential.STOP_REASONS)))
  mean_draws = wrong = radius = 0.0
  alive = np.ones(1)  # P[k draws of cA among those made, not stopped]
  drawn = 0
  for j, n_j in enumerate(checkpoints):
    alive = signal.fftconvolve(alive, _binomial_pmf(int(n_j - drawn), p_a))
    alive = np.clip(alive, 0.0, None)  # FFT rounding leaves tiny negatives
    drawn = int(n_j)
    reason, lower, _ = sequential.stop_reasons(
        np.arange(n_j + 1), int(n_j), alphas[j], last=j == last, sigma=sigma,
        params=params)
    stopped = reason >= 0
    mass = np.where(stopped, alive, 0.0)
    np.add.at(stop[j], reason[stopped], mass[stopped])
    certified = stopped & (reason != sequential.STOP_REASONS.index(
        sequential.STOP_ABSTAIN)) & (lower > 0.5)
    r = np.where(certified, sigma * stats.norm.ppf(np.clip(lower, 0.5, 1.0)),
                 0.0)
    mean_draws += n_j * mass.sum()
    wrong += mass[certified & (r > truth)].sum()
    radius += (mass * np.minimum(r, params.max_radius)).sum()
    alive = np.where(stopped, 0.0, alive)
  return StoppingDistribution(float(p_a), checkpoints, stop, float(mean_draws),
                              float(wrong), float(radius))


def fixed_n_expected_radius(p_a: float, *, sigma: float, alpha: float, n: int,
                            max_radius: float) -> float:
  """E[min(radius, max_radius)] of fixed-n CERTIFY: n draws, one look at alpha.

  A one-checkpoint schedule is CERTIFY: a stop for the radius there gives the
  certificate n_max would.
  """
  one_look = SequentialParams(max_radius=max_radius, n_max=int(n),
                              schedule=(int(n),))
  return stopping_distribution(p_a, sigma=sigma, alpha=alpha,
                               params=one_look).expected_radius


class RuleRow(NamedTuple):
  """One (rule, pA) cell of `compare_rules`."""

  rule: str
  p_a: float
  mean_draws: float
  radius_loss: float        # E[fixed-n radius] - E[rule's radius], both clipped
  wrong_probability: float
  reasons: dict


def compare_rules(p_grid, rules: dict[str, SequentialParams], *, sigma: float,
                  alpha: float, fixed_n: int) -> list[RuleRow]:
  """Mean draws, expected radius lost against fixed-n CERTIFY (n = fixed_n,
  full alpha) and P[wrong] of each rule at each pA, exactly."""
  rows = []
  for p_a in p_grid:
    max_radius = max(r.max_radius for r in rules.values())
    fixed = fixed_n_expected_radius(p_a, sigma=sigma, alpha=alpha, n=fixed_n,
                                    max_radius=max_radius)
    for name, params in rules.items():
      d = stopping_distribution(p_a, sigma=sigma, alpha=alpha, params=params)
      rows.append(RuleRow(name, float(p_a), d.mean_draws,
                          fixed - d.expected_radius, d.wrong_probability,
                          d.reason_probability()))
  return rows
