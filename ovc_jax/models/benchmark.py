"""Images/s of `ClipModel.embed_images` against transformers' FlaxCLIPModel.

Both run jitted on the same weights (a Hugging Face CLIP directory) and the
same batch; calls alternate between the two (ABAB...) so that a busy machine
slows both alike, and each one's fastest call is kept.

  from ovc_jax.models import benchmark
  benchmark.compare_with_transformers('checkpoints/downloads/openai/clip-vit-base-patch32')
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ovc_jax.models.loading import load_clip


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def compare_with_transformers(hf_dir: str, *, batch_size: int = 64,
                              repeats: int = 10,
                              dtype: str = "float32") -> dict[str, float]:
  """Images/s of ours and of `FlaxCLIPModel.get_image_features`.

  Args:
    hf_dir: a Hugging Face CLIP directory (read by both).
    batch_size: images per call.
    repeats: timed calls per model (the fastest is kept).
    dtype: our compute dtype (transformers runs float32 or bfloat16 alike).

  Returns:
    {'ours': images/s, 'transformers': images/s, 'max_abs_diff': float}.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  loaded = load_clip(hf_dir, dtype=dtype)
  hf = transformers.FlaxCLIPModel.from_pretrained(
      hf_dir, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  s = loaded.model.image_size
  images = jax.random.normal(jax.random.key(0), (batch_size, s, s, 3))
  images_nchw = jnp.transpose(images, (0, 3, 1, 2))  # transformers' layout.
  ours_fn = jax.jit(loaded.model.embed_images)
  hf_fn = jax.jit(lambda p, x: hf.get_image_features(pixel_values=x, params=p))

  def ours():
    return ours_fn(loaded.params, images)

  def theirs():
    return hf_fn(hf.params, images_nchw)

  _seconds(ours)  # Compile and warm up.
  _seconds(theirs)
  ours_t, hf_t = float("inf"), float("inf")
  for _ in range(repeats):
    ours_t = min(ours_t, _seconds(ours))
    hf_t = min(hf_t, _seconds(theirs))
  diff = float(np.abs(np.asarray(ours(), np.float32)
                      - np.asarray(theirs(), np.float32)).max())
  return {"ours": batch_size / ours_t, "transformers": batch_size / hf_t,
          "max_abs_diff": diff}
