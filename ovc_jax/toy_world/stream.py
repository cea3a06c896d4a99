"""The infinite training stream of toy-world images and captions.

A training batch is a pure function of (seed, step): `sample_batch((seed,
step), B)` draws it from `seeds.train_rng(seed, step)`, a stream the held-out
test split never uses (see seeds.py). A run that resumes at step k therefore
sees exactly the batches it would have seen, like JAX's `fold_in(key, step)`.
"""

from __future__ import annotations

from typing import Iterator, Union

import numpy as np

from ovc_jax.errors import ConfigError
from ovc_jax.toy_world import captions as captions_lib
from ovc_jax.toy_world import rendering as render_lib
from ovc_jax.toy_world import scenes as scenes_lib
from ovc_jax.toy_world import seeds

RngOrSeed = Union[np.random.Generator, int, tuple[int, int]]
Batch = tuple[np.ndarray, list[str], np.ndarray, dict[str, np.ndarray]]


def as_rng(rng_or_seed: RngOrSeed) -> np.random.Generator:
  """A Generator as is; an int seed: training step 0; (seed, step): step."""
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  if isinstance(rng_or_seed, tuple) and len(rng_or_seed) == 2:
    return seeds.train_rng(*rng_or_seed)
  if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(
      rng_or_seed, bool):
    return seeds.train_rng(int(rng_or_seed), 0)
  raise ConfigError("expected a numpy Generator, an int seed or a (seed, "
                    f"step) pair; got {rng_or_seed!r}")


def sample_batch(rng_or_seed: RngOrSeed, batch_size: int,
                 labels: np.ndarray | None = None) -> Batch:
  """A batch of images with one caption each.

  Args:
    rng_or_seed: a `np.random.Generator` (advanced: consecutive calls give
      consecutive batches), an int seed (the training stream's step 0) or a
      `(seed, step)` pair (the training stream's batch `step`; preferred).
    batch_size: B.
    labels: optional int `[B]` classes to draw; default uniform at random.

  Returns:
    images: float32 `[B, 32, 32, 3]` in [0, 1], channels last.
    captions: B strings, each true of its image (see captions.py).
    labels: int64 `[B]`, class indices into `TOY_CLASSES`.
    attributes: int64 `[B]` 'style', 'colour' (-1: none visible), 'size',
      'background' (indices into the catalog's STYLES, COLOURS, SIZES,
      BACKGROUNDS) and float32 'radius' `[B]`, 'center' `[B, 2]`, 'angle'
      `[B]`.
  """
  if int(batch_size) != batch_size or batch_size < 1:
    raise ConfigError(f"batch_size must be a positive int; got {batch_size!r}")
  rng = as_rng(rng_or_seed)
  scenes = scenes_lib.sample_scenes(rng, int(batch_size), labels)
  attributes = scenes.attributes()
  texts = captions_lib.sample_captions(rng, scenes.label, attributes)
  images = render_lib.render(scenes, rng)
  return images, texts, scenes.label.copy(), attributes


def train_batches(seed: int, batch_size: int,
                  start_step: int = 0) -> Iterator[Batch]:
  """Batches `start_step, start_step + 1, ...` of training run `seed`."""
  step = start_step
  while True:
    yield sample_batch((seed, step), batch_size)
    step += 1
