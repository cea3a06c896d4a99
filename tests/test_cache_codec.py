"""The compressed embedding codec: every row's error is within its bound."""

import numpy as np
import pytest

from ovc_jax import cache_codec
from ovc_jax.errors import InputError


def noisy_rows(seed=0, m=600, d=64, spread=0.05):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=d) + spread * rng.normal(size=(m, d))
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["int8", "int16"])
def test_bound_holds_for_both_ways_of_decoding(fmt):
  rows = noisy_rows()
  rows[5] = rows[0]  # a row equal to another
  rows[7] = rows.mean(axis=0)  # a row near the mean
  packed = cache_codec.encode_rows(rows, fmt)
  assert packed.codes.dtype == cache_codec.CODE_DTYPES[fmt]
  assert np.abs(packed.codes.astype(np.int64)).max() <= cache_codec.QMAX[fmt]
  exact = rows.astype(np.float64)
  two_roundings = cache_codec.decode_rows(packed)
  # A fused multiply-add: the product and sum rounded once, to float32.
  fused = (packed.codes.astype(np.float64) * packed.scale[:, None]
           + packed.mean.astype(np.float64)).astype(np.float32)
  for decoded in (two_roundings, fused):
    err = np.linalg.norm(exact - decoded.astype(np.float64), axis=1)
    assert np.all(err <= packed.bound), np.max(err - packed.bound)
  # The bound is tight to the quantisation error, not a blanket number.
  err = np.linalg.norm(exact - two_roundings, axis=1)
  assert np.all(packed.bound <= err * 1.001 + 1e-6)


def test_sizes():
  rows = noisy_rows(d=512, m=1000)
  ratio = {fmt: cache_codec.encode_rows(rows, fmt).nbytes / rows.nbytes
           for fmt in ("int8", "int16")}
  assert ratio["int8"] < 0.27 and ratio["int16"] < 0.51


def test_non_finite_rows_decode_to_nan_with_zero_bound():
  rows = noisy_rows(m=20)
  rows[3, 4] = np.nan
  rows[9, 0] = np.inf
  packed = cache_codec.encode_rows(rows, "int8")
  decoded = cache_codec.decode_rows(packed)
  assert np.isnan(decoded[[3, 9]]).all()
  assert packed.bound[3] == packed.bound[9] == 0
  assert np.isfinite(decoded[np.r_[0:3, 4:9, 10:20]]).all()
  # The mean ignores them.
  finite = np.delete(rows, [3, 9], axis=0)
  np.testing.assert_allclose(packed.mean, finite.mean(axis=0), atol=1e-6)


def test_bad_inputs_are_refused():
  with pytest.raises(InputError, match="float32"):
    cache_codec.encode_rows(noisy_rows().astype(np.float64), "int8")
  with pytest.raises(InputError, match=r"\[m, d\]"):
    cache_codec.encode_rows(np.zeros(5, np.float32), "int8")
  with pytest.raises(InputError, match="int16 or int8"):
    cache_codec.encode_rows(noisy_rows(), "int4")
  with pytest.raises(InputError, match="unknown cache format"):
    cache_codec.check_format("float16")
