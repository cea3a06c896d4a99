"""The caches of a certify workdir: list them, convert them, verify them.

The logic of `python -m experiments.caches`. A certify workdir keeps its
caches under WORKDIR/caches (or the --config.cache_dir its config.json
records), one folder per cache:

  CACHES/[BASE/]sigma_<s>/<idx>/<kind>/   metadata.json and one .npy per array

  list_caches     every cache with its kind, format, sigma, rows and bytes
                  (read from its metadata, whose checksum is checked)
  convert_caches  float32 embedding caches to int16 or int8, each in place
                  and atomically (`ovc_jax.caches.convert_embeddings`),
                  under the workdir's lock
  verify_caches   every cache's checksums, and K noise samples of every
                  embedding cache regenerated with the encoder the run's
                  config.json names, under the workdir's lock
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
from typing import Any, NamedTuple

from experiments.common import certify_job
from experiments.common.files import WorkdirError
from experiments.common.files import disk_error
from experiments.common.workdir import check_workdir_path
from experiments.common.workdir import workdir_lock
from ovc_jax import cache_codec
from ovc_jax import caches
from ovc_jax.errors import CacheError, ConfigError

ACTIONS = ("list", "convert", "verify")


class CacheEntry(NamedTuple):
  """One cache folder, as its metadata describes it."""

  directory: str   # the cache folder
  name: str        # its path under the caches folder
  kind: str
  format: str
  sigma: float
  rows: int | None  # embedding rows (n0 + n); None for the other kinds
  nbytes: int       # its files' bytes on disk


def caches_folder(workdir: str) -> str:
  """Where a workdir's caches are: its recorded --config.cache_dir, else
  WORKDIR/caches."""
  check_workdir_path(workdir)
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} does not exist; pass the "
                       "--workdir of a certify run")
  path = os.path.join(workdir, "config.json")
  cache_dir = ""
  if os.path.isfile(path):
    try:
      with open(path) as f:
        recorded = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise ConfigError(f"{path} is corrupted: {e}") from e
    if not isinstance(recorded, dict):
      raise ConfigError(f"{path} is not a certify run's config")
    cache_dir = recorded.get("cache_dir") or ""
  return cache_dir or os.path.join(workdir, "caches")


def _folder_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, f))
             for f in os.listdir(directory))


def _rows(meta: dict[str, Any]) -> int | None:
  if meta["kind"] != "embeddings":
    return None
  arrays = meta.get("arrays", {})
  names = (caches.STREAMS if meta["format"] == "float32" else
           [f"{s}_codes" for s in caches.STREAMS])
  try:
    return sum(int(arrays[n]["shape"][0]) for n in names)
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise CacheError(f"cache metadata of {meta.get('_dir')} lists no "
                     f"{' and '.join(names)} arrays") from e


def find_caches(workdir: str) -> tuple[str, list[CacheEntry], list[str]]:
  """(caches folder, every cache in it sorted by path, leftovers of an
  interrupted write or conversion). Raises WorkdirError when there are none."""
  root = caches_folder(workdir)
  if not os.path.isdir(root):
    raise WorkdirError(f"{workdir} holds no caches (no folder {root}); "
                       "certify into it first")
  found, leftovers = [], []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(caches.TMP_PREFIX)
                     and not d.endswith(caches.OLD_SUFFIX))
    leftovers += [os.path.join(folder, d)
                  for d in os.listdir(folder)
                  if d.startswith(caches.TMP_PREFIX)
                  or d.endswith(caches.OLD_SUFFIX)]
    if "metadata.json" not in files:
      continue
    dirs[:] = []
    meta = caches.read_metadata(folder)
    meta["_dir"] = folder
    found.append(CacheEntry(
        folder, os.path.relpath(folder, root), meta["kind"], meta["format"],
        float(meta["provenance"]["sigma"]), _rows(meta),
        _folder_bytes(folder)))
  if not found:
    raise WorkdirError(f"{workdir} holds no caches (none under {root}); "
                       "certify into it first")
  return root, found, leftovers


def _size(nbytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if nbytes >= scale:
      return f"{nbytes / scale:.2f} {unit}"
  return f"{nbytes} B"


def list_caches(workdir: str, stream=sys.stdout) -> list[CacheEntry]:
  """Prints every cache of a workdir, then the totals per sigma, kind and
  format."""
  root, found, leftovers = find_caches(workdir)
  w = stream.write
  width = max(len("cache"), *(len(e.name) for e in found))
  w(f"caches in {root}\n")
  w(f"{'cache':{width}}  {'kind':10} {'format':7} {'sigma':>6} {'rows':>9} "
    f"{'bytes':>10}\n")
  for e in found:
    rows = "-" if e.rows is None else f"{e.rows:,}"
    w(f"{e.name:{width}}  {e.kind:10} {e.format:7} {e.sigma:6g} {rows:>9} "
      f"{_size(e.nbytes):>10}\n")
  totals = collections.defaultdict(lambda: [0, 0])
  for e in found:
    entry = totals[(e.sigma, e.kind, e.format)]
    entry[0] += 1
    entry[1] += e.nbytes
  w("\ntotals per sigma, kind and format:\n")
  for (sigma, kind, fmt), (count, nbytes) in sorted(totals.items()):
    w(f"  sigma {sigma:<6g} {kind:10} {fmt:7} {count:6,} caches "
      f"{_size(nbytes):>10}\n")
  w(f"  all: {len(found):,} caches, {_size(sum(e.nbytes for e in found))}\n")
  if leftovers:
    w(f"note: {len(leftovers)} folder(s) left by an interrupted write or "
      "conversion (removed by the next --action=convert or verify): "
      f"{', '.join(leftovers[:3])}{' ...' if len(leftovers) > 3 else ''}\n")
  return found


def _locked(workdir: str, root: str) -> contextlib.ExitStack:
  """The workdir's lock, and the caches folder's when it lies outside."""
  stack = contextlib.ExitStack()
  stack.enter_context(workdir_lock(workdir))
  real_root, real_workdir = os.path.realpath(root), os.path.realpath(workdir)
  if not (real_root + os.sep).startswith(real_workdir + os.sep):
    stack.enter_context(workdir_lock(root, flag="--config.cache_dir"))
  return stack


def _recover(leftovers: list[str], stream) -> None:
  """Finishes what an interrupted write or conversion left (under the lock)."""
  for parent in sorted({os.path.dirname(p) for p in leftovers}):
    for line in caches.recover_interrupted(parent):
      stream.write(f"after an interrupted write or conversion: {line}\n")


def convert_caches(workdir: str, fmt: str, stream=sys.stdout) -> dict:
  """Converts every float32 embedding cache of a workdir to `fmt`, each in
  place and atomically, under the workdir's lock. Returns the counts."""
  if fmt not in cache_codec.CODE_DTYPES:
    raise ConfigError(f"--to must be one of "
                      f"{' | '.join(cache_codec.CODE_DTYPES)}; got {fmt!r}")
  root = caches_folder(workdir)
  find_caches(workdir)  # no caches: say so before taking the lock
  with _locked(workdir, root):
    root, found, leftovers = find_caches(workdir)
    _recover(leftovers, stream)
    if leftovers:
      root, found, _ = find_caches(workdir)
    embeddings = [e for e in found if e.kind == "embeddings"]
    todo = [e for e in embeddings if e.format == "float32"]
    before = after = 0
    for i, e in enumerate(todo):
      try:
        old, new = caches.convert_embeddings(e.directory, fmt)
      except OSError as err:
        raise disk_error(err, e.directory) from err
      before, after = before + old, after + new
      if (i + 1) % 100 == 0:
        stream.write(f"  {i + 1:,} of {len(todo):,} converted\n")
    counts = collections.Counter(e.format for e in embeddings
                                 if e.format != "float32")
  ratio = f" ({after / before:.3f}x)" if before else ""
  stream.write(f"converted {len(todo):,} embedding cache(s) from float32 to "
               f"{fmt}: arrays {_size(before)} -> {_size(after)}{ratio}\n")
  for other, count in sorted(counts.items()):
    note = ("already" if other == fmt else
            "left as they are (only float32 caches are converted):")
    stream.write(f"{count:,} embedding cache(s) {note} {other}\n")
  return {"converted": len(todo), "bytes_before": before,
          "bytes_after": after, **{f"already_{k}": v for k, v in counts.items()}}


def _location(root: str, e: CacheEntry) -> tuple[str, float, int]:
  """(base classifier, sigma, dataset index) of an embedding cache from its
  path: [BASE/]sigma_<s>/<idx>/embeddings."""
  parts = os.path.relpath(e.directory, root).split(os.sep)
  if len(parts) not in (3, 4) or not parts[-3].startswith("sigma_") or (
      not parts[-2].isdigit()):
    raise CacheError(f"cache {e.directory} is not where a certify run puts "
                     "its caches ([BASE/]sigma_<s>/<idx>/embeddings)")
  return (parts[0] if len(parts) == 4 else ""), e.sigma, int(parts[-2])


def verify_caches(workdir: str, samples: int, stream=sys.stdout) -> dict:
  """Checks every cache's checksums and regenerates `samples` noise samples
  of every embedding cache with the encoder of the run's recorded config
  (its model, dataset, keys), under the workdir's lock."""
  if not isinstance(samples, int) or samples < 1:
    raise ConfigError(f"--samples must be an integer >= 1; got {samples}")
  root = caches_folder(workdir)
  find_caches(workdir)
  config = certify_job.config_from_workdir(workdir)
  config.verify_cache_samples = samples
  with _locked(workdir, root):
    root, found, leftovers = find_caches(workdir)
    _recover(leftovers, stream)
    if leftovers:
      root, found, _ = find_caches(workdir)
    setup = certify_job.build_setup(config, workdir)
    bases = {b.name for b in setup.base_classifiers}
    for e in found:
      if e.kind != "embeddings":
        caches.load_cache(e.directory, e.kind)  # checksums
        continue
      base, sigma, idx = _location(root, e)
      if base not in bases or idx >= len(setup.dataset):
        raise CacheError(f"cache {e.directory} belongs to no input of the "
                         f"run recorded in {workdir}/config.json")
      source = certify_job.stored_caches(setup, sigma, idx, base, verify=True)
      source.load_embeddings()
  n = sum(e.kind == "embeddings" for e in found)
  stream.write(f"verified {len(found):,} cache(s): checksums, and {samples} "
               f"regenerated noise sample(s) of each of the {n:,} embedding "
               "cache(s): all match\n")
  return {"caches": len(found), "embeddings": n}
