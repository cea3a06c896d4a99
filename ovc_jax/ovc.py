"""Open Vocabulary Certification (OVC) of one input: the pipeline.

  1. `certify_known_prompts`: certify the P known prompts of an input together,
     one encoder pass per noise sample for all of them. Their certificates are
     exactly standard RS's. The pass leaves three caches (`OVCCaches`): the
     known prompts' per-sample predictions (`KnownPrompts`, for Modified-IRS),
     the noisy embeddings (`EmbeddingDraws`, for Cached-OVC) and a Gaussian fit
     of them (`GaussianFit`, for MVN-OVC).
  2. `certify_novel_prompt`: certify a novel prompt by one of the four methods
     in `NOVEL_CERTIFIERS` (standard RS, Modified-IRS, Cached-OVC, MVN-OVC),
     from those caches, in memory (`OVCCaches`) or on disk (`StoredCaches`).

The same two steps with sequential, anytime-valid CERTIFY
(`certifiers/sequential.py`, docs/SEQUENTIAL.md): `certify_known_prompts_
sequential` draws until every known prompt has stopped and keeps exactly the
embeddings drawn; `certify_novel_prompt_sequential` certifies a novel prompt
from them by Cached-OVC (extending the cache with encoder passes for the
missing tail only, when its own rule needs more draws; the result equals the
sequential certifier run from scratch for that prompt) or by MVN-OVC (a
Gaussian fit of the draws made, then n_max logit draws, no encoder pass).

A stored embedding cache can be checked against the model itself: noise sample
i is a pure function of the key, so `verify_embedding_samples` regenerates a
few randomly chosen samples and compares their embeddings with the cached ones
(`StoredCaches(..., verify=NovelInput(...))` does so on every load).

Embedding caches may be stored compressed (`save_caches(...,
cache_format="int8")`, `cache_codec`): every row quantised, with a bound on
its error. Cached-OVC then counts the samples whose class the bound leaves
certain and treats the others as `OVCParams.cached_ambiguous` says:
"regenerate" recomputes them with the encoder from their keys (the
certificate is standard RS's, bit for bit), "conservative" counts an
ambiguous estimation sample as a miss (sound, possibly a smaller radius; no
encoder needed). A float32 cache has no ambiguous samples.

Example:
  classifier = EmbeddingClassifier(loaded.model.embed_images)
  params = OVCParams(SmoothingParams(sigma=0.25, n=10_000), IRSParams(n_p=1000))
  known = certify_known_prompts(classifier, loaded.params, x, key, U_known, params)
  result = certify_novel_prompt("cached", classifier, loaded.params, x, key,
                                known.caches, U_novel, params)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax import cache_codec
from ovc_jax import caches as cache_io
from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import Certificate, SmoothingParams
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certifiers import modified_irs
from ovc_jax.certifiers import mvn_ovc
from ovc_jax.certifiers import sequential
from ovc_jax.certifiers import standard
from ovc_jax.cache_codec import CompressedRows
from ovc_jax.certifiers.cached_ovc import CachedParams, EmbeddingDraws
from ovc_jax.certifiers.modified_irs import IRSParams, IRSResult, KnownPrompts
from ovc_jax.certifiers.mvn_ovc import GaussianFit, MVNParams
from ovc_jax.certifiers.sequential import SequentialParams, SequentialResult
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import CacheError, ConfigError

DEFAULT_CACHED_BATCH_SIZE = 10_000

# How far a regenerated noisy embedding (L2-normalised, float32) may be from
# the cached one, max abs over its entries, by the encoder's compute dtype. A
# recomputation differs only by the batch it ran in (another kernel, another
# summation order). On the toy CLIP (CPU, batch 1 against 256) that was at
# most 1.2e-7 in float32 and 1.3e-3 in bfloat16, while the same sample at
# another sigma (0.5 for 0.25) or from another stream differed by at least
# 1.5e-2 in every one of 1000 samples.
EMBEDDING_CHECK_ATOL = {"float32": 1e-4, "bfloat16": 1e-2}
DEFAULT_VERIFY_SAMPLES = 4
# How Cached-OVC treats a sample of a compressed cache whose class the
# decoded row leaves in doubt (cached_ovc.CachedParams.ambiguous).
AMBIGUOUS_MODES = cached_ovc.AMBIGUOUS_MODES


@dataclasses.dataclass(frozen=True)
class OVCParams:
  """Every number of OVC for one sigma.

  Attributes:
    smoothing: CERTIFY's sigma, n0, n, alpha and encoder batch size.
    irs: Modified-IRS's n_p, gamma and alpha_zeta.
    mvn: MVN-OVC's margin and latent batch size.
    cached_batch_size: cached embeddings counted at once by Cached-OVC.
    cached_ambiguous: how Cached-OVC treats the ambiguous samples of a
      compressed cache: "regenerate" (recompute them with the encoder: the
      certificate is standard RS's) or "conservative" (count an ambiguous
      estimation sample as a miss: sound, no encoder). No effect on a
      float32 cache.
  """

  smoothing: SmoothingParams
  irs: IRSParams
  mvn: MVNParams = MVNParams()
  cached_batch_size: int = DEFAULT_CACHED_BATCH_SIZE
  cached_ambiguous: str = "regenerate"

  def __post_init__(self):
    self.irs.check(self.smoothing)
    if (not isinstance(self.cached_batch_size, int)
        or self.cached_batch_size < 1):
      raise ConfigError("cached_batch_size must be an integer >= 1; got "
                        f"{self.cached_batch_size}")
    if self.cached_ambiguous not in AMBIGUOUS_MODES:
      raise ConfigError(f"cached_ambiguous must be one of {AMBIGUOUS_MODES}; "
                        f"got {self.cached_ambiguous!r}")

  def cached(self) -> CachedParams:
    """Cached-OVC's own parameters."""
    return CachedParams(self.cached_batch_size,
                        ambiguous=self.cached_ambiguous)


class OVCCaches(NamedTuple):
  """What certifying the known prompts of one input at one sigma leaves."""

  known_prompts: KnownPrompts
  embedding_draws: EmbeddingDraws
  gaussian_fit: GaussianFit

  # The CacheSource interface, for caches held in memory.
  def load_known(self) -> KnownPrompts:
    return self.known_prompts

  def load_embeddings(self) -> EmbeddingDraws:
    return self.embedding_draws

  def load_gaussian(self) -> GaussianFit:
    return self.gaussian_fit


class CacheSource(Protocol):
  """Where a novel-prompt certifier finds an input's caches."""

  def load_known(self) -> KnownPrompts: ...
  def load_embeddings(self) -> EmbeddingDraws: ...
  def load_gaussian(self) -> GaussianFit: ...


class KnownResult(NamedTuple):
  """The known prompts' certificates (standard RS) and the caches they leave."""

  certificates: list[Certificate]
  caches: OVCCaches


CACHE_KINDS = ("embeddings", "gaussian", "known")


def save_caches(directory: str, ovc_caches: OVCCaches,
                provenance: cache_io.Provenance, *, alpha: float,
                templates: list[str] | None = None,
                cache_format: str = "float32") -> dict[str, int]:
  """Writes the three caches under `directory`/<kind>; returns the bytes of
  their arrays. The embeddings are stored in `cache_format` (one of
  `cache_codec.FORMATS`), the other two as they are."""
  cache_codec.check_format(cache_format)
  return {
      "embeddings": cache_io.save_embeddings(
          os.path.join(directory, "embeddings"), ovc_caches.embedding_draws,
          provenance, cache_format),
      "gaussian": cache_io.save_gaussian(
          os.path.join(directory, "gaussian"), ovc_caches.gaussian_fit,
          provenance),
      "known": cache_io.save_known(
          os.path.join(directory, "known"), ovc_caches.known_prompts,
          provenance, templates=templates, alpha=alpha),
  }


class NovelInput(NamedTuple):
  """The input a novel prompt is certified on, with the classifier's image side."""

  classifier: EmbeddingClassifier
  encoder_params: Any
  x: jax.Array
  key: jax.Array


def embedding_check_tolerance(dtype: str) -> float:
  """`EMBEDDING_CHECK_ATOL` of a compute dtype ('float32' or 'bfloat16')."""
  if dtype not in EMBEDDING_CHECK_ATOL:
    raise ConfigError(f"no embedding check tolerance for dtype {dtype!r}; "
                      f"choose from {sorted(EMBEDDING_CHECK_ATOL)}")
  return EMBEDDING_CHECK_ATOL[dtype]


def _compute_dtype(classifier: Any) -> str:
  """The encoder's compute dtype where it says (`loaded.model.embed_images`,
  a bound method, possibly wrapped, e.g. by CLIPure), else 'float32'."""
  encoder = getattr(classifier, "encoder", None)
  for _ in range(4):
    if encoder is None:
      break
    for owner in (getattr(encoder, "model", None),
                  getattr(encoder, "__self__", None)):
      if isinstance(getattr(owner, "dtype", None), str):
        return owner.dtype
    encoder = getattr(encoder, "encoder", None)
  return "float32"


_NOT_THIS_CACHE = (
    "so the cache was not made from this input, key, sigma and model, "
    "whatever its metadata says; delete it and certify again to rebuild it")


def _check_decoded_sample(rows: CompressedRows, i: int,
                          regenerated: np.ndarray, atol: float,
                          what: str) -> None:
  """A compressed row i against the model's embedding of its noise draw.

  The exact row e_i lies within atol of the regenerated one in every entry
  (the recomputation's own rounding), hence within atol sqrt(d) in L2, and
  the decoded row within b_i of e_i; so ||decoded - regenerated||_2 <=
  b_i + atol sqrt(d) holds for the true cache. A row stored as non-finite
  (NaN step) must be non-finite in the model's too.
  """
  decoded = cache_codec.decode_rows(rows, i, i + 1)[0].astype(np.float64)
  scale = float(rows.scale[i])
  exact_finite = bool(np.all(np.isfinite(regenerated)))
  if np.isnan(scale) or not exact_finite:
    if np.isnan(scale) and not exact_finite:
      return
    raise CacheError(
        f"{what} is {'not ' if np.isnan(scale) else ''}finite where the one "
        f"the model gives for that noise draw is "
        f"{'' if exact_finite else 'not '}finite, {_NOT_THIS_CACHE}")
  bound = float(rows.bound[i])
  allowed = bound + atol * np.sqrt(decoded.shape[0])
  distance = float(np.linalg.norm(decoded - regenerated.astype(np.float64)))
  if not distance <= allowed:
    raise CacheError(
        f"{what} decodes {distance:.3g} (L2) away from the one the model "
        f"gives for that noise draw, beyond its bound {bound:.3g} plus the "
        f"tolerance ({allowed:.3g} in all), {_NOT_THIS_CACHE}")


def verify_embedding_samples(classifier: EmbeddingClassifier,
                             encoder_params: Any, x: jax.Array, key: jax.Array,
                             draws: EmbeddingDraws, smoothing: SmoothingParams,
                             *, num_checks: int = DEFAULT_VERIFY_SAMPLES,
                             seed: int | None = None,
                             atol: float | None = None,
                             name: str = "the embedding cache",
                             ) -> list[tuple[str, int]]:
  """Checks cached noisy embeddings against the model, sample by sample.

  Noise sample i of a stream is a pure function of the input's key, so it can
  be drawn again alone (`sampler.sample_under_noise(..., first_index=i,
  num_samples=1)` on the "selection" or "estimation" stream) and embedded.
  This draws `num_checks` randomly chosen samples again (half from each
  stream, the odd one from the estimation draws) and compares their
  embeddings with the cached ones (a compressed row: its decoded row must lie
  within its bound b_i of the model's, plus atol sqrt(d) in L2). It catches
  what no checksum can: a cache
  whose metadata claims another sigma, input, key or model than its arrays
  were made with (rewritten consistently, or by a buggy caller).

  Args:
    classifier, encoder_params, x, key: as for `certify_known_prompts`.
    draws: the cached embeddings.
    smoothing: sigma (and n0, n, which must match the cache's shape).
    num_checks: how many samples to regenerate (0: none).
    seed: which samples (None: fresh randomness each call).
    atol: the largest max-abs difference accepted; default
      `EMBEDDING_CHECK_ATOL` of the encoder's compute dtype. Non-finite
      entries must be non-finite in both.
    name: how the CacheError names the cache.

  Returns:
    The (stream, index) pairs checked.

  Raises:
    CacheError: naming the first sample whose embedding differs, and by how
      much.
  """
  if not isinstance(num_checks, (int, np.integer)) or num_checks < 0:
    raise ConfigError(f"num_checks must be an integer >= 0; got {num_checks}")
  if num_checks == 0:
    return []
  atol = (embedding_check_tolerance(_compute_dtype(classifier))
          if atol is None else float(atol))
  x = sampler.check_input(x)
  cached = {"selection": draws.selection, "estimation": draws.estimation}
  want = {"selection": smoothing.n0, "estimation": smoothing.n}
  for stream, arr in cached.items():
    if len(np.shape(arr)) != 2 or np.shape(arr)[0] != want[stream]:
      raise CacheError(f"{name} holds {stream} embeddings of shape "
                       f"{tuple(np.shape(arr))}; {want[stream]} draws expected")
  d = int(np.shape(draws.estimation)[1])
  model_d = classifier.embedding_size(encoder_params, x.shape)
  if model_d != d:
    raise CacheError(f"{name} holds embeddings of size {d} but the model's "
                     f"have size {model_d}: it was made with another model")
  rng = np.random.default_rng(seed)
  picks = []
  for stream, count in (("selection", num_checks // 2),
                        ("estimation", num_checks - num_checks // 2)):
    m = want[stream]
    picks += [(stream, int(i)) for i in
              np.sort(rng.choice(m, size=min(count, m), replace=False))]
  params = classifier.params(encoder_params, jnp.zeros((1, d), jnp.float32))
  for stream, i in picks:
    regenerated = np.asarray(sampler.sample_under_noise(
        classifier, params, x, sampler.stream_key(key, stream),
        num_samples=1, sigma=smoothing.sigma, batch_size=1,
        outputs=("embeddings",), first_index=i)["embeddings"][0], np.float32)
    rows = cached[stream]
    if isinstance(rows, CompressedRows):
      _check_decoded_sample(rows, i, regenerated, atol,
                            f"{name}: the cached embedding of {stream} "
                            f"sample {i}")
      continue
    stored = np.asarray(rows[i], np.float32)
    both_nan = np.isnan(stored) & np.isnan(regenerated)
    with np.errstate(invalid="ignore"):
      diff = np.where(both_nan, 0.0, np.abs(stored - regenerated))
    worst = float(np.max(np.where(np.isnan(diff), np.inf, diff)))
    if not worst <= atol:
      raise CacheError(
          f"{name}: the cached embedding of {stream} sample {i} differs from "
          f"the one the model gives for that noise draw by {worst:.3g} (max "
          f"abs; tolerance {atol:g}), {_NOT_THIS_CACHE}")
  return picks


@dataclasses.dataclass(frozen=True)
class StoredCaches:
  """An input's caches on disk (as `save_caches` wrote them), read and checked
  against `provenance` on each load, so that a timed load counts the read.

  Attributes:
    directory: the input's cache directory at one sigma.
    provenance: what the caller's certification would have made them from.
    known_class_embeddings: the known prompts' class matrices [P, C, d]
      (Modified-IRS's tie-break; not stored in the cache).
    templates: the known prompts' templates, checked if given.
    verify: the model and input (`NovelInput(classifier, encoder_params, x,
      key)`) to check loaded embeddings against with
      `verify_embedding_samples` (at the provenance's sigma, with the
      tolerance of its dtype); None: not checked.
    verify_samples: how many samples that regenerates per load (0: none).
    verify_seed: which samples (None: fresh randomness each load).
  """

  directory: str
  provenance: cache_io.Provenance
  known_class_embeddings: Any = None
  templates: tuple[str, ...] | None = None
  verify: NovelInput | None = None
  verify_samples: int = DEFAULT_VERIFY_SAMPLES
  verify_seed: int | None = None

  def load_known(self) -> KnownPrompts:
    if self.known_class_embeddings is None:
      raise ConfigError("Modified-IRS needs the known prompts' class matrices")
    return cache_io.load_known(
        os.path.join(self.directory, "known"), self.provenance,
        self.known_class_embeddings,
        templates=None if self.templates is None else list(self.templates))

  def load_embeddings(self) -> EmbeddingDraws:
    directory = os.path.join(self.directory, "embeddings")
    draws = cache_io.load_embeddings(directory, self.provenance)
    if self.verify is not None and self.verify_samples:
      prov = self.provenance
      verify_embedding_samples(
          *self.verify, draws,
          SmoothingParams(sigma=prov.sigma, n0=prov.n0, n=prov.n),
          num_checks=self.verify_samples, seed=self.verify_seed,
          atol=embedding_check_tolerance(prov.dtype),
          name=f"cache {directory}")
    return draws

  def load_gaussian(self) -> GaussianFit:
    return cache_io.load_gaussian(os.path.join(self.directory, "gaussian"),
                                  self.provenance)


def _known_params(classifier: EmbeddingClassifier, encoder_params: Any,
                  known_class_embeddings) -> tuple[jax.Array, Any]:
  """The known prompts' class matrices, checked to be [P, C, d], and the
  classifier's params for all of them."""
  known_class_embeddings = jnp.asarray(known_class_embeddings)
  if known_class_embeddings.ndim != 3:
    raise ConfigError("known prompts must be stacked as [P, C, d]; got shape "
                      f"{known_class_embeddings.shape}")
  return (known_class_embeddings,
          classifier.params(encoder_params, known_class_embeddings))


def certify_known_prompts(classifier: EmbeddingClassifier, encoder_params: Any,
                          x: jax.Array, key: jax.Array,
                          known_class_embeddings: jax.Array,
                          params: OVCParams, *, mesh=None) -> KnownResult:
  """Certifies P known prompts of one input in one pass and keeps its caches.

  Args:
    classifier: the image side of the zero-shot classifier.
    encoder_params: its encoder's params.
    x: the input noise is added to.
    key: the input's noise key.
    known_class_embeddings: `[P, C, d]`, one class matrix per known prompt.
    params: the OVC parameters.
    mesh: optional device mesh over the sample axis.

  Returns:
    Each known prompt's certificate (identical to `standard.certify` of that
    prompt alone with `key`) and the three caches.
  """
  known_class_embeddings, model_params = _known_params(
      classifier, encoder_params, known_class_embeddings)
  smoothing = params.smoothing
  draws = standard.certification_draws(
      key, classifier, model_params, x, smoothing,
      outputs=("counts", "predictions", "embeddings"), mesh=mesh)
  certs = certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"], n=smoothing.n,
      sigma=smoothing.sigma, alpha=smoothing.alpha)
  embeddings = cached_ovc.embeddings_from_draws(draws)
  known = modified_irs.known_prompts_from_draws(
      draws, certs, known_class_embeddings, params.irs.n_p)
  return KnownResult(certs, OVCCaches(
      known, embeddings, mvn_ovc.fit_gaussian(embeddings.estimation)))


class NovelResult(NamedTuple):
  """A novel prompt's result.

  Attributes:
    certificate: the certificate (an estimate when `approximate`).
    method: the method's name (a key of NOVEL_CERTIFIERS).
    approximate: True for MVN-OVC, whose result is not a certificate.
    confidence: the probability the certificate holds with (None when
      approximate).
    irs: Modified-IRS's record (None for the other methods).
  """

  certificate: Certificate
  method: str
  approximate: bool
  confidence: float | None
  irs: IRSResult | None = None


def _standard(inp: NovelInput, _: CacheSource, class_embeddings,
              params: OVCParams) -> NovelResult:
  cert = standard.certify(
      inp.key, inp.classifier,
      inp.classifier.params(inp.encoder_params, class_embeddings), inp.x,
      params.smoothing)
  return NovelResult(cert, "standard", False, 1.0 - params.smoothing.alpha)


def _irs(inp: NovelInput, source: CacheSource, class_embeddings,
         params: OVCParams) -> NovelResult:
  result = modified_irs.certify_novel(
      inp.key, inp.classifier,
      inp.classifier.params(inp.encoder_params, class_embeddings), inp.x,
      source.load_known(), params.smoothing, params.irs)
  return NovelResult(result.certificate, "irs", False, result.confidence,
                     result)


def is_compressed(draws: EmbeddingDraws) -> bool:
  """Whether a cache holds compressed rows (int16 or int8)."""
  return any(isinstance(rows, CompressedRows) for rows in draws)


def regenerator(inp: NovelInput, class_embeddings, smoothing: SmoothingParams
                ) -> cached_ovc.Regenerate:
  """What recomputes a cache's ambiguous samples with the input's encoder."""
  return cached_ovc.encoder_regenerator(
      inp.classifier, inp.classifier.params(inp.encoder_params,
                                            class_embeddings),
      inp.x, inp.key, smoothing)


def _cached(inp: NovelInput, source: CacheSource, class_embeddings,
            params: OVCParams) -> NovelResult:
  # No encoder pass (that is the point), except for the few samples of a
  # compressed cache that its bounds leave ambiguous, in "regenerate" mode.
  draws = source.load_embeddings()
  regenerate = (regenerator(inp, class_embeddings, params.smoothing)
                if is_compressed(draws)
                and params.cached_ambiguous == "regenerate" else None)
  cert = cached_ovc.certify_cached(draws, class_embeddings, params.smoothing,
                                   params.cached(), regenerate=regenerate)
  return NovelResult(cert, "cached", False, 1.0 - params.smoothing.alpha)


def _mvn(inp: NovelInput, source: CacheSource, class_embeddings,
         params: OVCParams) -> NovelResult:
  cert = mvn_ovc.certify_mvn(inp.key, source.load_gaussian(), class_embeddings,
                             params.smoothing, params.mvn)
  return NovelResult(cert, "mvn", True, None)


class NovelCertifier(NamedTuple):
  """One way to certify a new prompt: `fn(input, caches, U [C, d], params)`."""

  name: str
  label: str
  fn: Callable[[NovelInput, CacheSource, jax.Array, OVCParams], NovelResult]


NOVEL_CERTIFIERS = {c.name: c for c in (
    NovelCertifier("standard", "standard RS", _standard),
    NovelCertifier("irs", "Modified-IRS", _irs),
    NovelCertifier("cached", "Cached-OVC", _cached),
    NovelCertifier("mvn", "MVN-OVC (approximate)", _mvn),
)}
METHODS = tuple(NOVEL_CERTIFIERS)


def certify_novel_prompt(method: str, classifier: EmbeddingClassifier,
                         encoder_params: Any, x: jax.Array, key: jax.Array,
                         source: CacheSource, class_embeddings: jax.Array,
                         params: OVCParams) -> NovelResult:
  """Certifies one novel prompt (U [C, d]) of an input by `method`.

  Args:
    method: a key of NOVEL_CERTIFIERS: "standard", "irs", "cached" or "mvn".
    classifier, encoder_params, x, key: as for `certify_known_prompts` (the
      same key: the caches were drawn with it).
    source: the input's caches (`OVCCaches` or `StoredCaches`).
    class_embeddings: the novel prompt's class matrix `[C, d]`.
    params: the OVC parameters the caches were made with.
  """
  if method not in NOVEL_CERTIFIERS:
    raise ConfigError(f"unknown method {method!r}; choose from {METHODS}")
  return NOVEL_CERTIFIERS[method].fn(
      NovelInput(classifier, encoder_params, x, key), source,
      jnp.asarray(class_embeddings), params)


# Sequential OVC: the known prompts' pass stops once every known prompt's rule
# has stopped; novel prompts reuse (and, on demand, extend) its draws.


class SequentialKnownResult(NamedTuple):
  """The known prompts' sequential certificates and the draws they made.

  Attributes:
    results: one `SequentialResult` per known prompt (certificate, draws,
      checkpoint, reason), each what `certify_sequential` of that prompt
      alone gives with the key.
    embedding_draws: the embeddings of the n0 selection draws and of exactly
      the first max(draws) estimation draws: the Cached-OVC cache.
    encoder_passes: noisy images the encoder embedded for all of them:
      n0 + max(draws) (plus the rows past the last checkpoint in the chunk
      the run stopped in, none when checkpoints are multiples of the batch
      size).
  """

  results: list[SequentialResult]
  embedding_draws: EmbeddingDraws
  encoder_passes: int


def _evaluated_rows(draws: int, smoothing: SmoothingParams, mesh=None) -> int:
  """Estimation rows the encoder computes to serve `draws` of them: the
  sampler's aligned chunks (`sequential._aligned_chunk`), rounded up."""
  size = sequential._aligned_chunk(smoothing.batch_size, mesh)  # pylint: disable=protected-access
  return -(-draws // size) * size


def certify_known_prompts_sequential(
    classifier: EmbeddingClassifier, encoder_params: Any, x: jax.Array,
    key: jax.Array, known_class_embeddings: jax.Array, params: OVCParams,
    seq_params: SequentialParams, *, mesh=None) -> SequentialKnownResult:
  """Sequential CERTIFY of P known prompts ([P, C, d]) on one encoder pass.

  The pass draws the estimation stream block by block and goes on until the
  last known prompt has stopped; `params.smoothing.n` is not used
  (`seq_params.n_max` takes its place).
  """
  known_class_embeddings, model_params = _known_params(
      classifier, encoder_params, known_class_embeddings)
  smoothing = params.smoothing
  run = sequential.certify_sequential_many(
      classifier, model_params, x, key, smoothing, seq_params,
      keep_embeddings=True, mesh=mesh)
  used = max(r.draws for r in run.results)
  return SequentialKnownResult(
      run.results, run.embeddings,
      smoothing.n0 + _evaluated_rows(used, smoothing, mesh))


class SequentialNovelResult(NamedTuple):
  """A novel prompt's sequential result.

  Attributes:
    result: the `SequentialResult` (for MVN-OVC an estimate, not a
      certificate: `approximate`).
    method: "cached" or "mvn".
    approximate: True for MVN-OVC.
    embedding_draws: the cache after this prompt: extended when Cached-OVC's
      rule needed more draws than it held, else the one given.
    encoder_passes: noisy images the encoder embedded for this prompt (the
      missing tail only; 0 when the cache sufficed, and always for MVN-OVC).
  """

  result: SequentialResult
  method: str
  approximate: bool
  embedding_draws: EmbeddingDraws
  encoder_passes: int


SEQUENTIAL_METHODS = ("cached", "mvn")


def certify_novel_prompt_sequential(
    method: str, classifier: EmbeddingClassifier, encoder_params: Any,
    x: jax.Array, key: jax.Array, embedding_draws: EmbeddingDraws,
    class_embeddings: jax.Array, params: OVCParams,
    seq_params: SequentialParams, *, mesh=None) -> SequentialNovelResult:
  """Certifies one novel prompt (U [C, d]) sequentially from the known
  prompts' draws.

  "cached": the sequential rule on slices of the cached embeddings. If it
  has not stopped when they run out, the same keyed stream is extended with
  encoder passes for the missing tail only (the cache's part stays as it is)
  and the rule goes on: the result equals `certify_sequential` of this
  prompt from scratch with the key. "mvn": a Gaussian fit of the cached
  estimation embeddings, then MVN-OVC with n = seq_params.n_max logit draws
  (they cost no encoder pass, so there is nothing to stop early for),
  labelled approximate; its `draws` are those logit draws.

  Modified-IRS does not carry over as a method of its own: its probe needs
  n_p encoder passes of the novel prompt on draws the cache already holds,
  where Cached-OVC gives the exact certificate with none (docs/SEQUENTIAL.md).
  """
  if method not in SEQUENTIAL_METHODS:
    raise ConfigError(f"unknown sequential method {method!r}; choose from "
                      f"{SEQUENTIAL_METHODS}")
  class_embeddings = jnp.asarray(class_embeddings)
  if class_embeddings.ndim != 2:
    raise ConfigError("a novel prompt's class matrix is [C, d]; got shape "
                      f"{class_embeddings.shape}")
  smoothing = params.smoothing
  if method == "mvn":
    rows = embedding_draws.estimation
    if isinstance(rows, CompressedRows):  # an estimate anyway: decoded rows
      rows = cache_codec.decode_rows(rows)
    fit = mvn_ovc.fit_gaussian(rows)
    mvn_smoothing = dataclasses.replace(smoothing, n=seq_params.n_max)
    cert = mvn_ovc.certify_mvn(key, fit, class_embeddings, mvn_smoothing,
                               params.mvn)
    reason = (sequential.STOP_ABSTAIN if cert.prediction < 0 else
              sequential.STOP_N_MAX)
    result = SequentialResult(cert, seq_params.n_max,
                              len(seq_params.checkpoints()) - 1, reason,
                              float("nan"))
    return SequentialNovelResult(result, "mvn", True, embedding_draws, 0)
  model_params = classifier.params(encoder_params, class_embeddings)
  size = sequential._aligned_chunk(smoothing.batch_size, mesh)  # pylint: disable=protected-access
  regenerate = sequential.stream_regenerator(classifier, model_params, x, key,
                                             smoothing, seq_params, mesh)
  passes = 0
  while True:  # sequential.certify_sequential_extending, counting the passes
    result = sequential.certify_sequential_cached(
        embedding_draws, class_embeddings, smoothing, seq_params,
        batch_size=params.cached_batch_size,
        ambiguous=params.cached_ambiguous, regenerate=regenerate)
    if not isinstance(result, sequential.OutOfDraws):
      return SequentialNovelResult(result, "cached", False, embedding_draws,
                                   passes)
    have = sequential.num_rows(embedding_draws.estimation)
    embedding_draws = sequential.extend_embeddings(
        classifier, model_params, x, key, embedding_draws,
        result.draws_needed, smoothing, mesh=mesh)
    # The chunk the old cache ended in is evaluated again (its new rows kept).
    passes += (_evaluated_rows(result.draws_needed, smoothing, mesh)
               - have // size * size)


class SequentialReplay(NamedTuple):
  """A sequential OVC run replayed from a full cache.

  Attributes:
    known: one `SequentialResult` per known prompt.
    novel: one `SequentialResult` per novel prompt (Cached-OVC).
    encoder_passes: the noisy images a live run with the same key would embed:
      the known prompts' shared pass plus every tail a novel prompt added.
  """

  known: list[SequentialResult]
  novel: list[SequentialResult]
  encoder_passes: int


def replay_sequential(embedding_draws: EmbeddingDraws,
                      known_class_embeddings: jax.Array,
                      novel_class_embeddings: Sequence[jax.Array],
                      params: OVCParams, seq_params: SequentialParams, *,
                      mesh=None) -> SequentialReplay:
  """`certify_known_prompts_sequential`, then `certify_novel_prompt_sequential`
  ("cached") for each novel prompt in order, from a cache of at least n_max
  estimation draws of the same key: no encoder pass.

  Sample i is the same draw in the cache and in a live run, so every result
  equals the live run's, and the encoder passes are those the live run counts
  (the shared pass to the last known prompt's stop, then each extension to
  the next checkpoint a novel prompt's rule asks for). Many stopping rules can
  thus be compared on one fixed-n run's caches. A compressed cache is
  counted conservatively only (`params.cached_ambiguous`; there is no
  encoder here to regenerate with).
  """
  smoothing = params.smoothing
  have = sequential.num_rows(embedding_draws.estimation)
  if have < seq_params.n_max:
    raise ConfigError(f"replaying needs a cache of at least n_max = "
                      f"{seq_params.n_max} estimation draws; it holds {have}")
  known = sequential.certify_sequential_cached_many(
      embedding_draws, known_class_embeddings, smoothing, seq_params,
      batch_size=params.cached_batch_size, ambiguous=params.cached_ambiguous)
  cached = max(r.draws for r in known)  # what the live pass keeps
  passes = smoothing.n0 + _evaluated_rows(cached, smoothing, mesh)
  size = sequential._aligned_chunk(smoothing.batch_size, mesh)  # pylint: disable=protected-access
  novel = []
  for u in novel_class_embeddings:
    result = sequential.certify_sequential_cached(
        embedding_draws, u, smoothing, seq_params,
        batch_size=params.cached_batch_size,
        ambiguous=params.cached_ambiguous)
    for n_j in seq_params.checkpoints():  # the live loop's extensions
      if cached < n_j <= result.draws:
        passes += _evaluated_rows(n_j, smoothing, mesh) - cached // size * size
        cached = n_j
    novel.append(result)
  return SequentialReplay(list(known), novel, passes)
