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
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from ovc_jax import caches as cache_io
from ovc_jax import certificates
from ovc_jax import sampler
from ovc_jax.certificates import Certificate, SmoothingParams
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certifiers import modified_irs
from ovc_jax.certifiers import mvn_ovc
from ovc_jax.certifiers import standard
from ovc_jax.certifiers.cached_ovc import EmbeddingDraws
from ovc_jax.certifiers.modified_irs import IRSParams, IRSResult, KnownPrompts
from ovc_jax.certifiers.mvn_ovc import GaussianFit, MVNParams
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import ConfigError

DEFAULT_CACHED_BATCH_SIZE = 10_000


@dataclasses.dataclass(frozen=True)
class OVCParams:
  """Every number of OVC for one sigma.

  Attributes:
    smoothing: CERTIFY's sigma, n0, n, alpha and encoder batch size.
    irs: Modified-IRS's n_p, gamma and alpha_zeta.
    mvn: MVN-OVC's margin and latent batch size.
    cached_batch_size: cached embeddings counted at once by Cached-OVC.
  """

  smoothing: SmoothingParams
  irs: IRSParams
  mvn: MVNParams = MVNParams()
  cached_batch_size: int = DEFAULT_CACHED_BATCH_SIZE

  def __post_init__(self):
    self.irs.check(self.smoothing)
    if (not isinstance(self.cached_batch_size, int)
        or self.cached_batch_size < 1):
      raise ConfigError("cached_batch_size must be an integer >= 1; got "
                        f"{self.cached_batch_size}")


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
                templates: list[str] | None = None) -> dict[str, int]:
  """Writes the three caches under `directory`/<kind>; returns their bytes."""
  return {
      "embeddings": cache_io.save_embeddings(
          os.path.join(directory, "embeddings"), ovc_caches.embedding_draws,
          provenance),
      "gaussian": cache_io.save_gaussian(
          os.path.join(directory, "gaussian"), ovc_caches.gaussian_fit,
          provenance),
      "known": cache_io.save_known(
          os.path.join(directory, "known"), ovc_caches.known_prompts,
          provenance, templates=templates, alpha=alpha),
  }


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
  """

  directory: str
  provenance: cache_io.Provenance
  known_class_embeddings: Any = None
  templates: tuple[str, ...] | None = None

  def load_known(self) -> KnownPrompts:
    if self.known_class_embeddings is None:
      raise ConfigError("Modified-IRS needs the known prompts' class matrices")
    return cache_io.load_known(
        os.path.join(self.directory, "known"), self.provenance,
        self.known_class_embeddings,
        templates=None if self.templates is None else list(self.templates))

  def load_embeddings(self) -> EmbeddingDraws:
    return cache_io.load_embeddings(os.path.join(self.directory, "embeddings"),
                                    self.provenance)

  def load_gaussian(self) -> GaussianFit:
    return cache_io.load_gaussian(os.path.join(self.directory, "gaussian"),
                                  self.provenance)


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
  known_class_embeddings = jnp.asarray(known_class_embeddings)
  if known_class_embeddings.ndim != 3:
    raise ConfigError("known prompts must be stacked as [P, C, d]; got shape "
                      f"{known_class_embeddings.shape}")
  smoothing = params.smoothing
  model_params = classifier.params(encoder_params, known_class_embeddings)
  draws = sampler.sample_certification_draws(
      classifier, model_params, sampler.check_input(x), key,
      sigma=smoothing.sigma,
      num_classes=classifier.num_classes(model_params), n0=smoothing.n0,
      n=smoothing.n, batch_size=smoothing.batch_size,
      outputs=("counts", "predictions", "embeddings"), mesh=mesh)
  certs = certificates.certificates_from_counts(
      draws.selection["counts"], draws.estimation["counts"],
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


class NovelInput(NamedTuple):
  """The input a novel prompt is certified on, with the classifier's image side."""

  classifier: EmbeddingClassifier
  encoder_params: Any
  x: jax.Array
  key: jax.Array


def _standard(inp: NovelInput, _: CacheSource, class_embeddings,
              params: OVCParams) -> NovelResult:
  cert = standard.certify(
      inp.classifier, inp.classifier.params(inp.encoder_params,
                                            class_embeddings),
      inp.x, inp.key, params.smoothing)
  return NovelResult(cert, "standard", False, 1.0 - params.smoothing.alpha)


def _irs(inp: NovelInput, source: CacheSource, class_embeddings,
         params: OVCParams) -> NovelResult:
  result = modified_irs.certify_novel(
      inp.classifier, inp.classifier.params(inp.encoder_params,
                                            class_embeddings),
      inp.x, inp.key, source.load_known(), params.smoothing, params.irs)
  return NovelResult(result.certificate, "irs", False, result.confidence,
                     result)


def _cached(inp: NovelInput, source: CacheSource, class_embeddings,
            params: OVCParams) -> NovelResult:
  del inp  # no encoder pass: that is the point
  cert = cached_ovc.certify_cached(
      source.load_embeddings(), class_embeddings, sigma=params.smoothing.sigma,
      alpha=params.smoothing.alpha, batch_size=params.cached_batch_size)
  return NovelResult(cert, "cached", False, 1.0 - params.smoothing.alpha)


def _mvn(inp: NovelInput, source: CacheSource, class_embeddings,
         params: OVCParams) -> NovelResult:
  cert = mvn_ovc.certify_mvn(source.load_gaussian(), class_embeddings, inp.key,
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
