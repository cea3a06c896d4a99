"""Input checks that never break tracing.

Every public function a JAX user may call inside `jax.jit` or `jax.vmap`
validates its arguments in two parts:

  - shapes and dtypes, which are known while tracing: always checked;
  - values (finite class matrices and fits, counts that fit their draws),
    which are not: checked on the host with NumPy when the value is concrete,
    and skipped when it is a `jax.core.Tracer`. The compiled program keeps its
    own in-graph safety instead (a non-finite embedding or logit counts for no
    class, see `ovc_jax.classifiers`).

A value check never uses `jnp` on a concrete value: inside `jit`, `jnp`
stages even a constant into the trace, and `bool()` of the result then raises
a TracerBoolConversionError. docs/JAX.md lists the traceable functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(*values: Any) -> bool:
  """Whether any leaf of `values` is a tracer (inside jit, vmap, grad, ...)."""
  return any(isinstance(leaf, jax.core.Tracer)
             for leaf in jax.tree.leaves(values))


def host_value(value: Any) -> np.ndarray | None:
  """`value` as a host NumPy array, or None when it is traced (its value is
  not known yet: the caller skips its value checks)."""
  if is_traced(value):
    return None
  return np.asarray(value)


def all_finite(*values: Any) -> bool | None:
  """Whether every entry of every array is finite, on the host; None when
  any of them is traced (unknown)."""
  if is_traced(*values):
    return None
  return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in values)


def under_trace() -> bool:
  """Whether the caller runs inside a trace (jit, vmap, ...), even with
  concrete arguments: then every `jnp` result is a tracer, and host loops
  that read results back (`block_until_ready`, `np.asarray`) cannot run."""
  return isinstance(jnp.zeros(()), jax.core.Tracer)
