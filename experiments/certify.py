r"""Certify CLIP zero-shot classifiers with standard RS and the three OVC methods.

  python -m experiments.certify                      # embedded default, no flags
  python -m experiments.certify --config=experiments/configs/certify.py:cifar10,vit_b32,paper \
      --workdir=/tmp/cifar10_vit_b32

ovc mode (the default): for each input and sigma, certify every known prompt
(one encoder pass for all of them, which also fills the input's caches), then
certify every novel prompt four ways: standard RS, Modified-IRS, Cached-OVC
and MVN-OVC (approximate), each timed in this run.
single mode: one prompt, one method.

Writes WORKDIR/tsv/<method>/sigma_<s>/<prompt>.tsv (Cohen's columns and more),
WORKDIR/summary.json, and caches under WORKDIR/caches. Killed and restarted
with the same flags, it resumes and finishes with the same rows.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import analyze
from experiments import common
from ovc_jax import caches
from ovc_jax import datasets
from ovc_jax import preprocessing
from ovc_jax import prompts as prompt_lists
from ovc_jax import results
from ovc_jax import sampler
from ovc_jax import zeroshot
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certifiers import modified_irs
from ovc_jax.certifiers import mvn_ovc
from ovc_jax.certifiers import standard
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import CacheError, ConfigError
from ovc_jax.models import load_clip

_FLAGS = {}


def define_flags() -> None:
  """The entry point's flags; defined only when this module is the program,
  so that other experiments can import its functions."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "certify.py"),
      "Certify config file (with :variants).", lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", os.path.join("workdirs", "certify"),
      "Where results, caches and the run's config go.")

METHODS = ("standard", "irs", "cached", "mvn")
METHOD_NAMES = {"standard": "standard RS", "irs": "Modified-IRS",
                "cached": "Cached-OVC", "mvn": "MVN-OVC (approximate)"}
EXTRA_COLUMNS = ("method", "prompt", "pA_lower", "approximate", "irs_applied",
                 "known_prompt", "zeta", "confidence")


def validate(config) -> None:
  """Every check on the config that can fail, before anything is written."""
  if not config.sigmas:
    raise ConfigError("sigmas is empty")
  for sigma in config.sigmas:
    sampler.check_sampler_args(num_samples=1, sigma=float(sigma),
                               batch_size=config.batch_size)
  standard.check_certify_args(sigma=float(config.sigmas[0]), n0=config.n0,
                              n=config.n, alpha=config.alpha,
                              batch_size=config.batch_size)
  preprocessing.check_noise_space(config.noise_space)
  if config.mode not in ("ovc", "single"):
    raise ConfigError(f"mode must be 'ovc' or 'single'; got {config.mode!r}")
  if config.method not in METHODS:
    raise ConfigError(f"method must be one of {METHODS}; got {config.method!r}")
  if config.skip < 1:
    raise ConfigError(f"skip must be >= 1; got {config.skip}")
  modified_irs.check_irs_args(n=config.n, n_p=config.irs.n_p,
                              gamma=config.irs.gamma,
                              alpha_zeta=config.irs.alpha_zeta)
  mvn_ovc.check_margin(config.mvn.delta)
  if config.mvn.batch_size < 1 or config.cached_batch_size < 1:
    raise ConfigError("batch sizes must be >= 1")
  if config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype must be float32 or bfloat16; got {config.dtype!r}")


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


@dataclasses.dataclass
class Setup:
  config: Any
  workdir: str
  cache_dir: str
  loaded: Any
  classifier: EmbeddingClassifier
  dataset: Any
  indices: list[int]
  known: list[Prompt]
  novel: list[Prompt]
  single: Prompt | None
  is_toy: bool


def build_setup(config, workdir: str) -> Setup:
  """Loads the model, data and prompts; raises OVCError for bad input."""
  validate(config)
  loaded = load_clip(config.backbone, dtype=config.dtype,
                     tokenizer_path=config.tokenizer or None)
  dataset = datasets.load_dataset(config.dataset, config.data_dir or None)
  class_names = (prompt_lists.load_class_names(config.classes)
                 if config.classes else list(dataset.class_names))
  if len(class_names) != len(dataset.class_names):
    raise ConfigError(
        f"{len(class_names)} class names given, but dataset {config.dataset} "
        f"has {len(dataset.class_names)} classes")
  indices = datasets.subsample_indices(len(dataset), config.skip, config.max)
  if not indices:
    raise ConfigError("no inputs selected: check skip and max")
  preprocess = None if config.noise_space == "normalized" else loaded.preprocess
  classifier = EmbeddingClassifier(loaded.model.embed_images, normalize=True,
                                   preprocess=preprocess)

  def make(template, role, i):
    name = f"{role}{i:02d}-{slug(template)}"
    return Prompt(template, name, role,
                  zeroshot.class_embeddings(loaded, template, class_names))

  known, novel, single = [], [], None
  if config.mode == "ovc":
    templates = (prompt_lists.load_templates(config.templates)
                 if config.templates else prompt_lists.templates_for(config.dataset))
    if not 1 <= config.num_novel < len(templates):
      raise ConfigError(f"num_novel must lie in [1, {len(templates) - 1}] for "
                        f"{len(templates)} templates; got {config.num_novel}")
    known_t, novel_t = prompt_lists.split_templates(
        templates, config.num_novel, config.split_seed)
    known = [make(t, "known", i) for i, t in enumerate(known_t)]
    novel = [make(t, "novel", i) for i, t in enumerate(novel_t)]
  else:
    prompt_lists.validate_templates([config.prompt])
    single = make(config.prompt, "single", 0)
  return Setup(config=config, workdir=workdir,
               cache_dir=config.cache_dir or os.path.join(workdir, "caches"),
               loaded=loaded, classifier=classifier, dataset=dataset,
               indices=indices, known=known, novel=novel, single=single,
               is_toy=config.backbone == "toy")


def model_input(setup: Setup, image: np.ndarray) -> jax.Array:
  """The array noise is added to: normalised model input, or [0, 1] pixels."""
  image = preprocessing.check_images(image, name="input image")[0]
  if setup.config.noise_space == "pixel":
    return jnp.asarray(image)
  return jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(image), setup.loaded.preprocess)


def provenance(setup: Setup, sigma: float, key, image) -> caches.Provenance:
  c = setup.config
  return caches.Provenance(
      model=setup.loaded.name, weights=setup.loaded.fingerprint,
      preprocess=setup.loaded.preprocess.to_dict(), noise_space=c.noise_space,
      sigma=float(sigma), n0=c.n0, n=c.n, key=caches.key_fingerprint(key),
      dtype=c.dtype, input_sha256=caches.array_fingerprint(image),
      num_classes=len(setup.dataset.class_names))


def cache_path(setup: Setup, sigma: float, idx: int, kind: str) -> str:
  return os.path.join(setup.cache_dir, f"sigma_{sigma:g}", str(idx), kind)


def tsv_path(setup: Setup, method: str, prompt: Prompt, sigma: float) -> str:
  return os.path.join(setup.workdir, "tsv", method, f"sigma_{sigma:g}",
                      f"{prompt.name}.tsv")


@dataclasses.dataclass
class Row:
  """One result: a certificate and how it was obtained."""

  method: str
  prompt: Prompt
  sigma: float
  cert: standard.Certificate
  seconds: float
  irs: modified_irs.IRSResult | None = None

  def line(self, idx: int, label: int, alpha: float) -> str:
    irs = self.irs
    extra = (self.method, self.prompt.template, float(self.cert.pA_lower),
             self.method == "mvn",
             bool(irs.irs_applied) if irs else False,
             irs.known_index if irs else -1,
             float(irs.zeta) if irs else float("nan"),
             float(irs.confidence) if irs else (
                 float("nan") if self.method == "mvn" else 1.0 - alpha))
    return results.format_row(idx, label, self.cert.prediction,
                              self.cert.radius, self.seconds, extra)


def _timed(fn):
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start


def _params(setup: Setup, class_embeddings) -> dict:
  return {"encoder": setup.loaded.params, "class_embeddings": class_embeddings}


def _certify_kwargs(setup: Setup, sigma: float) -> dict:
  c = setup.config
  return dict(sigma=float(sigma), num_classes=len(setup.dataset.class_names),
              n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size)


def _load_known(setup: Setup, sigma, idx, prov) -> modified_irs.KnownPrompts:
  cache = caches.load_cache(cache_path(setup, sigma, idx, "known"), "known", prov)
  templates = [p.template for p in setup.known]
  if cache.extra.get("templates") != templates:
    raise CacheError(f"known-prompt cache {cache.directory} was made for other "
                     "known prompts than this run's")
  return modified_irs.KnownPrompts(
      selection_predictions=np.asarray(cache.arrays["selection_predictions"]),
      estimation_predictions=np.asarray(cache.arrays["estimation_predictions"]),
      predictions=np.asarray(cache.arrays["predictions"]),
      p_lower=np.asarray(cache.arrays["p_lower"]),
      class_embeddings=np.stack([np.asarray(p.class_embeddings)
                                 for p in setup.known]))


def _load_embeddings(setup, sigma, idx, prov) -> cached_ovc.EmbeddingDraws:
  cache = caches.load_cache(cache_path(setup, sigma, idx, "embeddings"),
                            "embeddings", prov)
  return cached_ovc.EmbeddingDraws(cache.arrays["selection"],
                                   cache.arrays["estimation"])


def _load_gaussian(setup, sigma, idx, prov) -> mvn_ovc.GaussianFit:
  cache = caches.load_cache(cache_path(setup, sigma, idx, "gaussian"),
                            "gaussian", prov)
  return mvn_ovc.GaussianFit(jnp.asarray(cache.arrays["mean"]),
                             jnp.asarray(cache.arrays["factor"]))


def certify_novel_prompt(setup: Setup, method: str, prompt: Prompt, x, key,
                         sigma: float, idx: int, prov) -> Row:
  """One novel prompt by one method, timed from the cache read to the result."""
  c = setup.config
  kw = _certify_kwargs(setup, sigma)
  params = _params(setup, prompt.class_embeddings)
  if method == "standard":
    cert, secs = _timed(lambda: standard.certify(
        setup.classifier, params, x, key, **kw))
    return Row(method, prompt, sigma, cert, secs)
  if method == "irs":
    result, secs = _timed(lambda: modified_irs.certify_novel(
        setup.classifier, params, x, key, _load_known(setup, sigma, idx, prov),
        n_p=c.irs.n_p, gamma=c.irs.gamma, alpha_zeta=c.irs.alpha_zeta, **kw))
    return Row(method, prompt, sigma, result.certificate, secs, result)
  if method == "cached":
    cert, secs = _timed(lambda: cached_ovc.certify_cached(
        _load_embeddings(setup, sigma, idx, prov), prompt.class_embeddings,
        sigma=float(sigma), alpha=c.alpha, batch_size=c.cached_batch_size))
    return Row(method, prompt, sigma, cert, secs)
  cert, secs = _timed(lambda: mvn_ovc.certify_mvn(
      _load_gaussian(setup, sigma, idx, prov), prompt.class_embeddings, key,
      sigma=float(sigma), n0=c.n0, n=c.n, alpha=c.alpha, delta=c.mvn.delta,
      batch_size=c.mvn.batch_size))
  return Row(method, prompt, sigma, cert, secs)


def certify_known_prompts(setup: Setup, x, key, sigma, idx, prov) -> list[Row]:
  """All known prompts in one pass; fills the input's three caches."""
  c = setup.config
  kw = _certify_kwargs(setup, sigma)
  stack = jnp.stack([p.class_embeddings for p in setup.known])
  start = time.perf_counter()
  draws = standard.sample_certification_draws(
      setup.classifier, _params(setup, stack), x, key,
      sigma=kw["sigma"], num_classes=kw["num_classes"], n0=c.n0, n=c.n,
      batch_size=c.batch_size, outputs=("counts", "predictions", "embeddings"))
  certs = standard.certificates_from_draws(draws, sigma=float(sigma),
                                           alpha=c.alpha)
  seconds = time.perf_counter() - start
  rows = [Row("standard", p, sigma, cert, seconds)
          for p, cert in zip(setup.known, certs)]
  label_dtype = np.int16 if kw["num_classes"] < 2**15 else np.int32
  sel, est = jax.device_get((draws.selection["predictions"],
                             draws.estimation["predictions"][:c.irs.n_p]))
  save_embedding_caches(setup, draws, sigma, idx, prov)
  caches.save_cache(
      cache_path(setup, sigma, idx, "known"), "known", prov,
      {"selection_predictions": np.asarray(sel, label_dtype),
       "estimation_predictions": np.asarray(est, label_dtype),
       "predictions": np.array([r.cert.prediction for r in rows], np.int32),
       "p_lower": np.array([r.cert.pA_lower for r in rows])},
      extra={"templates": [p.template for p in setup.known],
             "n_p": c.irs.n_p, "alpha": c.alpha})
  return rows


def save_embedding_caches(setup: Setup, draws: standard.Draws, sigma, idx,
                          prov) -> None:
  """Cached-OVC's embeddings and MVN-OVC's Gaussian fit of one input."""
  embeddings = cached_ovc.embeddings_from_draws(draws)
  fit = mvn_ovc.fit_gaussian(embeddings.estimation)
  caches.save_cache(cache_path(setup, sigma, idx, "embeddings"), "embeddings",
                    prov, embeddings._asdict())
  caches.save_cache(cache_path(setup, sigma, idx, "gaussian"), "gaussian",
                    prov, {"mean": fit.mean, "factor": fit.factor})


def certify_input(setup: Setup, idx: int) -> list[Row]:
  """Every row of one dataset input, over all sigmas."""
  image, _ = setup.dataset[idx]
  x = model_input(setup, image)
  key = sampler.input_key(setup.config.seed, idx)
  rows = []
  for sigma in setup.config.sigmas:
    prov = provenance(setup, sigma, key, image)
    if setup.config.mode == "ovc":
      rows += certify_known_prompts(setup, x, key, sigma, idx, prov)
      for prompt in setup.novel:
        rows += [certify_novel_prompt(setup, m, prompt, x, key, sigma, idx, prov)
                 for m in METHODS]
    else:
      rows.append(certify_single(setup, x, key, sigma, idx, prov))
  return rows


def certify_single(setup: Setup, x, key, sigma, idx, prov) -> Row:
  """single mode: one prompt by one method (caches from an earlier run)."""
  c = setup.config
  if c.method != "standard":
    if c.method == "irs":
      raise ConfigError("single-mode irs needs the known prompts' caches of an "
                        "ovc run; run mode=ovc instead")
    return certify_novel_prompt(setup, c.method, setup.single, x, key, sigma,
                                idx, prov)
  if not c.write_caches:
    return certify_novel_prompt(setup, "standard", setup.single, x, key, sigma,
                                idx, prov)
  kw = _certify_kwargs(setup, sigma)
  start = time.perf_counter()
  draws = standard.sample_certification_draws(
      setup.classifier, _params(setup, setup.single.class_embeddings), x, key,
      sigma=kw["sigma"], num_classes=kw["num_classes"], n0=c.n0, n=c.n,
      batch_size=c.batch_size, outputs=("counts", "embeddings"))
  cert = standard.certificates_from_draws(draws, sigma=float(sigma),
                                          alpha=c.alpha)[0]
  seconds = time.perf_counter() - start
  save_embedding_caches(setup, draws, sigma, idx, prov)
  return Row("standard", setup.single, sigma, cert, seconds)


def all_tables(setup: Setup) -> dict[str, str]:
  """{tsv path: header} of every file this run writes."""
  header = results.header(EXTRA_COLUMNS)
  tables = {}
  for sigma in setup.config.sigmas:
    if setup.config.mode == "ovc":
      for p in setup.known:
        tables[tsv_path(setup, "standard", p, sigma)] = header
      for p in setup.novel:
        for m in METHODS:
          tables[tsv_path(setup, m, p, sigma)] = header
    else:
      tables[tsv_path(setup, setup.config.method, setup.single, sigma)] = header
  return tables


def cache_bytes(setup: Setup) -> dict[str, dict[str, int]]:
  """Bytes per input per sigma of each cache kind, read from the first input's."""
  out = {}
  for sigma in setup.config.sigmas:
    entry = {}
    for kind in ("embeddings", "gaussian", "known"):
      path = cache_path(setup, sigma, setup.indices[0], kind)
      if os.path.isdir(path):
        entry[kind] = sum(os.path.getsize(os.path.join(path, f))
                          for f in os.listdir(path))
    out[f"sigma_{sigma:g}"] = entry
  return out


def summarize_run(setup: Setup) -> dict:
  """The JSON summary, computed from the TSVs as written."""
  c = setup.config
  per_table, methods = {}, {}
  for sigma in c.sigmas:
    groups = ([("known", "standard", p) for p in setup.known]
              + [("novel", m, p) for p in setup.novel for m in METHODS]
              + ([("single", c.method, setup.single)] if setup.single else []))
    for role, method, prompt in groups:
      path = tsv_path(setup, method, prompt, sigma)
      summary = results.summarize_tsv(path)
      columns = results.read_tsv(path)
      if method == "irs":
        summary["irs_applied_fraction"] = float(np.mean(columns["irs_applied"]))
      if method == "mvn":
        summary["approximate"] = True
      per_table[os.path.relpath(path, setup.workdir)] = summary
      group = methods.setdefault(f"{role}/{method}/sigma_{sigma:g}", [])
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
    }
  exactness = {}
  if c.mode == "ovc":
    for sigma in c.sigmas:
      std = aggregate[f"novel/standard/sigma_{sigma:g}"]["seconds_per_input"]
      for m in METHODS:
        entry = aggregate[f"novel/{m}/sigma_{sigma:g}"]
        entry["speedup_over_standard"] = std / max(entry["seconds_per_input"], 1e-12)
      # Cached-OVC must equal standard RS row for row (prediction and radius).
      same = []
      for p in setup.novel:
        a = results.read_tsv(tsv_path(setup, "standard", p, sigma))
        b = results.read_tsv(tsv_path(setup, "cached", p, sigma))
        same.append(bool(np.array_equal(a["predict"], b["predict"])
                         and np.array_equal(a["radius"], b["radius"])))
      exactness[f"sigma_{sigma:g}"] = all(same)
  return {
      "model": {"name": setup.loaded.name, "fingerprint": setup.loaded.fingerprint,
                "note": MODEL_NOTE if setup.is_toy else
                        f"weights loaded from {setup.config.backbone}"},
      "dataset": c.dataset,
      "inputs": len(setup.indices),
      "split": {"known": [p.template for p in setup.known],
                "novel": [p.template for p in setup.novel],
                "split_seed": c.split_seed} if c.mode == "ovc" else None,
      "methods": aggregate,
      "tables": per_table,
      "cached_identical_to_standard": exactness,
      "cache_bytes_per_input_per_sigma": cache_bytes(setup),
      "notes": {"mvn": mvn_ovc.APPROXIMATE_NOTE,
                "time": "seconds per input exclude compilation (a warm-up "
                        "input is certified first and not recorded)"},
  }


MODEL_NOTE = ("the project's toy-world CLIP, trained offline on procedurally "
              "generated shapes: a demo model, not a real CLIP")


def print_report(setup: Setup, summary: dict, stream=sys.stdout) -> None:
  c = setup.config
  w = stream.write
  w(f"\nmodel: {summary['model']['name']} ({summary['model']['note']})\n")
  w(f"dataset: {c.dataset}, {summary['inputs']} inputs, noise in "
    f"{c.noise_space} space, n0={c.n0}, n={c.n}, alpha={c.alpha}\n")
  radii = ["0", "0.25", "0.5", "1"]
  for sigma in c.sigmas:
    w(f"\nsigma = {sigma:g}\n")
    w(f"{'prompts':8} {'method':24} " + " ".join(f"r>={r:5}" for r in radii)
      + f" {'s/input':>9} {'speedup':>8}\n")
    for name, entry in summary["methods"].items():
      role, method, s = name.split("/")
      if s != f"sigma_{sigma:g}":
        continue
      acc = " ".join(f"{entry['certified_accuracy'].get(r, 0.0):7.3f}" for r in radii)
      speed = entry.get("speedup_over_standard")
      speed = f"{speed:7.1f}x" if speed is not None else " " * 8
      w(f"{role:8} {METHOD_NAMES[method]:24} {acc} "
        f"{entry['seconds_per_input']:9.4f} {speed}\n")
  if c.mode == "ovc":
    w(f"\nCached-OVC identical to standard RS: "
      f"{summary['cached_identical_to_standard']}\n")
    w(f"{mvn_ovc.APPROXIMATE_NOTE} (margin delta = {c.mvn.delta})\n")
  w(f"results: {setup.workdir}/summary.json, {setup.workdir}/tsv/ and "
    f"{summary['figure']}\n")


def run(config, workdir: str, stream=sys.stderr) -> tuple[Setup, dict]:
  """Certifies the configured inputs (resuming), then summarises the run."""
  setup = build_setup(config, workdir)
  if setup.is_toy:
    stream.write(f"note: {MODEL_NOTE}\n")
  journal = common.ResumableRun(workdir, config.to_dict())
  tables = all_tables(setup)
  journal.prepare(tables)
  todo = journal.remaining(setup.indices)
  # Compile every shape on the first input before timing anything.
  if todo:
    stream.write("warming up (compiling) on the first input...\n")
    certify_input(setup, setup.indices[0])
  progress = common.Progress(len(setup.indices), "inputs", stream=stream,
                             already_done=len(setup.indices) - len(todo))
  for idx in todo:
    rows = certify_input(setup, idx)
    label = int(setup.dataset.labels[idx])
    journal.commit(idx, {
        tsv_path(setup, r.method, r.prompt, r.sigma):
            (tables[tsv_path(setup, r.method, r.prompt, r.sigma)],
             r.line(idx, label, config.alpha)) for r in rows})
    progress.update(note=f"input {idx}")
  summary = summarize_run(setup)
  summary["config"] = config.to_dict()
  # The curves of every (method, sigma, known/novel) group; the table is
  # print_report's, so analyze's copy of it is dropped.
  summary["figure"] = os.path.join(workdir, "certified_accuracy.png")
  analyze.draw(analyze.workdir_groups(workdir), summary["figure"],
               x_label=analyze.axis_label(workdir), stream=io.StringIO())
  common.write_json(os.path.join(workdir, "summary.json"), summary)
  return setup, summary


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup, summary = run(_FLAGS["config"].value, _FLAGS["workdir"].value)
  print_report(setup, summary)


if __name__ == "__main__":
  define_flags()
  app.run(main)
