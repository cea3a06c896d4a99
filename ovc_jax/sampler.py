"""The keyed noise sampler: the one way any certifier draws Gaussian noise.

Noise sample i of an input is a pure function of a key and i,

    e_i = sigma * normal(fold_in(key, i), x.shape),

so any sample can be regenerated alone, in any batch size, on any number of
devices, and the counts a certifier sees do not depend on how the samples were
batched. Standard RS, Modified-IRS (which replays the first n_p samples of a
known prompt), Cached-OVC (which stores the embeddings of every sample) and
MVN-OVC (which draws its latent Gaussian samples here too) all call
`sample_under_noise`.

One compiled program per (base classifier, input shape, sample count, batch
size, outputs, mesh): the samples are evaluated in fixed-size chunks (vmap inside
a chunk, `lax.scan` across chunks), the ragged last chunk is padded and masked
rather than re-traced, and counts accumulate on the device.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ovc_jax import tracing
from ovc_jax.errors import ConfigError, InputError

# A base classifier: `apply_fn(params, inputs [B, *x.shape]) -> outputs`, where
# outputs maps "predictions" to int [B] (or [B, P] for P classifiers at once)
# and, optionally, "embeddings" to [B, d]. It must be hashable (a module-level
# function or a frozen dataclass) because it is a static argument of `jax.jit`.
# A prediction outside [0, C) (e.g. -1 for a sample with no class) is counted
# for no class. If it has `check_params(params, input_shape)`, every sampler
# call runs it first (it raises for params it cannot honour).
ApplyFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]

OUTPUTS = ("counts", "predictions", "embeddings")
SAMPLE_AXIS = "samples"


def sample_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """The key of each noise sample: `fold_in(key, i)` for i in `indices`."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def standard_normal_samples(key: jax.Array, indices: jax.Array,
                            shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Unit-variance noise samples `[len(indices), *shape]`, sample i keyed by i."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(
      sample_keys(key, indices))


# The key streams of one input. Each is `fold_in(input_key, stream id)`, and
# sample i of a stream is `fold_in(stream key, i)`. Distinct ids give
# independent streams; that independence is what the certificates rest on:
# Cohen et al.'s theorem needs the class choice (selection) independent of the
# bound (estimation), PREDICT's test needs draws of its own, and MVN-OVC's
# latent draws must not reuse image noise. Every stream is named here, once.
KEY_STREAMS = {
    "selection": 0,    # CERTIFY's n0 draws: which class to certify
    "estimation": 1,   # CERTIFY's n draws: the bound on pA
    "prediction": 2,   # PREDICT's n draws
    "gaussian": 3,     # MVN-OVC's latent draws
}


def stream_key(key: jax.Array, stream: str) -> jax.Array:
  """The key of one of an input's streams (see `KEY_STREAMS`)."""
  if stream not in KEY_STREAMS:
    raise ConfigError(f"unknown key stream {stream!r}; the streams are "
                      f"{sorted(KEY_STREAMS)}")
  return jax.random.fold_in(key, KEY_STREAMS[stream])


def selection_key(key: jax.Array) -> jax.Array:
  """Key of the n0 selection draws of an input (which class to certify)."""
  return stream_key(key, "selection")


def estimation_key(key: jax.Array) -> jax.Array:
  """Key of the n estimation draws; disjoint from the selection draws."""
  return stream_key(key, "estimation")


def input_key(seed: int, index: int) -> jax.Array:
  """The noise key of dataset input `index` in a run seeded with `seed`."""
  return jax.random.fold_in(jax.random.key(seed), index)


def num_classes_of(apply_fn: ApplyFn, params: Any,
                   num_classes: int | None = None) -> int:
  """C: the one given, else the base classifier's own `num_classes(params)`."""
  own = getattr(apply_fn, "num_classes", None)
  own = None if own is None else int(own(params))
  if num_classes is None:
    if own is None:
      raise ConfigError(f"{type(apply_fn).__name__} does not know its class "
                        "count; pass num_classes")
    return own
  if own is not None and int(num_classes) != own:
    raise ConfigError(f"the class counts differ: num_classes = {num_classes} "
                      f"but the class matrix has {own} rows")
  return int(num_classes)


def check_sampler_args(*, num_samples: int, sigma: float, batch_size: int,
                       num_classes: int | None = None) -> None:
  """Raises ConfigError for arguments a sampler call cannot honour."""
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ConfigError(f"the number of noise samples must be >= 1; got {num_samples}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ConfigError(f"batch size must be >= 1; got {batch_size}")
  sigma_value = tracing.host_value(sigma)  # None: traced, not checked
  if sigma_value is not None and (
      sigma_value.shape != () or not np.isfinite(sigma_value)
      or sigma_value <= 0):
    raise ConfigError(f"sigma must be a finite number > 0; got {sigma}")
  if num_classes is not None and num_classes < 1:
    raise ConfigError(f"num_classes must be >= 1; got {num_classes}")


def check_input(x: Any, expected_shape: Sequence[int] | None = None):
  """Validates one input of the base classifier (any shape), as float32.

  A concrete input comes back as a NumPy array, checked for NaN and inf on
  the host; a traced one (inside jit or vmap) as a float32 tracer, checked
  for dtype and shape only (see `ovc_jax.tracing`).
  """
  traced = tracing.is_traced(x)
  arr = x if traced else np.asarray(x)
  if not np.issubdtype(arr.dtype, np.number):
    raise InputError(f"input must be numeric; got dtype {arr.dtype}")
  if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
    raise InputError(
        f"input has shape {tuple(arr.shape)} but the model takes "
        f"{tuple(expected_shape)}")
  if traced:
    return arr.astype(jnp.float32)
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise InputError("input contains NaN or infinite values")
  return arr


def count_classes(predictions: jax.Array, valid: jax.Array,
                  num_classes: int) -> jax.Array:
  """Histogram of the valid rows of `predictions`: int32 `[..., num_classes]`.

  Args:
    predictions: int `[B]` or `[B, P]` (P classifiers on the same samples).
    valid: bool `[B]`; rows that are padding are not counted.
    num_classes: C.

  A segment sum over flat (classifier, class) ids rather than a one-hot: it
  touches B * P numbers instead of B * P * C. Predictions outside [0, C)
  (e.g. ABSTAIN for a sample with no class) are not counted.
  """
  batch = predictions.shape[0]
  flat = predictions.reshape(batch, -1).astype(jnp.int32)  # [B, P]
  num_prompts = flat.shape[1]
  in_range = (flat >= 0) & (flat < num_classes) & valid[:, None]
  ids = jnp.where(in_range, flat + num_classes * jnp.arange(num_prompts),
                  num_prompts * num_classes)  # out of range: dropped
  counts = jax.ops.segment_sum(jnp.ones_like(ids).reshape(-1), ids.reshape(-1),
                               num_segments=num_prompts * num_classes)
  return counts.reshape(predictions.shape[1:] + (num_classes,))


def _chunk_size(batch_size: int, num_samples: int, mesh: Mesh | None) -> int:
  """Samples per chunk: batch_size (no more than needed), rounded up to a
  multiple of the mesh size."""
  chunk = min(batch_size, num_samples)
  if mesh is None:
    return chunk
  devices = mesh.devices.size
  return math.ceil(chunk / devices) * devices


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "num_samples", "batch_size", "num_classes",
                     "outputs", "mesh"))
def _sample(apply_fn, params, x, key, sigma, first_index, *, num_samples,
            batch_size, num_classes, outputs, mesh):
  chunk = _chunk_size(batch_size, num_samples, mesh)
  num_chunks = math.ceil(num_samples / chunk)

  def evaluate_chunk(counts, c):
    offsets = c * chunk + jnp.arange(chunk)
    indices = first_index + offsets
    noise = standard_normal_samples(key, indices, x.shape, x.dtype)
    if mesh is not None:
      noise = jax.lax.with_sharding_constraint(
          noise, NamedSharding(mesh, PartitionSpec(SAMPLE_AXIS)))
    result = apply_fn(params, x[None] + sigma.astype(x.dtype) * noise)
    if "counts" in outputs:
      valid = offsets < num_samples  # the padded tail of the last chunk
      counts = counts + count_classes(result["predictions"], valid, num_classes)
    kept = {k: result[k] for k in outputs if k != "counts"}
    return counts, kept

  if "counts" in outputs:
    pred_shape = jax.eval_shape(
        apply_fn, params, jax.ShapeDtypeStruct((chunk,) + x.shape, x.dtype)
    )["predictions"].shape[1:]
    counts0 = jnp.zeros(pred_shape + (num_classes,), jnp.int32)
  else:
    counts0 = jnp.zeros((), jnp.int32)
  counts, kept = jax.lax.scan(evaluate_chunk, counts0, jnp.arange(num_chunks))
  out = {k: v.reshape((num_chunks * chunk,) + v.shape[2:])[:num_samples]
         for k, v in kept.items()}
  if "counts" in outputs:
    out["counts"] = counts
  return out


def sample_under_noise(
    apply_fn: ApplyFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    sigma: float,
    batch_size: int,
    num_classes: int | None = None,
    outputs: Sequence[str] = ("counts",),
    mesh: Mesh | None = None,
    first_index: int = 0,
) -> dict[str, jax.Array]:
  """Evaluates a base classifier on `num_samples` keyed noisy copies of `x`.

  Args:
    apply_fn: the base classifier (see `ApplyFn`); hashable.
    params: its parameters (any pytree), passed through to `apply_fn`.
    x: one input, any shape; noise of the same shape is added to it.
    key: the noise key; sample i uses `fold_in(key, i)`.
    num_samples: how many noisy copies.
    sigma: noise standard deviation.
    batch_size: samples evaluated at once (memory bound, not semantics: the
      outputs are the same for every batch size).
    num_classes: the class count, needed for "counts".
    outputs: any of "counts" (int32 [..., num_classes], the histogram of
      predictions), "predictions" (int [num_samples, ...]) and "embeddings"
      ([num_samples, d]); all from the same samples.
    mesh: optional device mesh with a "samples" axis; each chunk is split
      across it. batch_size is rounded up to a multiple of the mesh size.
    first_index: the samples drawn are first_index, ..., first_index +
      num_samples - 1 (so a certifier can draw the rest of a stream later).

  Returns:
    A dict with the requested outputs, on the device.
  """
  outputs = tuple(outputs)
  for name in outputs:
    if name not in OUTPUTS:
      raise ConfigError(f"unknown sampler output {name!r}; choose from {OUTPUTS}")
  if "counts" in outputs and num_classes is None:
    raise ConfigError("num_classes is required for counts")
  check_sampler_args(num_samples=num_samples, sigma=sigma,
                     batch_size=batch_size, num_classes=num_classes)
  if mesh is not None and SAMPLE_AXIS not in mesh.axis_names:
    raise ConfigError(
        f"the mesh must have an axis named {SAMPLE_AXIS!r}; got {mesh.axis_names}")
  if not isinstance(apply_fn, Hashable):
    raise ConfigError("apply_fn must be hashable (a function or frozen dataclass)")
  first_value = tracing.host_value(first_index)
  if first_value is not None and first_value < 0:
    raise ConfigError(f"first_index must be >= 0; got {first_index}")
  check_params = getattr(apply_fn, "check_params", None)
  if check_params is not None:
    # e.g. EmbeddingClassifier: a class matrix with NaN, or of another
    # embedding size than the encoder's, is an InputError here, not a wrong
    # count or an error from inside the compiled program.
    check_params(params, np.shape(x))
  return _sample(apply_fn, params, jnp.asarray(x), key,
                 jnp.asarray(sigma, jnp.float32),
                 jnp.asarray(first_index, jnp.int32),
                 num_samples=int(num_samples), batch_size=int(batch_size),
                 num_classes=None if num_classes is None else int(num_classes),
                 outputs=outputs, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("apply_fn", "outputs"))
def _sample_chunk_at(apply_fn, params, x, key, sigma, indices, *, outputs):
  """One chunk of `_sample`'s work, for the given sample indices: the same
  noise and the same encoder call on a batch of the same shape."""
  noise = standard_normal_samples(key, indices, x.shape, x.dtype)
  result = apply_fn(params, x[None] + sigma.astype(x.dtype) * noise)
  return {k: result[k] for k in outputs}


def sample_at_indices(
    apply_fn: ApplyFn,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    indices: Any,
    *,
    sigma: float,
    batch_size: int,
    outputs: Sequence[str] = ("embeddings",),
    stream: str | None = None,
) -> dict[str, jax.Array]:
  """Evaluates the base classifier on the noise samples `indices` alone.

  Sample i is `fold_in(key, i)`, as in `sample_under_noise` (with `stream`,
  `key` is the input's key and the stream's key is derived from it, as
  `sample_certification_draws` does). The samples are evaluated in batches
  of exactly `batch_size` (the last one padded with repeats), so the encoder
  sees the shapes it saw in a `sample_under_noise` run with that batch size
  (which evaluates min(batch_size, num_samples) at once): pass that number
  to get the same bits (tests/test_compressed_cache.py checks it on the
  CPU).

  Args:
    apply_fn, params, x: as in `sample_under_noise`.
    key: the stream's key (or, with `stream`, the input's key).
    indices: int `[k]` sample indices, each >= 0, in any order, repeats
      allowed; k may be 0.
    sigma: noise standard deviation.
    batch_size: samples evaluated at once.
    outputs: any of "predictions" and "embeddings".
    stream: None, or one of `KEY_STREAMS`.

  Returns:
    A dict with the requested outputs for the k samples, in `indices`' order.
  """
  outputs = tuple(outputs)
  for name in outputs:
    if name not in ("predictions", "embeddings"):
      raise ConfigError(f"sample_at_indices gives 'predictions' and "
                        f"'embeddings'; got output {name!r}")
  if stream is not None:
    key = stream_key(key, stream)
  check_sampler_args(num_samples=1, sigma=sigma, batch_size=batch_size)
  if not isinstance(apply_fn, Hashable):
    raise ConfigError("apply_fn must be hashable (a function or frozen dataclass)")
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(
      indices.dtype, np.integer)):
    raise ConfigError(f"sample indices must be integers [k]; got dtype "
                      f"{indices.dtype}, shape {indices.shape}")
  if indices.size and (indices.min() < 0
                       or indices.max() > np.iinfo(np.int32).max):
    raise ConfigError(f"sample indices must lie in [0, 2^31); got "
                      f"{indices.min()} to {indices.max()}")
  x = check_input(x)
  check_params = getattr(apply_fn, "check_params", None)
  if check_params is not None:
    check_params(params, np.shape(x))
  indices = indices.astype(np.int32)
  chunks = []
  sigma = jnp.asarray(sigma, jnp.float32)
  for start in range(0, indices.size, batch_size):
    block = indices[start:start + batch_size]
    padded = np.concatenate([block, np.full(batch_size - block.size,
                                            block[-1], np.int32)])
    out = _sample_chunk_at(apply_fn, params, jnp.asarray(x), key, sigma,
                           jnp.asarray(padded), outputs=outputs)
    chunks.append({k: v[:block.size] for k, v in out.items()})
  if not chunks:  # no samples: the shapes of an empty evaluation
    struct = jax.eval_shape(
        lambda p, z: apply_fn(p, z), params,
        jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)), jnp.float32))
    return {k: jnp.zeros((0,) + struct[k].shape[1:], struct[k].dtype)
            for k in outputs}
  return {k: jnp.concatenate([c[k] for c in chunks]) for k in outputs}


class Draws(NamedTuple):
  """The sampler outputs of CERTIFY's two draws (each a dict, see above)."""

  selection: dict[str, jax.Array]
  estimation: dict[str, jax.Array]


def sample_certification_draws(
    apply_fn: ApplyFn, params: Any, x: jax.Array, key: jax.Array, *,
    sigma: float, num_classes: int, n0: int, n: int, batch_size: int,
    outputs: Sequence[str] = ("counts",), mesh: Mesh | None = None) -> Draws:
  """CERTIFY's n0 selection and n estimation draws, from their own streams."""
  def draw(stream, num_samples):
    return sample_under_noise(
        apply_fn, params, x, stream_key(key, stream), num_samples=num_samples,
        sigma=sigma, batch_size=batch_size, num_classes=num_classes,
        outputs=tuple(outputs), mesh=mesh)
  return Draws(draw("selection", n0), draw("estimation", n))


def sample_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over `devices` (default: all) for the sample axis."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (SAMPLE_AXIS,))
