"""The certify job: a dataset's inputs through the OVC pipeline, into Cohen TSVs.

Shared by `experiments.certify` (which runs it), `experiments.paper` (which
runs it per backbone and noise space) and `experiments.calibrate_mvn` (which
reads what it left). The method itself is `ovc_jax.ovc`; this module turns a
config into its arguments and its results into files:

  WORKDIR/tsv/<method>/sigma_<s>/<prompt>.tsv   Cohen's columns and more
  WORKDIR/summary.json                          computed from the TSVs
  WORKDIR/caches/sigma_<s>/<idx>/<kind>/        the input's OVC caches

ovc mode: for each input and sigma, certify every known prompt (one encoder
pass for all of them, which fills the input's caches), then every novel prompt
by each of the four methods, each timed from its cache read to its result.
single mode: one prompt, one method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.common import curves
from experiments.common import distributed_record
from experiments.common import sequential_job
from experiments.configs import certify as certify_configs
from ovc_jax import cache_codec
from ovc_jax import caches
from ovc_jax import clipure
from ovc_jax import datasets
from ovc_jax import ovc
from ovc_jax import preprocessing
from ovc_jax import prompts as prompt_lists
from ovc_jax import results
from ovc_jax import sampler
from ovc_jax import zeroshot
from ovc_jax.certificates import Certificate, SmoothingParams
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.certifiers.mvn_ovc import APPROXIMATE_NOTE, MVNParams
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import ConfigError, DataError
from ovc_jax.models import load_clip

METHODS = ovc.METHODS
METHOD_NAMES = {**{name: c.label for name, c in ovc.NOVEL_CERTIFIERS.items()},
                **sequential_job.SEQUENTIAL_METHODS}
EXTRA_COLUMNS = ("method", "prompt", "pA_lower", "approximate", "irs_applied",
                 "known_prompt", "zeta", "confidence")
# Cached-OVC's tables end with these: the samples (selection and estimation)
# whose class a compressed cache's bounds left in doubt, and how many of them
# the encoder recomputed (both 0 for a float32 cache).
CACHED_COLUMNS = ("ambiguous", "regenerated")
MODEL_NOTE = ("the project's toy-world CLIP, trained offline on procedurally "
              "generated shapes: a demo model, not a real CLIP")


# The config fields of OVCParams, and values each is valid with whatever the
# others are: substituting one of them shows which field a library
# ConfigError is about, so that the message can name its flag.
_PARAM_FIELDS = {"n0": 100, "n": 10**9, "alpha": 0.001, "batch_size": 1000,
                 "irs.n_p": 1, "irs.gamma": 0.01, "irs.alpha_zeta": 0.001,
                 "mvn.delta": 0.025, "mvn.batch_size": 1000,
                 "cached_batch_size": 1000, "cached_ambiguous": "regenerate"}


def _param_values(config) -> dict[str, Any]:
  return {name: (config[name.split(".")[0]][name.split(".")[1]] if "." in name
                 else config[name]) for name in _PARAM_FIELDS}


def _make_params(v: dict[str, Any], sigma: float) -> ovc.OVCParams:
  return ovc.OVCParams(
      smoothing=SmoothingParams(sigma=float(sigma), n0=v["n0"], n=v["n"],
                                alpha=v["alpha"], batch_size=v["batch_size"]),
      irs=IRSParams(n_p=v["irs.n_p"], gamma=v["irs.gamma"],
                    alpha_zeta=v["irs.alpha_zeta"]),
      mvn=MVNParams(delta=v["mvn.delta"], batch_size=v["mvn.batch_size"]),
      cached_batch_size=v["cached_batch_size"],
      cached_ambiguous=v["cached_ambiguous"])


def ovc_params(config, sigma: float) -> ovc.OVCParams:
  """The library's parameter bundle for one sigma of a certify config.

  Raises:
    ConfigError: the library's message, plus the flag(s) to change
      (`--config.irs.n_p`, ...).
  """
  values = _param_values(config)
  try:
    return _make_params(values, sigma)
  except ConfigError as e:
    culprits = []
    for name, safe in _PARAM_FIELDS.items():
      try:
        _make_params({**values, name: safe}, sigma)
      except ConfigError:
        continue
      culprits.append(f"--config.{name}")
    if not culprits:
      raise
    raise ConfigError(f"{e}; set {' or '.join(culprits)}") from e


def validate(config) -> None:
  """Every check on the config that can fail, before anything is written."""
  common.check_number_list(config.sigmas, "sigmas")
  for sigma in config.sigmas:
    ovc_params(config, sigma)
  try:
    preprocessing.check_noise_space(config.noise_space)
  except ConfigError as e:
    raise ConfigError(f"{e}; set --config.noise_space") from e
  if config.cache_format not in cache_codec.FORMATS:
    raise ConfigError(f"--config.cache_format must be one of "
                      f"{' | '.join(cache_codec.FORMATS)}; got "
                      f"{config.cache_format!r}")
  if config.mode not in ("ovc", "single", "sequential"):
    raise ConfigError(f"--config.mode must be 'ovc', 'single' or "
                      f"'sequential'; got {config.mode!r}")
  if config.mode == "sequential":
    for sigma in config.sigmas:
      sequential_job.seq_params(config, sigma)
    sequential_job.replays(config)
    if config.cache_format != "float32":
      raise ConfigError(
          "--config.cache_format sets the format of the caches ovc and "
          "single modes write; sequential mode writes none (its growing cache "
          "stays in memory): leave it float32")
  if config.method not in METHODS:
    raise ConfigError(f"--config.method must be one of {METHODS}; got "
                      f"{config.method!r}")
  if config.mode == "single" and config.method == "irs":
    raise ConfigError("--config.method=irs in single mode needs the known "
                      "prompts' caches of an ovc run: pass --config.mode=ovc "
                      "instead (it certifies every method)")
  if config.skip < 1:
    raise ConfigError(f"--config.skip must be >= 1; got {config.skip}")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"--config.dtype must be float32 or bfloat16; got "
                      f"{config.dtype!r}")
  if config.purify not in PURIFICATIONS:
    raise ConfigError(
        f"--config.purify must be '' (plain CLIP only) or 'clipure_cos' "
        f"(CLIPure-Cos beside plain CLIP; variant clipure); got "
        f"{config.purify!r}")
  if config.get("download", False) and config.dataset != "cifar10":
    raise ConfigError(f"--config.download applies to cifar10 only; dataset "
                      f"{config.dataset!r} is read from --config.data_dir as "
                      "it is")


def result_config(config) -> dict[str, Any]:
  """The config as a workdir records it: the fields results depend on.

  cache_format and cached_ambiguous are recorded only in "conservative"
  mode: in "regenerate" mode every certificate is standard RS's whatever
  the caches' format, so such a run may be resumed with another format (and
  the default run's record is what it was before compressed caches).
  """
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  d.pop(common.WEIGHTS_KEY, None)
  for name in certify_configs.NON_RESULT_FIELDS:
    d.pop(name, None)
  if d.get("cached_ambiguous", "regenerate") == "regenerate":
    for name in certify_configs.CONSERVATIVE_ONLY_FIELDS:
      d.pop(name, None)
  return d


def config_from_workdir(workdir: str):
  """The certify config a workdir's config.json records (for calibration)."""
  import json  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{workdir} is not a certify workdir (no config.json)")
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is corrupted: {e}") from e
  if not isinstance(recorded, dict) or "sigmas" not in recorded:
    raise ConfigError(f"{path} is not a certify run's config")
  recorded.pop(common.WEIGHTS_KEY, None)
  config = certify_configs.get_config()
  for name in (certify_configs.NON_RESULT_FIELDS
               + certify_configs.CONSERVATIVE_ONLY_FIELDS):
    recorded.setdefault(name, config[name])
  return config_dict.ConfigDict(recorded)


def weights_hashes(loaded) -> dict[str, str]:
  """Content hashes of a loaded model's weights, as a workdir records them."""
  out = {"fingerprint": loaded.fingerprint}
  sha = getattr(loaded, "weights_sha256", None)
  if sha:
    out["sha256"] = sha
  return out


def model_title(setup) -> str:
  """The model as figures name it."""
  return curves.model_label(setup.config.backbone)


def journal(setup) -> common.ResumableRun:
  """The workdir's ResumableRun, checked against the config and the weights."""
  return common.ResumableRun(setup.workdir, result_config(setup.config),
                             weights=weights_hashes(setup.loaded))


def slug(template: str) -> str:
  text = re.sub(r"[^a-z0-9]+", "-", template.replace("{}", "X").lower())
  return text.strip("-")[:48] or "prompt"


@dataclasses.dataclass
class Prompt:
  """A prompt template, its name in file paths and its class matrix [C, d]."""

  template: str
  name: str
  role: str  # "known", "novel" or "single"
  class_embeddings: jax.Array


class ModelId(NamedTuple):
  """What a cache's provenance records of the model (see caches.Provenance)."""

  name: str
  fingerprint: str
  preprocess: Any


@dataclasses.dataclass(frozen=True)
class BaseClassifier:
  """One image-side base classifier the job certifies, with its params.

  Attributes:
    name: "" for plain zero-shot CLIP (its TSVs and caches at the usual
      paths), else a subfolder name ("clipure_cos").
    label: how tables and figures name it.
    classifier: the EmbeddingClassifier.
    encoder_params: its encoder's params.
    model: what its caches' provenance records.
  """

  name: str
  label: str
  classifier: EmbeddingClassifier
  encoder_params: Any
  model: ModelId


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  cache_dir: str
  loaded: Any
  classifier: EmbeddingClassifier
  base_classifiers: list[BaseClassifier]
  dataset: Any
  indices: list[int]
  known: list[Prompt]
  novel: list[Prompt]
  single: Prompt | None
  is_toy: bool

  @property
  def num_classes(self) -> int:
    return len(self.dataset.class_names)

  def known_stack(self) -> jax.Array:
    return jnp.stack([p.class_embeddings for p in self.known])

  def base(self, name: str) -> BaseClassifier:
    return next(b for b in self.base_classifiers if b.name == name)


PURIFICATIONS = ("", "clipure_cos")


def base_classifiers(config, loaded, classifier: EmbeddingClassifier,
                     templates: list[str]) -> list[BaseClassifier]:
  """Plain CLIP, and CLIPure-Cos beside it when --config.purify asks for it
  (the same inputs and keys, so the two are compared sample for sample)."""
  plain = BaseClassifier("", "CLIP", classifier, loaded.params,
                         ModelId(loaded.name, loaded.fingerprint,
                                 loaded.preprocess))
  if not config.purify:
    return [plain]
  cp = config.clipure
  with _flag("clipure.steps", "clipure.step_size"):
    clipure.check_purification_args(steps=cp.steps, step_size=cp.step_size)
  if cp.blank not in ("templates", "single"):
    raise ConfigError("--config.clipure.blank must be 'templates' (the "
                      "dataset's templates with an empty class name, as the "
                      "official code) or 'single' (\"a photo of a .\", as the "
                      f"paper); got {cp.blank!r}")
  with _flag("purify"):
    blank = clipure.blank_embedding(
        loaded, templates if cp.blank == "templates"
        else [clipure.SINGLE_BLANK_TEMPLATE])
  purified = EmbeddingClassifier(
      clipure.PurifiedEncoder(loaded.model.embed_images, steps=cp.steps,
                              step_size=float(cp.step_size)),
      normalize=True, preprocess=classifier.preprocess)
  name = (f"{loaded.name}+clipure_cos(steps={cp.steps},"
          f"step_size={float(cp.step_size):g},blank={cp.blank})")
  return [plain, BaseClassifier(
      "clipure_cos", "CLIPure-Cos", purified,
      clipure.purified_encoder_params(loaded.params, blank),
      ModelId(name, loaded.fingerprint, loaded.preprocess))]


def load_data(config):
  """The config's dataset; cifar10 is downloaded first with --config.download."""
  kwargs = {"download": True} if config.get("download", False) else {}
  try:
    return datasets.load_dataset(config.dataset, config.data_dir or None,
                                 **kwargs)
  except DataError as e:
    # The library's message speaks to Python callers (download=True).
    text = str(e)
    if (config.dataset != "cifar10" or config.get("download", False)
        or "--config.download" in text):
      raise
    if "pass download=True" in text:
      text = text.replace("pass download=True",
                          "pass --config.download=True to fetch it there")
    else:
      text += "; --config.download=True fetches it there"
    raise DataError(text) from e


@contextlib.contextmanager
def _flag(*names: str):
  """Adds the flag(s) to set to a library ConfigError that names none."""
  try:
    yield
  except ConfigError as e:
    if "--config." in str(e):
      raise
    # The most specific field the message names, else all of them.
    named = sorted((n for n in names if n in str(e)), key=len, reverse=True)
    flags = (f"--config.{named[0]}" if named else
             " or ".join(f"--config.{n}" for n in names))
    raise ConfigError(f"{e}; set {flags}") from e


def load_model_and_data(config):
  """(loaded CLIP, dataset, class names) of any experiment config with the
  fields backbone, dtype, tokenizer, dataset, data_dir and classes."""
  with _flag("backbone"):
    loaded = load_clip(config.backbone, dtype=config.dtype,
                       tokenizer_path=config.tokenizer or None)
  with _flag("dataset", "data_dir"):
    dataset = load_data(config)
  with _flag("classes"):
    class_names = (prompt_lists.load_class_names(config.classes)
                   if config.classes else list(dataset.class_names))
  if len(class_names) != len(dataset.class_names):
    raise ConfigError(
        f"--config.classes gives {len(class_names)} class names, but dataset "
        f"{config.dataset} has {len(dataset.class_names)} classes")
  return loaded, dataset, class_names


def build_setup(config, workdir: str) -> Setup:
  """Loads the model, data and prompts; raises OVCError for bad input."""
  validate(config)
  loaded, dataset, class_names = load_model_and_data(config)
  indices = datasets.subsample_indices(len(dataset), config.skip, config.max)
  if not indices:
    raise ConfigError("no inputs selected: check --config.skip and "
                      "--config.max")
  preprocess = None if config.noise_space == "normalized" else loaded.preprocess
  classifier = EmbeddingClassifier(loaded.model.embed_images, normalize=True,
                                   preprocess=preprocess)

  def make(template, role, i):
    name = f"{role}{i:02d}-{slug(template)}"
    return Prompt(template, name, role,
                  zeroshot.class_embeddings(loaded, template, class_names))

  known, novel, single = [], [], None
  with _flag("templates"):
    templates = (prompt_lists.load_templates(config.templates)
                 if config.templates else
                 prompt_lists.templates_for(config.dataset))
  if config.mode in ("ovc", "sequential"):
    if not 1 <= config.num_novel < len(templates):
      raise ConfigError(f"--config.num_novel must lie in "
                        f"[1, {len(templates) - 1}] for {len(templates)} "
                        f"templates; got {config.num_novel}")
    known_t, novel_t = prompt_lists.split_templates(
        templates, config.num_novel, config.split_seed)
    known = [make(t, "known", i) for i, t in enumerate(known_t)]
    novel = [make(t, "novel", i) for i, t in enumerate(novel_t)]
  else:
    with _flag("prompt"):
      prompt_lists.validate_templates([config.prompt])
    single = make(config.prompt, "single", 0)
  return Setup(config=config, workdir=workdir,
               cache_dir=config.cache_dir or os.path.join(workdir, "caches"),
               loaded=loaded, classifier=classifier,
               base_classifiers=base_classifiers(config, loaded, classifier,
                                                 templates),
               dataset=dataset,
               indices=indices, known=known, novel=novel, single=single,
               is_toy=config.backbone == "toy")


_preprocess = jax.jit(preprocessing.preprocess, static_argnums=1)


def model_input(setup: Setup, image: np.ndarray) -> jax.Array:
  """The array noise is added to: normalised model input, or [0, 1] pixels."""
  image = preprocessing.check_images(image, name="input image")[0]
  if setup.config.noise_space == "pixel":
    return jnp.asarray(image)
  return _preprocess(jnp.asarray(image), setup.loaded.preprocess)


def provenance(setup: Setup, sigma: float, key, image,
               base: str = "") -> caches.Provenance:
  return caches.Provenance.for_input(
      setup.base(base).model, noise_space=setup.config.noise_space,
      smoothing=ovc_params(setup.config, sigma).smoothing, key=key,
      image=image, dtype=setup.config.dtype, num_classes=setup.num_classes)


def input_cache_dir(setup: Setup, sigma: float, idx: int,
                    base: str = "") -> str:
  return os.path.join(setup.cache_dir, base, f"sigma_{sigma:g}", str(idx))


def stored_caches(setup: Setup, sigma: float, idx: int, base: str = "", *,
                  verify: bool = False) -> ovc.StoredCaches:
  """The caches an earlier pass over input `idx` left, checked on each load.

  With `verify`, loading the embeddings also regenerates
  --config.verify_cache_samples of their noise samples with the encoder and
  compares (for caches from an earlier run; a cache this run just wrote is
  not checked again).
  """
  image, _ = setup.dataset[idx]
  key = sampler.input_key(setup.config.seed, idx)
  b = setup.base(base)
  samples = int(setup.config.get("verify_cache_samples", 0)) if verify else 0
  return ovc.StoredCaches(
      input_cache_dir(setup, sigma, idx, base),
      provenance(setup, sigma, key, image, base),
      known_class_embeddings=setup.known_stack() if setup.known else None,
      templates=tuple(p.template for p in setup.known) if setup.known else None,
      verify=ovc.NovelInput(b.classifier, b.encoder_params,
                            model_input(setup, image), key) if samples else None,
      verify_samples=samples)


def tsv_path(setup: Setup, method: str, prompt: Prompt, sigma: float,
             base: str = "") -> str:
  return os.path.join(setup.workdir, "tsv", base, method, f"sigma_{sigma:g}",
                      f"{prompt.name}.tsv")


@dataclasses.dataclass
class Row:
  """One result: a certificate and how it was obtained."""

  method: str
  prompt: Prompt
  sigma: float
  cert: Certificate
  seconds: float
  result: ovc.NovelResult | None = None
  base: str = ""
  # Sequential mode: (draws, stop, encoder_passes), sequential_job.COLUMNS.
  sequential: tuple | None = None

  def path(self, setup: Setup) -> str:
    return tsv_path(setup, self.method, self.prompt, self.sigma, self.base)

  def line(self, idx: int, label: int, alpha: float) -> str:
    irs = self.result.irs if self.result is not None else None
    confidence = (1.0 - alpha if self.result is None else
                  float("nan") if self.result.confidence is None else
                  float(self.result.confidence))
    extra = (self.method, self.prompt.template, float(self.cert.pA_lower),
             self.method == "mvn",
             bool(irs.irs_applied) if irs else False,
             irs.known_index if irs else -1,
             float(irs.zeta) if irs else float("nan"), confidence)
    if self.sequential is not None:
      extra += tuple(self.sequential)
    if self.method == "cached":
      extra += (int(self.cert.ambiguous), int(self.cert.regenerated))
    return results.format_row(idx, label, self.cert.prediction,
                              self.cert.radius, self.seconds, extra)


def certify_novel(setup: Setup, method: str, prompt: Prompt, x, key,
                  sigma: float, idx: int, base: str = "") -> Row:
  """One novel prompt by one method, timed from the cache read to the result.

  In single mode the caches come from an earlier run, so they are verified
  by regenerating a few samples; in ovc mode this run just wrote them.
  """
  source = stored_caches(setup, sigma, idx, base,
                         verify=setup.config.mode == "single")
  b = setup.base(base)
  result, secs = common.timed(lambda: ovc.certify_novel_prompt(
      method, b.classifier, b.encoder_params, x, key, source,
      prompt.class_embeddings, ovc_params(setup.config, sigma)))
  return Row(method, prompt, sigma, result.certificate, secs, result, base)


def certify_known(setup: Setup, prompts: list[Prompt], x, key, sigma: float,
                  idx: int, image, base: str = "") -> list[Row]:
  """Prompts certified together in one pass, which leaves the input's caches."""
  params = ovc_params(setup.config, sigma)
  stack = jnp.stack([p.class_embeddings for p in prompts])
  b = setup.base(base)
  known, seconds = common.timed(lambda: ovc.certify_known_prompts(
      b.classifier, b.encoder_params, x, key, stack, params))
  directory = input_cache_dir(setup, sigma, idx, base)
  try:
    ovc.save_caches(directory, known.caches,
                    provenance(setup, sigma, key, image, base),
                    alpha=setup.config.alpha,
                    templates=[p.template for p in prompts],
                    cache_format=setup.config.cache_format)
  except OSError as e:
    # The input is not done: its caches are written again on the resume, so
    # a partial set (and the folders above it, if empty) goes now.
    common.discard_dir(directory, setup.cache_dir)
    raise common.disk_error(e, directory) from e
  return [Row("standard", p, sigma, cert, seconds, None, base)
          for p, cert in zip(prompts, known.certificates)]


def certify_input(setup: Setup, idx: int) -> list[Row]:
  """Every row of one dataset input, over all sigmas."""
  c = setup.config
  image, _ = setup.dataset[idx]
  x = model_input(setup, image)
  key = sampler.input_key(c.seed, idx)
  rows = []
  for sigma in c.sigmas:
    for base in (b.name for b in setup.base_classifiers):
      if c.mode == "sequential":
        rows += sequential_job.certify_input(setup, sys.modules[__name__],
                                             idx, x, key, sigma, base)
      elif c.mode == "ovc":
        rows += certify_known(setup, setup.known, x, key, sigma, idx, image,
                              base)
        rows += [certify_novel(setup, m, p, x, key, sigma, idx, base)
                 for p in setup.novel for m in METHODS]
      elif c.method == "standard" and c.write_caches:
        # Certified as a one-prompt stack: the same certificate, and the
        # caches for later prompts.
        rows += certify_known(setup, [setup.single], x, key, sigma, idx,
                              image, base)
      else:
        rows.append(certify_novel(setup, c.method, setup.single, x, key,
                                  sigma, idx, base))
  return rows


def table_columns(setup: Setup, method: str) -> tuple[str, ...]:
  """The columns after Cohen's six of one method's tables."""
  return (EXTRA_COLUMNS
          + (sequential_job.COLUMNS if setup.config.mode == "sequential"
             else ())
          + (CACHED_COLUMNS if method == "cached" else ()))


def all_tables(setup: Setup) -> dict[str, str]:
  """{tsv path: header} of every file this run writes."""
  return {tsv_path(setup, method, prompt, sigma, base):
              results.header(table_columns(setup, method))
          for base, _, method, prompt, sigma in _groups(setup)}


def _groups(setup: Setup):
  """(base, role, method, prompt, sigma) of every TSV the run writes."""
  c = setup.config
  for sigma in c.sigmas:
    for base in (b.name for b in setup.base_classifiers):
      if c.mode == "sequential":
        yield from ((base, role, m, p, sigma)
                    for role, m, p in sequential_job.groups(setup))
        continue
      yield from ((base, "known", "standard", p, sigma) for p in setup.known)
      yield from ((base, "novel", m, p, sigma)
                  for p in setup.novel for m in METHODS)
      if setup.single:
        yield base, "single", c.method, setup.single, sigma


def cache_bytes(setup: Setup) -> dict[str, dict[str, int]]:
  """Bytes per input per sigma of each cache kind, read from the first input's."""
  out = {}
  for sigma in setup.config.sigmas:
    entry = {}
    for kind in ovc.CACHE_KINDS:
      path = os.path.join(input_cache_dir(setup, sigma, setup.indices[0]), kind)
      if os.path.isdir(path):
        entry[kind] = sum(os.path.getsize(os.path.join(path, f))
                          for f in os.listdir(path))
    out[f"sigma_{sigma:g}"] = entry
  return out


def summarize_run(setup: Setup) -> dict:
  """The JSON summary, computed from the TSVs as written."""
  c = setup.config
  per_table, methods = {}, {}
  for base, role, method, prompt, sigma in _groups(setup):
    path = tsv_path(setup, method, prompt, sigma, base)
    summary = results.summarize_tsv(path)
    columns = results.read_tsv(path)
    if method == "irs":
      summary["irs_applied_fraction"] = float(np.mean(columns["irs_applied"]))
    if method == "mvn":
      summary["approximate"] = True
    summary["certified_fraction"] = float(np.mean(columns["predict"] >= 0))
    per_table[os.path.relpath(path, setup.workdir)] = summary
    group = methods.setdefault(
        f"{_role(base, role)}/{method}/sigma_{sigma:g}", [])
    group.append((summary, columns))
  aggregate = {}
  for name, entries in methods.items():
    aggregate[name] = {
        "prompts": len(entries),
        "seconds_per_input": float(np.mean([s["seconds_per_input"] for s, _ in entries])),
        "certified_accuracy": {
            r: float(np.mean([s["certified_accuracy"][r] for s, _ in entries]))
            for r in entries[0][0]["certified_accuracy"]},
        "average_certified_radius": float(np.mean(
            [s["average_certified_radius"] for s, _ in entries])),
        "abstention_rate": float(np.mean([s["abstention_rate"] for s, _ in entries])),
        "certified_fraction": float(np.mean(
            [s["certified_fraction"] for s, _ in entries])),
    }
  exactness = {}
  if c.mode == "ovc":
    for sigma in c.sigmas:
      for base in (b.name for b in setup.base_classifiers):
        novel = _role(base, "novel")
        std = aggregate[f"{novel}/standard/sigma_{sigma:g}"]["seconds_per_input"]
        for m in METHODS:
          entry = aggregate[f"{novel}/{m}/sigma_{sigma:g}"]
          entry["speedup_over_standard"] = std / max(entry["seconds_per_input"], 1e-12)
        # Cached-OVC must equal standard RS row for row (prediction and radius).
        same = []
        for p in setup.novel:
          a = results.read_tsv(tsv_path(setup, "standard", p, sigma, base))
          b = results.read_tsv(tsv_path(setup, "cached", p, sigma, base))
          same.append(bool(np.array_equal(a["predict"], b["predict"])
                           and np.array_equal(a["radius"], b["radius"])))
        exactness[os.path.join(base, f"sigma_{sigma:g}")] = all(same)
  extra = {}
  if c.mode == "sequential":
    extra["sequential"] = sequential_job.summarize(setup, sys.modules[__name__])
  return {
      **extra,
      "model": {"name": setup.loaded.name, "fingerprint": setup.loaded.fingerprint,
                "weights": weights_hashes(setup.loaded),
                "note": MODEL_NOTE if setup.is_toy else
                        f"weights loaded from {setup.config.backbone}"},
      "dataset": c.dataset,
      "inputs": len(setup.indices),
      "split": {"known": [p.template for p in setup.known],
                "novel": [p.template for p in setup.novel],
                "split_seed": c.split_seed}
               if c.mode in ("ovc", "sequential") else None,
      "methods": aggregate,
      "tables": per_table,
      "cached_identical_to_standard": exactness,
      "cache_bytes_per_input_per_sigma": cache_bytes(setup),
      "notes": {"mvn": APPROXIMATE_NOTE,
                "time": "seconds per input exclude compilation (a warm-up "
                        "input is certified first and not recorded)"},
  }


def _role(base: str, role: str) -> str:
  """A summary group's role: "novel", or "clipure_cos:novel" for a purified
  base classifier."""
  return f"{base}:{role}" if base else role


def print_report(setup: Setup, summary: dict, stream=sys.stdout) -> None:
  c = setup.config
  w = stream.write
  w(f"\nmodel: {summary['model']['name']} ({summary['model']['note']})\n")
  w(f"dataset: {c.dataset}, {summary['inputs']} inputs, noise in "
    f"{c.noise_space} space, n0={c.n0}, n={c.n}, alpha={c.alpha}\n")
  radii = ["0", "0.25", "0.5", "1"]
  for sigma in c.sigmas:
    w(f"\nsigma = {sigma:g}\n")
    width = max(8, *(len(n.split("/")[0]) for n in summary["methods"]))
    w(f"{'prompts':{width}} {'method':32} " + " ".join(f"r>={r:5}" for r in radii)
      + f" {'s/input':>9} {'speedup':>8}\n")
    for name, entry in summary["methods"].items():
      role, method, s = name.split("/")
      if s != f"sigma_{sigma:g}":
        continue
      acc = " ".join(f"{entry['certified_accuracy'].get(r, 0.0):7.3f}" for r in radii)
      speed = entry.get("speedup_over_standard")
      speed = f"{speed:7.1f}x" if speed is not None else " " * 8
      label = METHOD_NAMES.get(method) or sequential_job.method_label(method)
      w(f"{role:{width}} {label:32} {acc} "
        f"{entry['seconds_per_input']:9.4f} {speed}\n")
  if c.mode == "ovc":
    w(f"\nCached-OVC identical to standard RS: "
      f"{summary['cached_identical_to_standard']}\n")
    w(f"{APPROXIMATE_NOTE} (margin delta = {c.mvn.delta})\n")
  for name, e in summary.get("sequential", {}).items():
    w(f"\nsequential ({name}): max_radius {e['max_radius']:g}, precision "
      f"{e.get('precision')}, checkpoints "
      f"{e['checkpoints']}; mean draws per known prompt "
      f"{e['mean_draws_per_known_prompt']:,.0f}; encoder passes "
      f"{e['encoder_passes_total']:,} over {e['inputs']} inputs")
    if "passes_ratio" in e:
      w(f" against {e['fixed_encoder_passes_total']:,} at fixed n = "
        f"{e['fixed_n']:,} ({e['passes_ratio']:.1f}x fewer); largest gap in "
        f"certified accuracy up to max_radius: known prompts "
        f"{e.get('known_largest_gap_pp', float('nan')):.2f} pp, novel "
        f"{e.get('novel_largest_gap_pp', float('nan')):.2f} pp; largest "
        f"radius lost: known {e.get('known_radius_lost_max', float('nan')):.3f}"
        f", novel {e.get('novel_radius_lost_max', float('nan')):.3f}")
    w(f"\nstops of the known prompts: {e['stops']}\n")
    for tag, r in e.get("replays", {}).items():
      w(f"  replayed {tag:6} passes {r['encoder_passes_total']:>9,} "
        f"({r['passes_ratio']:5.1f}x fewer), mean draws "
        f"{r['mean_draws_per_known_prompt']:>7,.0f}, largest gap known "
        f"{r.get('known_largest_gap_pp', float('nan')):.2f} pp / novel "
        f"{r.get('novel_largest_gap_pp', float('nan')):.2f} pp, radius lost "
        f"{r.get('known_radius_lost_max', float('nan')):.3f} / "
        f"{r.get('novel_radius_lost_max', float('nan')):.3f}\n")
  w("s/input: seconds to certify one input for one prompt by that method "
    "(mean over the prompts), compilation excluded\n")
  w(f"results: {setup.workdir}/summary.json, {setup.workdir}/tsv/ and "
    f"{summary['figure']}\n")


def progress_note(setup: Setup) -> str:
  """What one item of the progress line's s/input counts."""
  c = setup.config
  sigmas = f"{len(c.sigmas)} sigma{'s' if len(c.sigmas) > 1 else ''}"
  if c.mode == "ovc":
    return (f"all {len(setup.known)} known and {len(setup.novel)} novel prompts"
            f" x {len(METHODS)} methods of one input, {sigmas}")
  if c.mode == "sequential":
    return (f"all {len(setup.known)} known and {len(setup.novel)} novel prompts"
            f" of one input, sequential"
            + (" and fixed-n" if c.sequential.compare_fixed else "")
            + f", {sigmas}")
  return f"one prompt, {c.method}, {sigmas}"


def figure_title(setup: Setup) -> str:
  c = setup.config
  return (f"Certified accuracy: {model_title(setup)} on {c.dataset}, "
          f"n={c.n:,}, α={c.alpha:g}")


def run(config, workdir: str, stream=sys.stderr) -> tuple[Setup, dict]:
  """Certifies the configured inputs (resuming), then summarises the run.

  One process at a time: the workdir (and a --config.cache_dir outside it)
  is locked for the whole run.
  """
  common.check_workdir_path(workdir)
  if config.cache_dir:
    common.check_workdir_path(config.cache_dir, "--config.cache_dir")
  # A workdir of a multi-process run (experiments/common/distributed.py) is
  # resumed by its processes, not by one.
  distributed_record.check_single_process(workdir)
  setup = build_setup(config, workdir)
  with contextlib.ExitStack() as held:
    held.enter_context(common.workdir_lock(workdir))
    if not _inside(setup.cache_dir, workdir):
      held.enter_context(common.workdir_lock(setup.cache_dir,
                                             flag="--config.cache_dir"))
    return _run_locked(setup, held.enter_context(journal(setup)), stream)


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder + os.sep)


def _run_locked(setup: Setup, journal_: common.ResumableRun,
                stream) -> tuple[Setup, dict]:
  config, workdir = setup.config, setup.workdir
  if setup.is_toy:
    stream.write(f"note: {MODEL_NOTE}\n")
  tables = all_tables(setup)
  journal_.prepare(tables)
  todo = journal_.remaining(setup.indices)
  if not todo:
    stream.write(
        f"note: nothing was recomputed: all {len(setup.indices)} inputs of "
        f"this configuration are done in {workdir} (done.txt); the results "
        "below are the stored ones. Pass another --workdir to compute again.\n")
  # Compile every shape on the first input to do before timing anything (not
  # on a done one: a failed cache write there would remove finished caches).
  if todo:
    stream.write("warming up (compiling) on the first input...\n")
    certify_input(setup, todo[0])
  progress = common.Progress(len(setup.indices), "inputs", stream=stream,
                             already_done=len(setup.indices) - len(todo),
                             per=progress_note(setup))
  for idx in todo:
    rows = certify_input(setup, idx)
    label = int(setup.dataset.labels[idx])
    journal_.commit(idx, {
        r.path(setup): (tables[r.path(setup)],
                        r.line(idx, label, config.alpha)) for r in rows})
    progress.update(note=f"input {idx}")
  summary = summarize_run(setup)
  summary["config"] = config.to_dict()
  summary["recomputed_inputs"] = len(todo)
  draw_figures(setup, summary)
  common.write_json(os.path.join(workdir, "summary.json"), summary)
  return setup, summary


def draw_figures(setup: Setup, summary: dict) -> None:
  """Draws every figure of a finished run and names each in `summary` (a
  one-process run and a merged multi-process run alike)."""
  # The curves of every (method, sigma, known/novel) group; the table is
  # print_report's, so the curves' copy of it is dropped.
  summary["figure"] = os.path.join(setup.workdir, "certified_accuracy.png")
  curves.draw(curves.workdir_groups(setup.workdir), summary["figure"],
              x_label=curves.axis_label(setup.workdir), stream=io.StringIO(),
              title=figure_title(setup))
  if len(setup.base_classifiers) > 1:
    summary["comparison_figure"] = draw_base_comparison(setup)
  if setup.config.mode == "sequential":
    summary["sequential_figure"] = sequential_job.draw(
        setup, sys.modules[__name__], summary["sequential"])


def draw_base_comparison(setup: Setup) -> str:
  """Plain CLIP against CLIPure-Cos (same inputs, same keys), one panel per
  sigma: standard RS on the known prompts (solid; in single mode, the one
  prompt by its method) and Cached-OVC from each classifier's own caches on
  the novel prompts (dashed)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  c = setup.config
  top = 0.0
  panels = []
  for sigma in c.sigmas:
    lines = []
    for base, colour in zip((b.name for b in setup.base_classifiers),
                            ("tab:blue", "tab:orange")):
      label = setup.base(base).label
      # Single mode has one table per base classifier: its own method's.
      first = (("known", "standard", "-", setup.known,
                "standard RS, known prompts") if setup.known else
               ("single", c.method, "-", [setup.single],
                f"{METHOD_NAMES[c.method]}, {setup.single.template!r}"))
      for role, method, style, prompts, name in (
          first, ("novel", "cached", "--", setup.novel,
                  "Cached-OVC, novel prompts")):
        if not prompts or (c.mode != "ovc" and role == "novel"):
          continue
        cols = [curves.read_results(tsv_path(setup, method, p, sigma, base))
                for p in prompts]
        top = max([top] + [float(x["radius"].max()) for x in cols])
        lines.append((f"{label}: {name}", cols, colour, style))
    panels.append((sigma, lines))
  grid = np.linspace(0.0, max(top, 0.5) * 1.05, 200)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8),
                           dpi=120, squeeze=False, sharey=True)
  for ax, (sigma, lines) in zip(axes[0], panels):
    for label, cols, colour, style in lines:
      acc = np.mean([curves.curve(x, grid) for x in cols], axis=0)
      ax.plot(grid, acc, style, color=colour, label=label, linewidth=1.6)
    ax.set_title(f"σ = {sigma:g}", fontsize=9)
    ax.set_xlabel(curves.axis_label(setup.workdir), fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("certified accuracy")
  axes[0][-1].legend(fontsize=7, loc="upper right")
  fig.suptitle(figure_title(setup).replace("Certified accuracy",
                                           "CLIP and CLIPure-Cos"), fontsize=10)
  fig.tight_layout()
  out = os.path.join(setup.workdir, "clip_vs_clipure.png")
  common.save_figure(fig, out)
  return out
