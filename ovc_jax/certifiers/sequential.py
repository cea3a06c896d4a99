"""Sequential, anytime-valid CERTIFY: draw until the answer is known.

Cohen et al.'s CERTIFY fixes the number n of estimation draws in advance. This
certifier draws the estimation stream in blocks and looks at the counts after
each block, at a checkpoint schedule n_1 < n_2 < ... < n_J = n_max fixed
before any draw. At checkpoint j, with k_j draws of cA among the first n_j,

  lower_j = LowerConfBound(k_j, n_j, 1 - alpha_j)
  upper_j = UpperConfBound(k_j, n_j, 1 - alpha_j)      sum_j alpha_j <= alpha

and it stops as soon as

  upper_j <= 1/2                         -> ABSTAIN                ("abstain")
  sigma * PhiInv(lower_j) >= max_radius  -> (cA, that radius)      ("radius")
  r(min(upper_j, p_cap)) - r(lower_j) <= precision
                                         -> CERTIFY's last lines   ("precision")
  n_j == n_max                           -> CERTIFY's last lines   ("n_max")

where r(p) = sigma * PhiInv(p) for p > 1/2 and 0 otherwise and p_cap =
Phi((max_radius + precision) / sigma): the precision stop (off unless
`precision` is set) ends the sampling once more draws could raise the radius
by at most `precision`, counting growth up to max_radius + precision (so that
a radius that would reach max_radius does not stop just below it). A prompt whose
selection draws gave no class abstains at the first checkpoint, as CERTIFY
does.

By the union bound P[exists j: pA < lower_j] <= sum_j alpha_j <= alpha, so the
bound at whatever checkpoint the rule stops at is a valid lower confidence
bound, and the certificate holds with probability >= 1 - alpha, as CERTIFY's
does, whichever rule stopped it (the upper bounds only choose the stopping
time). `ovc_jax.sequential_exact` computes the rule's stopping distribution
exactly. The class cA is chosen on the n0 selection draws, which the stopping
rule never looks at. The radius reported is the one reached (>= max_radius
when the rule stops for it), not clipped. See docs/SEQUENTIAL.md.

`sequential_certify_many` is the rule, on counts, for P classifiers of the
same draws; every front end calls it:

  certify_sequential[_many]       the encoder (keyed sampler, `first_index`)
  certify_sequential_cached[_many] slices of cached estimation embeddings
                                  (float32 or compressed); `OutOfDraws` when
                                  the cache is too short
  extend_embeddings               the missing tail of the same keyed stream
  certify_sequential_extending    cached, extended with encoder passes on demand

Sample i of the estimation stream is always the same draw (the sampler keys it
by i), so every front end sees the same counts at every checkpoint. The
encoder evaluates the stream in aligned chunks of smoothing.batch_size, the
chunks a one-shot `sample_under_noise` uses, so one sampler program serves a
run and every embedding has the bits a one-shot draw gives (Cached-OVC's
exactness carries over). Choose first_block as a multiple of batch_size (both
default to 1000); otherwise up to batch_size - 1 rows past the stopping
checkpoint are evaluated and not used.

A cache may be compressed (`cache_codec.CompressedRows` streams): each block
is counted by `cached_ovc.count_stream` with its rows' stream indices, so the
ambiguous samples are regenerated (the result is then the float32 cache's,
hence `certify_sequential`'s) or counted conservatively, as `CachedParams`
says; each certificate reports its prompt's ambiguous and regenerated draws
up to its stop. `extend_embeddings` grows a compressed cache by encoding the
new rows against the cache's own mean: the rows already there are kept as
they are, not decoded or encoded again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special
from scipy import stats

from ovc_jax import bounds
from ovc_jax import cache_codec
from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.cache_codec import CompressedRows
from ovc_jax.certificates import ABSTAIN, Certificate, SmoothingParams
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certifiers.cached_ovc import CachedParams, EmbeddingDraws
from ovc_jax.errors import ConfigError, InputError

ALPHA_SPLITS = ("uniform", "basel")

# Why a run stopped (SequentialResult.reason).
STOP_ABSTAIN = "abstain"   # upper_j <= 1/2
STOP_RADIUS = "radius"     # sigma * PhiInv(lower_j) >= max_radius
STOP_PRECISION = "precision"  # more draws raise the radius by <= precision
STOP_N_MAX = "n_max"       # the last checkpoint
STOP_REASONS = (STOP_ABSTAIN, STOP_RADIUS, STOP_PRECISION, STOP_N_MAX)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SequentialParams:
  """The stopping rule's numbers, checked on construction.

  Attributes:
    max_radius: stop and certify once the certified radius reaches this (in
      the noise space's units); `math.inf` stops early only to abstain.
    n_max: the most estimation draws; the last checkpoint.
    first_block: the first checkpoint, and the unit the geometric schedule is
      rounded to (each checkpoint is a multiple of it, except n_max).
    growth: the geometric schedule's ratio, > 1: n_{j+1} =
      first_block * ceil(growth * n_j / first_block), capped at n_max.
    schedule: an explicit checkpoint schedule instead (strictly increasing,
      ending at n_max); first_block and growth are then not used.
    alpha_split: how alpha is shared among the J checkpoints: "uniform"
      (alpha / J each) or "basel" (alpha * 6 / (pi^2 j^2) at checkpoint j).
    precision: stop once more draws could raise the radius by at most this
      (in the noise space's units; growth counted up to max_radius +
      precision), judged from the upper bound at the same alpha_j; None (the
      default) turns the precision stop off.
  """

  max_radius: float
  n_max: int
  first_block: int = 1000
  growth: float = 2.0
  schedule: tuple[int, ...] | None = None
  alpha_split: str = "uniform"
  precision: float | None = None

  def __post_init__(self):
    r = self.max_radius
    if (not isinstance(r, (int, float, np.integer, np.floating))
        or isinstance(r, bool) or not r > 0):
      raise ConfigError(f"max_radius must be a number > 0; got {r}")
    if not _is_int(self.n_max) or self.n_max < 1:
      raise ConfigError(f"n_max must be an integer >= 1; got {self.n_max}")
    if self.alpha_split not in ALPHA_SPLITS:
      raise ConfigError(f"unknown alpha split {self.alpha_split!r}; choose "
                        f"from {ALPHA_SPLITS}")
    e = self.precision
    if e is not None and (
        not isinstance(e, (int, float, np.integer, np.floating))
        or isinstance(e, bool) or not np.isfinite(e) or not e > 0):
      raise ConfigError(f"precision must be a finite number > 0 (or None); "
                        f"got {e}")
    if self.schedule is not None:
      _check_schedule(self.schedule, self.n_max)
      object.__setattr__(self, "schedule",
                         tuple(int(n) for n in self.schedule))
      return
    if not _is_int(self.first_block) or self.first_block < 1:
      raise ConfigError("the first block must be an integer >= 1; got "
                        f"{self.first_block}")
    if self.n_max < self.first_block:
      raise ConfigError(f"n_max ({self.n_max}) must be >= the first block "
                        f"({self.first_block})")
    g = self.growth
    if (not isinstance(g, (int, float, np.integer, np.floating))
        or isinstance(g, bool) or not np.isfinite(g) or not g > 1):
      raise ConfigError(f"growth must be a finite number > 1; got {g}")

  def checkpoints(self) -> tuple[int, ...]:
    """n_1 < ... < n_J = n_max: the draw counts at which the bound is read."""
    if self.schedule is not None:
      return self.schedule
    unit = int(self.first_block)
    out = [unit]
    while out[-1] < self.n_max:
      nxt = unit * math.ceil(self.growth * out[-1] / unit)
      out.append(min(nxt, int(self.n_max)))
    return tuple(out)

  def checkpoint_alphas(self, alpha: float) -> np.ndarray:
    """alpha_1..alpha_J, float64 [J], with sum <= alpha."""
    num = len(self.checkpoints())
    if self.alpha_split == "uniform":
      return np.full(num, alpha / num)
    j = np.arange(1, num + 1, dtype=np.float64)
    return alpha * 6.0 / (np.pi ** 2 * j ** 2)

  def replace(self, **changes) -> "SequentialParams":
    return dataclasses.replace(self, **changes)


def _check_schedule(schedule: Sequence[int], n_max: int) -> None:
  try:
    values = list(schedule)
  except TypeError:
    raise ConfigError(f"the checkpoint schedule must be a sequence of "
                      f"integers; got {schedule!r}") from None
  if not values:
    raise ConfigError("the checkpoint schedule is empty")
  if not all(_is_int(n) for n in values):
    raise ConfigError(f"the checkpoint schedule must hold integers; got {values}")
  if values[0] < 1:
    raise ConfigError(f"a block size must be >= 1; the schedule starts at "
                      f"{values[0]}")
  for a, b in zip(values, values[1:]):
    if b <= a:
      raise ConfigError("the checkpoint schedule must be strictly increasing; "
                        f"got {a} then {b}")
  if values[-1] != n_max:
    raise ConfigError(f"the checkpoint schedule must end at n_max ({n_max}); "
                      f"it ends at {values[-1]}")


class SequentialResult(NamedTuple):
  """One prompt's sequential certificate.

  Attributes:
    certificate: the certificate (`counts` are those of the first `draws`
      estimation draws; `pA_lower` the bound at level alpha_j).
    draws: estimation draws used, n_j of the stopping checkpoint.
    checkpoint: j, the index into `SequentialParams.checkpoints()`.
    reason: why it stopped: "abstain", "radius", "precision" or "n_max".
    pA_upper: the upper bound at the stopping checkpoint (same alpha_j).
  """

  certificate: Certificate
  draws: int
  checkpoint: int
  reason: str
  pA_upper: float


class OutOfDraws(NamedTuple):
  """The draws on hand ran out before the rule stopped.

  Attributes:
    draws_used: the last checkpoint evaluated (0 if none).
    draws_needed: the next checkpoint: extend the stream to at least this many
      estimation draws and run again (the answer then is what an unlimited
      stream gives).
    checkpoint: index of the last checkpoint evaluated (-1 if none).
  """

  draws_used: int
  draws_needed: int
  checkpoint: int


def _radius(p, sigma: float) -> np.ndarray:
  """r(p) = sigma * PhiInv(p) where p > 1/2, else 0 (float64)."""
  p = np.asarray(p, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    # ndtri is norm.ppf's own kernel (same values) without its per-call
    # argument handling, which dominated the rule's cost.
    r = sigma * special.ndtri(np.maximum(p, 0.5))
  return np.where(p > 0.5, r, 0.0)


def stop_reasons(k, n: int, alpha_j: float, *, last: bool, sigma: float,
                 params: SequentialParams) -> tuple[np.ndarray, np.ndarray,
                                                    np.ndarray]:
  """The rule at one checkpoint, for counts k of cA among n draws (arrays).

  Returns (reason, lower, upper): reason is an index into STOP_REASONS, or
  -1 to go on; lower and upper the Clopper-Pearson bounds at alpha_j. The
  order of the tests is the rule's: abstain, radius, precision, n_max.
  """
  k = np.asarray(k, np.int64)
  lower = np.asarray(bounds.clopper_pearson_lower(k, n, alpha_j), np.float64)
  upper = np.asarray(bounds.clopper_pearson_upper(k, n, alpha_j), np.float64)
  r_low = _radius(lower, sigma)
  reason = np.full(k.shape, -1, np.int64)
  if last:
    reason[:] = STOP_REASONS.index(STOP_N_MAX)
  if params.precision is not None:
    # Growth is counted up to max_radius + precision, not max_radius: capped
    # at max_radius, a prompt whose radius would reach max_radius could stop
    # just below it, and drop out of the curve at max_radius.
    p_cap = float(stats.norm.cdf((params.max_radius + params.precision)
                                 / sigma))
    gain = _radius(np.minimum(upper, p_cap), sigma) - r_low
    reason = np.where(gain <= params.precision,
                      STOP_REASONS.index(STOP_PRECISION), reason)
  reason = np.where((lower > 0.5) & (r_low >= params.max_radius),
                    STOP_REASONS.index(STOP_RADIUS), reason)
  reason = np.where(upper <= 0.5, STOP_REASONS.index(STOP_ABSTAIN), reason)
  return reason, lower, upper


# draw_counts_fn(first_index, num_samples) -> counts [C] (or [P, C]) of the
# estimation draws first_index .. first_index + num_samples - 1.
DrawCountsFn = Callable[[int, int], Any]


def sequential_certify_many(draw_counts_fn: DrawCountsFn, counts0, *,
                            sigma: float, alpha: float,
                            params: SequentialParams,
                            available: int | None = None
                            ) -> list[SequentialResult | OutOfDraws]:
  """The sequential rule for P classifiers on the same estimation stream.

  Args:
    draw_counts_fn: `(first_index, num_samples) -> counts [P, C]` (or `[C]`
      when P = 1) of the next block of the estimation stream; called with
      consecutive ranges from 0, one per checkpoint, while any classifier is
      still running. Counts may sum to less than num_samples (a draw with no
      class counts against cA); n is always the number of draws made.
    counts0: `[C]` or `[P, C]` selection counts: cA = argmax (ties to the
      lowest index). Never looked at by the stopping rule.
    sigma: the noise level (radius = sigma * PhiInv(lower)).
    alpha: the certificates hold with probability >= 1 - alpha each.
    params: the schedule and max_radius.
    available: the most draws `draw_counts_fn` can serve (None: unlimited);
      classifiers still running when the next checkpoint exceeds it get
      `OutOfDraws`.

  Returns:
    One result per classifier. Each depends only on that classifier's own
    counts at the checkpoints, so it equals the result of running it alone.
  """
  if not 0.0 < alpha < 1.0:
    raise ConfigError(f"alpha must lie in (0, 1); got {alpha}")
  if not np.isfinite(sigma) or sigma <= 0:
    raise ConfigError(f"sigma must be a finite number > 0; got {sigma}")
  counts0 = np.atleast_2d(np.asarray(jax.device_get(counts0), np.int64))
  if counts0.ndim != 2:
    raise InputError(f"selection counts must be [C] or [P, C]; got shape "
                     f"{counts0.shape}")
  num_prompts, num_classes = counts0.shape
  c_a = np.argmax(counts0, axis=-1)
  no_class = ~counts0.any(axis=-1)
  rows = np.arange(num_prompts)
  checkpoints = params.checkpoints()
  alphas = params.checkpoint_alphas(alpha)
  last = len(checkpoints) - 1

  results: list[SequentialResult | OutOfDraws | None] = [None] * num_prompts
  counts = np.zeros((num_prompts, num_classes), np.int64)
  drawn = 0
  for j, n_j in enumerate(checkpoints):
    active = [p for p in range(num_prompts) if results[p] is None]
    if not active:
      break
    if available is not None and n_j > available:
      for p in active:
        results[p] = OutOfDraws(drawn, n_j, j - 1)
      break
    block = np.asarray(jax.device_get(draw_counts_fn(drawn, n_j - drawn)),
                       np.int64)
    if block.size != counts.size:
      raise InputError(f"draw_counts_fn returned counts of shape {block.shape};"
                       f" expected {counts.shape} (or [C] for one classifier)")
    block = block.reshape(counts.shape)
    if np.any(block < 0) or np.any(block.sum(-1) > n_j - drawn):
      raise InputError(f"draw_counts_fn returned counts {block.tolist()} that "
                       f"do not fit {n_j - drawn} draws")
    counts += block
    drawn = n_j
    k = counts[rows, c_a]
    reason, lower, upper = stop_reasons(k, n_j, alphas[j], last=j == last,
                                        sigma=sigma, params=params)
    # A prompt whose selection draws gave no class abstains, as CERTIFY does.
    reason = np.where(no_class, STOP_REASONS.index(STOP_ABSTAIN), reason)
    for p in active:
      if reason[p] < 0:
        continue
      why = STOP_REASONS[reason[p]]
      prediction = (ABSTAIN if why == STOP_ABSTAIN or no_class[p]
                    else int(c_a[p]))
      p_lower = 0.0 if no_class[p] else lower[p]
      cert = certificates.certificate_from_lower_bound(
          prediction, p_lower, counts[p].copy(), sigma)
      results[p] = SequentialResult(cert, int(n_j), j, why, float(upper[p]))
  return results  # type: ignore[return-value]


def sequential_certify(draw_counts_fn: DrawCountsFn, counts0, *, sigma: float,
                       alpha: float, params: SequentialParams,
                       available: int | None = None
                       ) -> SequentialResult | OutOfDraws:
  """`sequential_certify_many` for one classifier: counts0 and blocks `[C]`."""
  if np.ndim(counts0) != 1:
    raise InputError("sequential_certify takes one classifier's [C] counts; "
                     "use sequential_certify_many for [P, C]")
  return sequential_certify_many(draw_counts_fn, counts0, sigma=sigma,
                                 alpha=alpha, params=params,
                                 available=available)[0]


def _aligned_chunk(batch_size: int, mesh) -> int:
  """S: the sampler's chunk for this batch size (and mesh).

  The estimation stream is always evaluated in chunks [c * S, (c + 1) * S),
  as a one-shot `sample_under_noise` with this batch size evaluates it, so an
  embedding does not depend on how a run was split into blocks: XLA gives the
  same bits for the same row only in the same chunk shape and position.
  """
  return sampler._chunk_size(batch_size, batch_size, mesh)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _count_rows(predictions, lo, hi, *, num_classes):
  """Histogram of rows lo .. hi - 1 of one chunk's predictions."""
  rows = jnp.arange(predictions.shape[0])
  return sampler.count_classes(predictions, (rows >= lo) & (rows < hi),
                               num_classes)


class _EncoderStream:
  """The estimation stream through the encoder, in aligned chunks of S.

  One sampler program (num_samples = S) serves a whole run. Rows computed
  past a checkpoint are kept for the next block, so only the rows past the
  stopping checkpoint up to the chunk's end are computed and not used (none
  when every checkpoint is a multiple of S).
  """

  def __init__(self, apply_fn, params, x, key, smoothing, num_classes,
               keep_embeddings, mesh):
    self._call = functools.partial(
        sampler.sample_under_noise, apply_fn, params, x,
        sampler.stream_key(key, "estimation"), sigma=smoothing.sigma,
        batch_size=smoothing.batch_size, mesh=mesh,
        outputs=(("predictions", "embeddings") if keep_embeddings
                 else ("predictions",)))
    self._size = _aligned_chunk(smoothing.batch_size, mesh)
    self._num_classes = num_classes
    self._chunks: dict[int, jax.Array] = {}   # start -> predictions [S, ...]
    self.embeddings: list[jax.Array] = []     # every chunk's, in order
    self._computed = 0

  def __call__(self, first_index: int, num_samples: int):
    size, end = self._size, first_index + num_samples
    while self._computed < end:
      out = self._call(num_samples=size, first_index=self._computed)
      self._chunks[self._computed] = out["predictions"]
      if "embeddings" in out:
        self.embeddings.append(out["embeddings"])
      self._computed += size
    total = None
    for start in range(first_index // size * size, end, size):
      lo, hi = max(first_index, start) - start, min(end, start + size) - start
      c = _count_rows(self._chunks[start], lo, hi,
                      num_classes=self._num_classes)
      total = c if total is None else total + c
      if start + size <= end:
        del self._chunks[start]  # fully used
    return total


def _selection(apply_fn, params, x, key, smoothing, num_classes, outputs, mesh):
  return sampler.sample_under_noise(
      apply_fn, params, x, sampler.stream_key(key, "selection"),
      num_samples=smoothing.n0, sigma=smoothing.sigma,
      batch_size=smoothing.batch_size, num_classes=num_classes,
      outputs=outputs, mesh=mesh)


class SequentialRun(NamedTuple):
  """`certify_sequential_many`'s results and the draws it made.

  Attributes:
    results: one `SequentialResult` per prompt.
    embeddings: the embeddings of the n0 selection draws and of exactly the
      first max(draws) estimation draws (None without keep_embeddings): a
      Cached-OVC cache of that length, extendable with `extend_embeddings`.
  """

  results: list[SequentialResult]
  embeddings: EmbeddingDraws | None


def certify_sequential_many(apply_fn: sampler.ApplyFn, params: Any,
                            x: jax.Array, key: jax.Array,
                            smoothing: SmoothingParams,
                            seq_params: SequentialParams, *,
                            num_classes: int | None = None,
                            keep_embeddings: bool = True,
                            mesh=None) -> SequentialRun:
  """Sequential CERTIFY of P classifiers on the same noise (predictions [B, P]).

  The encoder runs until every classifier has stopped; each result equals
  `certify_sequential` of that classifier alone with the same key.
  smoothing.n is not used: seq_params.n_max takes its place.

  Args:
    apply_fn: the base classifier; with keep_embeddings it must also return
      "embeddings" (e.g. `EmbeddingClassifier`).
    params: its parameters (class matrices [C, d] or [P, C, d]).
    x: the input.
    key: the input's noise key (selection and estimation streams as CERTIFY).
    smoothing: sigma, n0, alpha and the batch size.
    seq_params: the schedule and max_radius.
    num_classes: C; by default the classifier's own.
    keep_embeddings: return the embeddings of the draws made.
    mesh: optional device mesh over the sample axis.
  """
  x = sampler.check_input(x)
  num_classes = sampler.num_classes_of(apply_fn, params, num_classes)
  outputs = ("counts", "embeddings") if keep_embeddings else ("counts",)
  sel = _selection(apply_fn, params, x, key, smoothing, num_classes, outputs,
                   mesh)
  stream = _EncoderStream(apply_fn, params, x, key, smoothing, num_classes,
                          keep_embeddings, mesh)
  results = sequential_certify_many(
      stream, sel["counts"], sigma=smoothing.sigma, alpha=smoothing.alpha,
      params=seq_params)
  embeddings = None
  if keep_embeddings:
    used = max(r.draws for r in results)
    embeddings = EmbeddingDraws(
        sel["embeddings"],
        jnp.concatenate(stream.embeddings, axis=0)[:used])
  return SequentialRun(results, embeddings)


def certify_sequential(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
                       key: jax.Array, smoothing: SmoothingParams,
                       seq_params: SequentialParams, *,
                       num_classes: int | None = None,
                       mesh=None) -> SequentialResult:
  """Sequential CERTIFY of one base classifier (predictions [B]).

  The same key gives the same selection and estimation draws as
  `standard.certify`; only how many estimation draws are made differs.
  """
  x = sampler.check_input(x)
  num_classes = sampler.num_classes_of(apply_fn, params, num_classes)
  sel = _selection(apply_fn, params, x, key, smoothing, num_classes,
                   ("counts",), mesh)
  if np.ndim(sel["counts"]) != 1:
    raise ConfigError("certify_sequential takes one classifier; use "
                      "certify_sequential_many for class matrices [P, C, d]")
  stream = _EncoderStream(apply_fn, params, x, key, smoothing, num_classes,
                          False, mesh)
  return sequential_certify(stream, sel["counts"], sigma=smoothing.sigma,
                            alpha=smoothing.alpha, params=seq_params)


def num_rows(rows: Any) -> int:
  """The rows of float32 rows or of a `CompressedRows`."""
  return int(rows.shape[0] if hasattr(rows, "shape") else np.shape(rows)[0])


def _check_cache(embeddings: EmbeddingDraws, smoothing: SmoothingParams):
  n0 = num_rows(embeddings.selection)
  if n0 != smoothing.n0:
    raise InputError(f"the cache has {n0} selection draws but smoothing.n0 is "
                     f"{smoothing.n0}")


def rows_slice(rows: Any, start: int, stop: int) -> Any:
  """Rows [start, stop) of float32 rows or of a `CompressedRows` (its mean
  kept)."""
  if isinstance(rows, CompressedRows):
    return CompressedRows(rows.mean, rows.scale[start:stop],
                          rows.codes[start:stop], rows.bound[start:stop])
  return rows[start:stop]


def certify_sequential_cached_many(
    embeddings: EmbeddingDraws, class_embeddings: jax.Array,
    smoothing: SmoothingParams, seq_params: SequentialParams, *,
    batch_size: int = 10_000, ambiguous: str = "regenerate",
    regenerate: cached_ovc.Regenerate | None = None
) -> list[SequentialResult | OutOfDraws]:
  """Sequential CERTIFY of P prompts (U [P, C, d]) from cached embeddings.

  Blocks are slices of `embeddings.estimation`; a prompt whose rule needs
  more draws than the cache holds gets `OutOfDraws` (extend the cache with
  `extend_embeddings` and run again, or use `certify_sequential_extending`).
  A compressed cache's ambiguous samples are treated as `ambiguous` says
  ("regenerate" needs `regenerate`, e.g. `cached_ovc.encoder_regenerator`
  with smoothing.n = the stream's length; see the module docstring).
  """
  _check_cache(embeddings, smoothing)
  cached = CachedParams(batch_size, ambiguous=ambiguous)
  class_embeddings = jnp.asarray(class_embeddings)
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  estimation = embeddings.estimation
  blocks = []  # (end, ambiguous [P], regenerated [P]) of each block counted

  def count(rows, stream, first_index=0):
    out = cached_ovc.count_stream(rows, class_embeddings, stream=stream,
                                  cached=cached, regenerate=regenerate,
                                  first_index=first_index)
    return out

  def draw(first_index, num_samples):  # one program per block size
    out = count(rows_slice(estimation, first_index,
                           first_index + num_samples), "estimation",
                first_index)
    blocks.append((first_index + num_samples, out.ambiguous, out.regenerated))
    return out.counts

  selection = count(embeddings.selection, "selection")
  results = sequential_certify_many(
      draw, selection.counts, sigma=smoothing.sigma, alpha=smoothing.alpha,
      params=seq_params, available=num_rows(estimation))
  if not any(isinstance(r, CompressedRows) for r in embeddings):
    return results
  out = []
  for p, result in enumerate(results):
    if isinstance(result, OutOfDraws):
      out.append(result)
      continue
    used = [b for b in blocks if b[0] <= result.draws]
    cert = result.certificate._replace(
        ambiguous=int(selection.ambiguous[p] + sum(b[1][p] for b in used)),
        regenerated=int(selection.regenerated[p]
                        + sum(b[2][p] for b in used)))
    out.append(result._replace(certificate=cert))
  return out


def certify_sequential_cached(embeddings: EmbeddingDraws,
                              class_embeddings: jax.Array,
                              smoothing: SmoothingParams,
                              seq_params: SequentialParams, *,
                              batch_size: int = 10_000,
                              ambiguous: str = "regenerate",
                              regenerate: cached_ovc.Regenerate | None = None
                              ) -> SequentialResult | OutOfDraws:
  """One prompt (U [C, d]) from cached embeddings; no encoder pass (except
  for a compressed cache's ambiguous samples in "regenerate" mode).

  With the embeddings of the same key it gives what `certify_sequential`
  gives, or `OutOfDraws` if the cache is shorter than the draws needed.
  """
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_sequential_cached takes one prompt's [C, d] "
                     "class matrix; use certify_sequential_cached_many for "
                     "[P, C, d]")
  return certify_sequential_cached_many(embeddings, class_embeddings,
                                        smoothing, seq_params,
                                        batch_size=batch_size,
                                        ambiguous=ambiguous,
                                        regenerate=regenerate)[0]


def stream_regenerator(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
                       key: jax.Array, smoothing: SmoothingParams,
                       seq_params: SequentialParams,
                       mesh=None) -> cached_ovc.Regenerate:
  """`cached_ovc.encoder_regenerator` for a sequential run's streams: the
  estimation stream runs to n_max, evaluated in the aligned chunks of S
  rows this module's encoder passes use (so a regenerated sample has the
  bits of the run's)."""
  size = _aligned_chunk(smoothing.batch_size, mesh)
  return cached_ovc.encoder_regenerator(
      apply_fn, params, x, key,
      smoothing.replace(n=max(seq_params.n_max, size), batch_size=size))


def extend_embeddings(apply_fn: sampler.ApplyFn, params: Any, x: jax.Array,
                      key: jax.Array, embeddings: EmbeddingDraws,
                      new_total: int, smoothing: SmoothingParams, *,
                      mesh=None) -> EmbeddingDraws:
  """The cache with its estimation stream drawn on to `new_total` draws.

  Only the missing tail, draws len(estimation) .. new_total - 1 of the same
  keyed stream, goes through the encoder, in the aligned chunks of
  smoothing.batch_size a one-shot draw uses (the chunk the old part ends in
  is evaluated again, its rows past the cache kept). The old arrays are kept
  as they are, so the first part is bit-identical, and the tail is the bits a
  one-shot draw of new_total embeddings with this batch size gives. The tail
  is cast to the cache's dtype; numpy caches stay numpy. A compressed cache
  (`CompressedRows`) gets the tail encoded in its format against its own
  mean, each new row with its bound; its rows are not decoded.

  Args:
    apply_fn: a base classifier returning "embeddings" (the one the cache
      was made with); params: its parameters (any class matrix).
    x, key: the input and its noise key, as when the cache was made.
    embeddings: the cache.
    new_total: estimation draws wanted, >= those cached.
    smoothing: sigma and the batch size, as when the cache was made.
    mesh: optional device mesh over the sample axis.
  """
  _check_cache(embeddings, smoothing)
  old = embeddings.estimation
  have = num_rows(old)
  if not _is_int(new_total) or new_total < have:
    raise ConfigError(f"new_total must be an integer >= the {have} cached "
                      f"draws; got {new_total}")
  if new_total == have:
    return embeddings
  x = sampler.check_input(x)
  call = functools.partial(
      sampler.sample_under_noise, apply_fn, params, x,
      sampler.stream_key(key, "estimation"), sigma=smoothing.sigma,
      batch_size=smoothing.batch_size, outputs=("embeddings",), mesh=mesh)
  size = _aligned_chunk(smoothing.batch_size, mesh)
  first = have // size * size
  tail = jnp.concatenate(
      [call(num_samples=size, first_index=start)["embeddings"]
       for start in range(first, new_total, size)], axis=0)
  tail = tail[have - first:new_total - first]
  if tail.shape[1:] != tuple(old.shape[1:]):
    raise InputError(f"the encoder's embeddings {tail.shape[1:]} do not match "
                     f"the cache's {tuple(old.shape[1:])}")
  if isinstance(old, CompressedRows):
    packed = cache_codec.encode_rows(np.asarray(tail, np.float32), old.format,
                                     mean=np.asarray(old.mean))
    new = CompressedRows(old.mean, *(
        np.concatenate([np.asarray(a), b]) for a, b in
        ((old.scale, packed.scale), (old.codes, packed.codes),
         (old.bound, packed.bound))))
  elif isinstance(old, jax.Array):
    new = jnp.concatenate([old, tail.astype(old.dtype)], axis=0)
  else:
    old = np.asarray(old)
    new = np.concatenate([old, np.asarray(tail).astype(old.dtype)], axis=0)
  return EmbeddingDraws(embeddings.selection, new)


def certify_sequential_extending(
    apply_fn: sampler.ApplyFn, params: Any, x: jax.Array, key: jax.Array,
    embeddings: EmbeddingDraws, class_embeddings: jax.Array,
    smoothing: SmoothingParams, seq_params: SequentialParams, *,
    batch_size: int = 10_000, ambiguous: str = "regenerate", mesh=None
) -> tuple[SequentialResult, EmbeddingDraws]:
  """Cached sequential CERTIFY of one prompt, extending the cache on demand.

  Whenever the cache runs out, the stream is extended to the next checkpoint
  with encoder passes for the missing draws only, and the rule is run again
  on the longer cache (counting cached embeddings is cheap). Returns the
  result, equal to `certify_sequential` with the same key, and the cache
  (extended, or the one given). A compressed cache's ambiguous samples are
  regenerated with this encoder (`ambiguous="regenerate"`: the result is
  still `certify_sequential`'s) or counted conservatively.
  """
  regenerate = stream_regenerator(apply_fn, params, x, key, smoothing,
                                  seq_params, mesh)
  while True:
    result = certify_sequential_cached(embeddings, class_embeddings,
                                       smoothing, seq_params,
                                       batch_size=batch_size,
                                       ambiguous=ambiguous,
                                       regenerate=regenerate)
    if not isinstance(result, OutOfDraws):
      return result, embeddings
    embeddings = extend_embeddings(apply_fn, params, x, key, embeddings,
                                   result.draws_needed, smoothing, mesh=mesh)
