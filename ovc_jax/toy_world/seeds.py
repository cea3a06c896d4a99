"""Where the toy world's randomness comes from: one documented seed scheme.

All randomness is NumPy's `Generator(PCG64(SeedSequence(entropy)))` (pure
NumPy, bit-identical across runs and machines for a given NumPy major
version), with the entropy a fixed-length tuple of 32-bit words:

    training batch at `step` of run `seed`:  (TRAIN_TAG, seed, step)
    held-out test split of `seed`:            (TEST_TAG,  seed, 0)
    anything else (previews, tests):          (OTHER_TAG, seed, index)

The tag is the first word and differs between the streams, and every word is
checked to lie in [0, 2^32), so the entropy tuples of the training stream and
of the test split can never be equal, whatever seeds and steps are used. (A
PCG64 state shared by two different tuples would need a collision of
SeedSequence's 128-bit hash.) This mirrors JAX's `fold_in(key, step)`: a batch
is a pure function of (seed, step), so a resumed run regenerates exactly the
batches it would have seen.
"""

from __future__ import annotations

import operator

import numpy as np

from ovc_jax.errors import ConfigError

# Arbitrary, distinct 32-bit words ("TRAI", "TEST", "OTHR" in ASCII).
TRAIN_TAG = 0x54524149
TEST_TAG = 0x54455354
OTHER_TAG = 0x4F544852
_TAGS = (TRAIN_TAG, TEST_TAG, OTHER_TAG)
_WORD_LIMIT = 2**32


def _word(value: int, name: str) -> int:
  try:
    value = operator.index(value)  # ints and NumPy ints; not 1.5 or "1"
  except TypeError as e:
    raise ConfigError(f"{name} must be an integer; got {value!r}") from e
  if not 0 <= value < _WORD_LIMIT:
    raise ConfigError(f"{name} must lie in [0, 2**32); got {value}")
  return value


def entropy(tag: int, seed: int, index: int) -> tuple[int, int, int]:
  """The SeedSequence entropy of stream `tag`, run `seed`, item `index`."""
  if tag not in _TAGS:
    raise ConfigError(f"unknown toy-world stream tag {tag:#x}")
  return (tag, _word(seed, "seed"), _word(index, "step/index"))


def make_rng(tag: int, seed: int, index: int) -> np.random.Generator:
  """A fresh `Generator(PCG64)` for one (stream, seed, index)."""
  return np.random.Generator(
      np.random.PCG64(np.random.SeedSequence(entropy(tag, seed, index))))


def train_rng(seed: int, step: int) -> np.random.Generator:
  """The generator of training batch `step` of run `seed`."""
  return make_rng(TRAIN_TAG, seed, step)


def heldout_rng(seed: int) -> np.random.Generator:
  """The generator of the held-out test split made with `seed`."""
  return make_rng(TEST_TAG, seed, 0)


def other_rng(seed: int, index: int = 0) -> np.random.Generator:
  """A generator outside both the training and the test streams."""
  return make_rng(OTHER_TAG, seed, index)
