"""MVN-OVC (paper Alg. 4): a fast approximation, NOT a certificate.

Fit a Gaussian N(mu, Sigma) to an input's noisy embeddings once per sigma and
keep only mu [d] and a factor F of Sigma = F F^T. Logits are linear in the
embedding, so for a new prompt with class matrix U they are approximately

    l ~ N(U mu, U Sigma U^T) = U mu + B h,   h ~ N(0, I_r),

with B a C x r factor of U Sigma U^T, r = min(C, d) (d: F's columns): B = U F
when C >= d, else the transposed R of a QR of (U F)^T, so that B B^T =
(U F)(U F)^T with C normals per sample instead of d. Draw n0 + n such logit
vectors, count the argmax and finish CERTIFY with pA_lower lowered by a
margin delta:
R = sigma * PhiInv(pA_lower - delta). The embeddings are not Gaussian in
general (they are L2-normalised outputs of a deep network), so the result can
exceed the exact radius: it is an estimate, and every output says so. With a
linear encoder the embeddings are exactly Gaussian and MVN-OVC agrees with
Cached-OVC within sampling error (tests/test_mvn_ovc.py).

The latent draws are keyed like the sampler's noise, per fixed-size block
rather than per sample: block b (samples b * LATENT_BLOCK ...) of a stream is
a pure function of `fold_in(stream key, b)` and r, so the draws are the same
for every batch size and can be regenerated block by block. The streams are
the input's "gaussian" stream, split like CERTIFY's: selection draws from
`stream_key(gaussian key, "selection")`, estimation draws from
`stream_key(gaussian key, "estimation")`, disjoint from each other and from
all image noise. A block's bits are Threefry-2x32 (JAX's own generator) of
its key on the counters 0 .. LATENT_BLOCK * r' - 1, r' = r rounded up to
even (as
`jax.extend.random.threefry_2x32` computes them, written out here so that XLA
fuses them into the sampling), word j * LATENT_BLOCK + i giving latent j of
the block's sample i (the last, partial block of a stream is computed for its
first samples only); each word becomes one normal by the inverse CDF,
sqrt(2) erfinv(2u - 1), u uniform on the 2^24 midpoints (k + 1/2) / 2^24
(Giles' single-precision erfinv, relative error < 4e-7; |h| <= 5.42, the
tail beyond has probability 6e-8). So the cost per sample grows with
r = min(C, d), not with d; at C >= d it is d normals and the [d] x [d, C]
product, the same FLOPs as Cached-OVC's E U^T.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import certificates
from ovc_jax import errors
from ovc_jax import sampler
from ovc_jax import tracing
from ovc_jax.certificates import ABSTAIN, Certificate, Counts, SmoothingParams
from ovc_jax.classifiers import NO_CLASS, check_class_embeddings
from ovc_jax.errors import ConfigError, InputError

APPROXIMATE_NOTE = "MVN-OVC: approximate, not a certificate"
DEFAULT_DELTA = 0.025
# Latent samples per key (see the module doc): the unit the draws are keyed
# by, independent of the batch size.
LATENT_BLOCK = 1024
# A step's logits ([rows, P * C] float32) are kept to about this many bytes,
# so that they stay in cache while their argmax is taken (as in Cached-OVC).
LOGITS_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class MVNParams:
  """MVN-OVC's own numbers, checked on construction.

  Attributes:
    delta: margin subtracted from pA_lower before the radius.
    batch_size: latent samples evaluated at once, at most (memory, not
      semantics: the draws are keyed per block of LATENT_BLOCK samples, so
      the counts are the same for every batch size).
  """

  delta: float = DEFAULT_DELTA
  batch_size: int = 100_000

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


# Threefry-2x32 with 20 rounds, as in jax.extend.random.threefry_2x32 (and
# Salmon et al. 2011); written out so that XLA fuses it with what follows.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k0, k1, x0, x1):
  k2 = k0 ^ k1 ^ np.uint32(0x1BD11BDA)
  keys = (k0, k1, k2)
  x0, x1 = x0 + k0, x1 + k1
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + keys[(i + 1) % 3]
    x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _block_bits(key_data, num_pairs: int, num_samples: int):
  """Words [2 * num_pairs, num_samples] of threefry_2x32(key, iota(2 * half))
  with half = num_pairs * LATENT_BLOCK, word j * LATENT_BLOCK + i at [j, i]:
  only the first num_samples of each row are computed (a partial block)."""
  half = num_pairs * LATENT_BLOCK
  counters = (jax.lax.broadcasted_iota(jnp.uint32, (num_pairs, num_samples), 0)
              * np.uint32(LATENT_BLOCK)
              + jax.lax.broadcasted_iota(jnp.uint32, (num_pairs, num_samples), 1))
  y0, y1 = _threefry2x32(key_data[0], key_data[1], counters,
                         counters + np.uint32(half))
  return jnp.concatenate([y0, y1], axis=0)


# Giles (2010), "Approximating the erfinv function", single precision.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06,
                   -4.39150654e-06, 0.00021858087, -0.00125372503,
                   -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322,
                -0.00367342844, 0.00573950773, -0.0076224613,
                0.00943887047, 1.00167406, 2.83297682)


def _erfinv(x):
  w = -jnp.log((1.0 - x) * (1.0 + x))
  central, tail = w - 2.5, jnp.sqrt(w) - 3.0
  p = jnp.float32(_ERFINV_CENTRAL[0])
  q = jnp.float32(_ERFINV_TAIL[0])
  for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:]):
    p = p * central + np.float32(a)
    q = q * tail + np.float32(b)
  return jnp.where(w < 5.0, p, q) * x


def bits_to_normal(bits: jax.Array) -> jax.Array:
  """Standard normals from uint32 words, one each: sqrt(2) erfinv(x) with
  x = +-(m + 1/2) / 2^23, m the low 23 bits and the sign the top bit, i.e.
  x = 2u - 1 for u uniform on the 2^24 midpoints (k + 1/2) / 2^24. Exact in
  float32, symmetric, never +-1."""
  magnitude = ((jax.lax.convert_element_type(bits & np.uint32(0x7FFFFF),
                                             jnp.float32) + 0.5)
               * np.float32(2.0 ** -23))
  x = jnp.where(bits >> np.uint32(31) == 1, -magnitude, magnitude)
  return np.float32(math.sqrt(2.0)) * _erfinv(x)


def _is_threefry(key) -> bool:
  impl = jax.random.key_impl(key) if jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key) else None
  return impl is None or "threefry" in str(impl)


def _latent_block_t(block_key, num_latents: int,
                    num_samples: int = LATENT_BLOCK):
  """The standard normals of one block key, latent-major: [r, num_samples],
  the block's first num_samples samples (latent j of sample i is word
  j * LATENT_BLOCK + i; an odd r draws one row more, unused)."""
  num_pairs = (num_latents + 1) // 2
  if _is_threefry(block_key):
    data = (jax.random.key_data(block_key) if jax.dtypes.issubdtype(
        block_key.dtype, jax.dtypes.prng_key) else block_key)
    bits = _block_bits(data.astype(jnp.uint32), num_pairs, num_samples)
  else:  # another PRNG implementation: its own bits, same layout
    bits = jax.random.bits(block_key, (2 * num_pairs, LATENT_BLOCK),
                           jnp.uint32)[:, :num_samples]
  return bits_to_normal(bits[:num_latents])


@functools.partial(jax.jit, static_argnums=2)
def _latent_normals(stream, block, num_latents):
  return _latent_block_t(jax.random.fold_in(stream, block), num_latents).T


def latent_normals(stream: jax.Array, block: int, num_latents: int) -> jax.Array:
  """Block `block` of a latent stream: standard normals [LATENT_BLOCK, r].

  Samples block * LATENT_BLOCK ... (block + 1) * LATENT_BLOCK - 1 of the
  stream, whatever the batch size; a pure function of
  `fold_in(stream, block)` and r: latent j of the block's sample i is
  `bits_to_normal` of word j * LATENT_BLOCK + i of
  `threefry_2x32(key_data(fold_in(stream, block)), iota(LATENT_BLOCK * r'))`,
  r' = r rounded up to even. A stream's last, partial block is its first
  samples: only those are drawn.
  """
  return _latent_normals(stream, block, int(num_latents))


def _logit_gaussian(fit: GaussianFit, class_embeddings: jax.Array):
  """Mean [P, C] and factor B [P, C, r] of the logits' Gaussian (traceable)."""
  hi = jax.lax.Precision.HIGHEST
  mean_logits = jnp.einsum("pcd,d->pc", class_embeddings, fit.mean,
                           precision=hi)
  factor = jnp.einsum("pcd,dr->pcr", class_embeddings, fit.factor,
                      precision=hi)
  num_classes, rank = factor.shape[-2:]
  if num_classes < rank:
    # (U F)^T = Q R with R [C, C]: (U F)(U F)^T = R^T R, so R^T is a C x C
    # factor of the logit covariance: C normals per sample instead of d.
    r = jnp.linalg.qr(jnp.swapaxes(factor, -1, -2), mode="r")
    factor = jnp.swapaxes(r, -1, -2)
  return mean_logits, factor


@jax.jit
def _logit_gaussian_jit(fit, class_embeddings):
  return _logit_gaussian(fit, class_embeddings)


def logit_gaussian(fit: GaussianFit,
                   class_embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The logits' Gaussian for U [C, d] or [P, C, d]: mean `[.., C]` and a
  factor `[.., C, r]` of U Sigma U^T, r = min(C, F's columns)."""
  u = jnp.asarray(class_embeddings, jnp.float32)
  mean, factor = _logit_gaussian_jit(fit, u if u.ndim == 3 else u[None])
  return (mean, factor) if u.ndim == 3 else (mean[0], factor[0])


def blocks_per_step(num_logits: int, batch_size: int) -> int:
  """Latent blocks evaluated at once: about `LOGITS_BYTES` of logits, at
  most `batch_size` samples (a memory bound), at least one block."""
  rows = min(LOGITS_BYTES // (4 * max(num_logits, 1)), batch_size)
  return max(1, rows // LATENT_BLOCK)


def _count_stream(stream, mean_logits, factor, *, num_samples, num_classes,
                  step_blocks):
  """Histogram [P, C] of argmax(mean + B h) over a stream's first
  `num_samples` latent samples: its full blocks `step_blocks` at a time,
  then the first samples of the next block (no more are drawn).

  Samples run along the minor axis (logits [P * C, rows], latents
  [r, rows]): at small C the matmul and the argmax over classes then
  vectorise across samples, several times faster than [rows, C].
  """
  num_latents = factor.shape[1]
  num_prompts = mean_logits.shape[0] // num_classes

  def histogram(latents, valid):
    logits = mean_logits[:, None] + jnp.dot(
        factor, latents, precision=jax.lax.Precision.HIGHEST)
    logits = logits.reshape(num_prompts, num_classes, -1)
    finite = jnp.all(jnp.isfinite(logits), axis=1)
    preds = jnp.where(finite, jnp.argmax(logits, axis=1), NO_CLASS)
    return sampler.count_classes(preds.T, valid, num_classes)

  counts = jnp.zeros((num_prompts, num_classes), jnp.int32)
  full_blocks, tail = divmod(num_samples, LATENT_BLOCK)
  if full_blocks:
    steps = math.ceil(full_blocks / step_blocks)
    step_blocks = math.ceil(full_blocks / steps)  # equal steps: little waste
    rows = step_blocks * LATENT_BLOCK

    def step(counts, s):
      blocks = s * step_blocks + jnp.arange(step_blocks)
      keys = jax.vmap(lambda b: jax.random.fold_in(stream, b))(blocks)
      latents = jax.vmap(_latent_block_t, in_axes=(0, None))(keys,
                                                             num_latents)
      latents = jnp.transpose(latents, (1, 0, 2)).reshape(num_latents, rows)
      valid = s * rows + jnp.arange(rows) < full_blocks * LATENT_BLOCK
      return counts + histogram(latents, valid), None

    counts, _ = jax.lax.scan(step, counts, jnp.arange(steps))
  if tail:
    latents = _latent_block_t(jax.random.fold_in(stream, full_blocks),
                              num_latents, tail)
    counts = counts + histogram(latents, jnp.ones(tail, bool))
  return counts


@functools.partial(jax.jit,
                   static_argnames=("n0", "n", "step_blocks"))
def _mvn_counts(fit, class_embeddings, key, *, n0, n, step_blocks):
  num_prompts, num_classes = class_embeddings.shape[:2]
  mean_logits, factor = _logit_gaussian(fit, class_embeddings)
  factor = factor.reshape(num_prompts * num_classes, factor.shape[-1])
  mean_logits = mean_logits.reshape(-1)
  latent = sampler.stream_key(key, "gaussian")
  kwargs = dict(num_classes=num_classes, step_blocks=step_blocks)
  return (_count_stream(sampler.stream_key(latent, "selection"), mean_logits,
                        factor, num_samples=n0, **kwargs),
          _count_stream(sampler.stream_key(latent, "estimation"), mean_logits,
                        factor, num_samples=n, **kwargs))


def check_fit(fit: GaussianFit) -> GaussianFit:
  """Raises InputError for a Gaussian fit of bad shape or with bad numbers.

  Traced fits (inside jit or vmap) are checked for shape only; a non-finite
  traced fit gives non-finite logits, which count for no class.
  """
  mean, factor = jnp.asarray(fit.mean), jnp.asarray(fit.factor)
  if mean.ndim != 1 or factor.ndim != 2 or factor.shape[0] != mean.shape[0]:
    raise InputError(f"a Gaussian fit is a mean [d] and a factor [d, r]; got "
                     f"{mean.shape} and {factor.shape}")
  if tracing.all_finite(fit.mean, fit.factor) is False:
    raise InputError(
        "the Gaussian fit contains NaN or infinite values (were some noisy "
        "embeddings not finite?); MVN-OVC cannot use it")
  return GaussianFit(mean, factor)


def check_margin(delta: float) -> None:
  if not 0.0 <= delta < 1.0:
    raise ConfigError(f"the MVN margin delta must lie in [0, 1); got {delta}")


def _check_params(smoothing: Any, mvn: Any) -> None:
  errors.check_bundle(smoothing, SmoothingParams, "smoothing")
  errors.check_bundle(mvn, MVNParams, "mvn")


def _checked(fit: GaussianFit, class_embeddings: jax.Array):
  """The fit and the class matrix as [P, C, d], checked and in float32."""
  fit = check_fit(fit)
  class_embeddings = check_class_embeddings(
      class_embeddings, embedding_size=int(fit.mean.shape[0]),
      embeddings_name="the Gaussian fit's embeddings").astype(jnp.float32)
  if class_embeddings.ndim == 2:
    class_embeddings = class_embeddings[None]
  return (GaussianFit(fit.mean.astype(jnp.float32),
                      fit.factor.astype(jnp.float32)), class_embeddings)


def _counts(key, fit, class_embeddings, smoothing, mvn) -> Counts:
  """mvn_counts for a fit and a class matrix [P, C, d] already checked."""
  num_logits = math.prod(class_embeddings.shape[:2])
  return Counts(*_mvn_counts(
      fit, class_embeddings, key, n0=smoothing.n0, n=smoothing.n,
      step_blocks=blocks_per_step(num_logits, mvn.batch_size)))


def mvn_counts(key: jax.Array, fit: GaussianFit, class_embeddings: jax.Array,
               smoothing: SmoothingParams,
               mvn: MVNParams = MVNParams()) -> Counts:
  """MVN-OVC's selection and estimation counts of n0 and n logit draws
  (traceable): `[C]` each for U [C, d], `[P, C]` for U [P, C, d].

  Pure in the key (its "gaussian" stream, see the module doc), the fit and
  the class matrix, any of which may be traced; concrete ones are checked on
  the host first (`check_fit`, `check_class_embeddings`).
  """
  _check_params(smoothing, mvn)
  single = jnp.ndim(class_embeddings) == 2
  fit, class_embeddings = _checked(fit, class_embeddings)
  counts = _counts(key, fit, class_embeddings, smoothing, mvn)
  return Counts(counts.selection[0], counts.estimation[0]) if single else counts


def certify_mvn_many(key: jax.Array, fit: GaussianFit,
                     class_embeddings: jax.Array, smoothing: SmoothingParams,
                     mvn: MVNParams = MVNParams()) -> list[Certificate]:
  """Approximate certificates of P prompts (U [P, C, d]); see module doc.

  Args:
    key: the input's key (the latent draws use its "gaussian" stream; see
      the module doc).
    fit: the input's Gaussian fit at smoothing.sigma.
    class_embeddings: `[C, d]` or `[P, C, d]`.
    smoothing: sigma (scales the radius), n0, n and alpha as in CERTIFY.
    mvn: the margin delta and the latent batch size.
  """
  _check_params(smoothing, mvn)
  fit, class_embeddings = _checked(fit, class_embeddings)
  counts = _counts(key, fit, class_embeddings, smoothing, mvn)
  return certificates.certificates_from_counts(
      counts.selection, counts.estimation, n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha, margin=mvn.delta)


def certify_mvn(key: jax.Array, fit: GaussianFit, class_embeddings: jax.Array,
                smoothing: SmoothingParams,
                mvn: MVNParams = MVNParams()) -> Certificate:
  """Approximate certificate of one prompt (U [C, d]); see certify_mvn_many."""
  if jnp.ndim(class_embeddings) != 2:
    raise InputError("certify_mvn takes one prompt's [C, d] class matrix; "
                     "use certify_mvn_many for [P, C, d]")
  return certify_mvn_many(key, fit, class_embeddings, smoothing, mvn)[0]


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
