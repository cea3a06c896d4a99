"""What the benchmark certifies: a backbone, a toy-world input, unit class
embeddings, and the SmoothingParams of a stored cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Backbone:
  """An image encoder with its weights, preprocessing and provenance."""

  name: str
  model: Any
  params: Any
  preprocess: Any
  fingerprint: str
  weights: str  # what the weights are


def load_backbone(name: str, dtype: str, seed: int) -> Backbone:
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  from ovc_jax import models  # pylint: disable=g-import-not-at-top
  from ovc_jax import preprocessing  # pylint: disable=g-import-not-at-top
  if name == "toy":
    loaded = models.load_clip("toy", dtype=dtype)
    return Backbone("toy", loaded.model, loaded.params, loaded.preprocess,
                    loaded.fingerprint,
                    "the project's trained toy-world CLIP (not a real CLIP)")
  config = models.named_config(name)
  model = models.ClipModel(config, dtype=dtype)
  params = jax.jit(model.init)(jax.random.key(seed))
  size = config.vision.image_size
  return Backbone(name, model, params,
                  preprocessing.PreprocessSpec(image_size=size, resize_size=size),
                  caches.array_fingerprint(np.asarray(jax.tree_util.tree_leaves(
                      params)[0])),
                  "random (speed does not depend on the weights' values)")


def benchmark_input(backbone: Backbone) -> jax.Array:
  """A toy-world test image, preprocessed for the backbone (normalised space)."""
  from ovc_jax import datasets  # pylint: disable=g-import-not-at-top
  from ovc_jax import preprocessing  # pylint: disable=g-import-not-at-top
  image, _ = datasets.load_dataset("toy")[0]
  return jax.jit(preprocessing.preprocess, static_argnums=1)(
      jnp.asarray(image), backbone.preprocess)


def unit_rows(key, shape) -> jax.Array:
  u = jax.random.normal(key, shape)
  return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def cached_smoothing(draws, config):
  """The SmoothingParams a cache of these rows was drawn with (Cached-OVC
  checks its n0 and n against the rows)."""
  from ovc_jax.certificates import SmoothingParams  # pylint: disable=g-import-not-at-top
  return SmoothingParams(sigma=config.sigma, n0=int(np.shape(draws.selection)[0]),
                         n=int(np.shape(draws.estimation)[0]),
                         alpha=config.alpha)
