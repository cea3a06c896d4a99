"""Reading and writing weight files without PyTorch.

safetensors files are parsed here (an 8-byte header length, a JSON header,
raw little-endian tensors), so every way a file can be broken (too short,
truncated, a header that lies) becomes one `CheckpointError` that names the
file, and float16/bfloat16 checkpoints load as float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from ovc_jax.errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100_000_000


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file; floating-point ones as float32.

  Raises:
    CheckpointError: the file is missing, truncated or not safetensors.
  """
  try:
    size = os.path.getsize(path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if size else None
  except OSError as e:
    raise CheckpointError(f"cannot read weights file {path}: {e}") from e
  if size < 8:
    raise CheckpointError(
        f"{path} is not a valid safetensors file (only {size} bytes)")
  header_len = int.from_bytes(bytes(data[:8]), "little")
  if header_len > min(size - 8, _MAX_HEADER_BYTES):
    raise CheckpointError(
        f"{path} is not a valid safetensors file: its header claims "
        f"{header_len} bytes but the file has {size} (truncated or not "
        "safetensors)")
  try:
    header = json.loads(bytes(data[8:8 + header_len]).decode("utf-8"))
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
  except (UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"{path} has a corrupted safetensors header: {e}") from e
  start = 8 + header_len
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
      shape = tuple(int(n) for n in info["shape"])
      begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(
          f"{path}: unreadable entry for tensor {name!r} ({info}): {e}") from e
    if start + end > size:
      raise CheckpointError(
          f"{path} is truncated: tensor {name!r} ends at byte {start + end} but "
          f"the file has {size} bytes; download it again")
    if end - begin != math.prod(shape) * dtype.itemsize or begin > end:
      raise CheckpointError(
          f"{path} is corrupted: tensor {name!r} of shape {shape} and dtype "
          f"{info['dtype']} does not fit bytes [{begin}, {end})")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape),
                        offset=start + begin).reshape(shape)
    if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16:
      arr = arr.astype(np.float32)
    else:
      arr = np.array(arr)
    tensors[name] = arr
  return tensors


def write_safetensors(tensors: Mapping[str, Any], path: str) -> None:
  """Writes float32/int tensors with transformers' 'pt' format tag, and the
  file's sha256 beside it in `<path>.sha256` (as `sha256sum` writes it), which
  `load_clip` checks on every load."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  save_file(arrays, path, metadata={"format": "pt"})
  write_sha256_file(path)


def write_sha256_file(path: str) -> str:
  """Records a file's sha256 in `<path>.sha256`; returns the digest."""
  digest = file_sha256(path)
  with open(path + ".sha256", "w") as f:
    f.write(f"{digest}  {os.path.basename(path)}\n")
  return digest


def read_flax_msgpack(path: str) -> dict[str, Any]:
  """A Flax `flax_model.msgpack` (as written by transformers) as a nested dict.

  Raises:
    CheckpointError: the file is missing or not a readable msgpack state.
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as e:
    raise CheckpointError(f"cannot read weights file {path}: {e}") from e
  try:
    state = serialization.msgpack_restore(blob)
  except Exception as e:  # msgpack raises many types for a damaged file.
    raise CheckpointError(
        f"{path} is not a readable Flax msgpack file (truncated or corrupted: "
        f"{type(e).__name__}: {e})") from e
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} does not hold a dict of parameters")
  return state


def flatten(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a.b': x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      for kk, vv in flatten(v, sep).items():
        out[f"{k}{sep}{kk}"] = vv
    else:
      out[str(k)] = v
  return out


def file_sha256(path: str) -> str:
  """The sha256 hex digest of a file's bytes (what Hugging Face publishes for
  LFS files and `sha256sum` prints)."""
  h = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
  except OSError as e:
    raise CheckpointError(f"cannot read weights file {path}: {e}") from e
  return h.hexdigest()


def files_sha256(paths: list[str]) -> str:
  """One content hash of weights files: a single file's own sha256, else the
  sha256 of the lines '<file name> <sha256>' of each, sorted by name."""
  if len(paths) == 1:
    return file_sha256(paths[0])
  lines = sorted(f"{os.path.basename(p)} {file_sha256(p)}\n" for p in paths)
  return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_sha256_file(path: str) -> str:
  """The digest recorded in a `.sha256` file (its first word, as `sha256sum`
  writes it), lower-cased."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e
  digest = words[0].lower() if words else ""
  if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
    raise CheckpointError(f"{path} does not hold a sha256 hex digest")
  return digest


def check_sha256(path: str, found: str, expected: str, origin: str) -> None:
  """Raises CheckpointError (one line) unless `found` is the `expected` digest."""
  if found.lower() != expected.strip().lower():
    raise CheckpointError(
        f"weights file {path} does not have the expected sha256 ({origin}): "
        f"expected {expected.strip().lower()}, found {found}; the file is "
        "corrupted or not the one meant (download or export it again)")


def params_fingerprint(params: Any, config_dict: Mapping[str, Any]) -> str:
  """sha256 over the config and every param (names, shapes, float32 bytes).

  Independent of the file format the weights came from, so the same model
  read from safetensors or msgpack tags caches identically.
  """
  h = hashlib.sha256()
  h.update(json.dumps(config_dict, sort_keys=True).encode())
  flat = flatten(params, sep="/")
  for name in sorted(flat):
    arr = np.asarray(flat[name], dtype=np.float32, order="C")
    h.update(f"{name}:{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
  return h.hexdigest()
