"""The encoder and compile-time section: images/s against transformers' FlaxCLIPModel,
XLA's FLOP count, and the time to the first result in fresh processes with and
without JAX's persistent compilation cache (`--compile_child`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.backbone import Backbone
from experiments.bench.backbone import benchmark_input
from experiments.bench.backbone import load_backbone
from experiments.bench.backbone import unit_rows
from experiments.bench.timing import median_seconds
from experiments.configs import benchmark as benchmark_configs


def encoder_throughput(backbone: Backbone, x: jax.Array, config) -> dict:
  """Images/s of our encoder and XLA's FLOP count per image."""
  batch = jnp.broadcast_to(x, (config.batch_size,) + x.shape)
  embed = jax.jit(backbone.model.embed_images)
  compiled = embed.lower(backbone.params, batch).compile()
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) / config.batch_size
  except (KeyError, TypeError, IndexError):
    pass
  jax.block_until_ready(embed(backbone.params, batch))
  seconds = median_seconds(lambda: embed(backbone.params, batch),
                           config.encoder_repeats)
  return {"encoder_images_per_s": config.batch_size / seconds,
          "flops_per_image": flops,
          "achieved_flops_per_s": (flops * config.batch_size / seconds
                                   if flops else None)}


def peer_throughput(backbone: Backbone, x: jax.Array, config) -> dict:
  """Images/s of transformers' FlaxCLIPModel on the same weights and batch."""
  if backbone.model.config.vision.architecture != "vit":
    return {"peer_encoder_images_per_s": None,
            "peer_note": "transformers has no ResNet CLIP"}
  try:
    from transformers import FlaxCLIPModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"peer_encoder_images_per_s": None,
            "peer_note": "transformers' FlaxCLIPModel needs transformers < 5"}
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    models.save_hf_checkpoint((backbone.model, backbone.params), tmp)
    peer = FlaxCLIPModel(CLIPConfig.from_pretrained(tmp), _do_init=False)
    state = load_file(os.path.join(tmp, "model.safetensors"))
  # transformers' own converter, given the parameter shapes only: its
  # from_pretrained would first initialise random weights, op by op, for
  # seconds, only to replace them.
  shapes = jax.eval_shape(lambda k: peer.init_weights(k, peer.input_shape),
                          jax.random.key(0))
  peer_params = convert_pytorch_state_dict_to_flax(
      state, types.SimpleNamespace(base_model_prefix=peer.base_model_prefix,
                                   params=shapes))
  batch = jnp.broadcast_to(x, (config.batch_size,) + x.shape)
  pixels = jnp.transpose(batch, (0, 3, 1, 2))  # HF takes NCHW
  fn = jax.jit(lambda p, v: peer.get_image_features(pixel_values=v, params=p))
  ours = np.asarray(backbone.model.embed_images(backbone.params, batch[:2]))
  theirs = np.asarray(fn(peer_params, pixels)[:2])
  jax.block_until_ready(fn(peer_params, pixels))
  seconds = median_seconds(lambda: fn(peer_params, pixels),
                           config.encoder_repeats)
  return {"peer_encoder_images_per_s": config.batch_size / seconds,
          "peer_max_abs_difference": float(np.max(np.abs(ours - theirs))),
          "peer_note": "transformers FlaxCLIPModel.get_image_features"}


COMPILE_CHILD_N = "first result: one standard CERTIFY with n0 = n = batch_size"


def compile_child(name: str, cache_dir: str, config) -> None:
  """In a fresh process: time to the first certificate, then a second one."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from ovc_jax import sampler  # pylint: disable=g-import-not-at-top
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  from ovc_jax.certifiers import standard  # pylint: disable=g-import-not-at-top
  from ovc_jax.classifiers import EmbeddingClassifier  # pylint: disable=g-import-not-at-top
  backbone = load_backbone(name, config.dtype, config.seed)
  x = benchmark_input(backbone)
  u = unit_rows(jax.random.key(1), (1000, backbone.model.config.embed_dim))
  classifier = EmbeddingClassifier(backbone.model.embed_images)
  params = classifier.params(backbone.params, u)
  smoothing = SmoothingParams(sigma=config.sigma, n0=config.batch_size,
                              n=config.batch_size, alpha=config.alpha,
                              batch_size=config.batch_size)
  key = sampler.input_key(config.seed, 0)
  jax.block_until_ready(x)
  start = time.perf_counter()
  standard.certify(key, classifier, params, x, smoothing)
  first = time.perf_counter() - start
  start = time.perf_counter()
  standard.certify(key, classifier, params, x, smoothing)
  second = time.perf_counter() - start
  print(json.dumps({"first_result_s": first, "steady_s": second}))


def compile_times(name: str, workdir: str, variant: str) -> dict:
  """compile_s_cold / compile_s_warm: two fresh processes, one cache dir."""
  cache_dir = tempfile.mkdtemp(prefix=f"jax-cache-{name}-", dir=workdir)
  runs = []
  for _ in range(2):  # cold (empty cache), then warm
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark",
         f"--compile_child={name}", f"--compile_cache_dir={cache_dir}",
         f"--config={benchmark_configs.__file__}:{variant}"],
        capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
      raise RuntimeError(f"compile-time child failed:\n{proc.stderr[-2000:]}")
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return {"compile_s_cold": runs[0]["first_result_s"],
          "compile_s_warm": runs[1]["first_result_s"],
          "steady_state_s": runs[1]["steady_s"],
          "compile_note": COMPILE_CHILD_N}
