"""The disk side of the n = 100,000 section: the page cache and a cold read."""

from __future__ import annotations

import os
import sys
import time

import numpy as np


DISK_READ_CHUNK = 16 << 20


def _libc():
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  libc.mmap.restype = ctypes.c_void_p
  libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_int, ctypes.c_int, ctypes.c_long)
  libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
  libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
  return libc


def drop_from_page_cache(paths) -> None:
  """Evicts files from the page cache. Pages still mapped stay (so the
  garbage that may hold memory maps is collected first), and so do dirty
  ones (so the files are synced first)."""
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # dirty pages (a cache just written) cannot be dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def resident_fraction(paths) -> float | None:
  """The fraction of the files' pages in the page cache (mincore), or None
  where that cannot be asked."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import mmap  # pylint: disable=g-import-not-at-top
  libc = _libc()
  if libc is None or not sys.platform.startswith("linux"):
    return None
  page = mmap.PAGESIZE
  resident = total = 0
  for path in paths:
    size = os.path.getsize(path)
    if not size:
      continue
    fd = os.open(path, os.O_RDONLY)
    try:
      address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
      if address in (None, ctypes.c_void_p(-1).value):
        return None
      try:
        pages = -(-size // page)
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, vec) != 0:
          return None
        resident += sum(b & 1 for b in vec.raw[:pages])
        total += pages
      finally:
        libc.munmap(address, size)
    finally:
      os.close(fd)
  return resident / total if total else None


def disk_read_gbps(path: str) -> float:
  """GB/s of one cold sequential read of `path` in DISK_READ_CHUNK reads."""
  drop_from_page_cache([path])
  buf = bytearray(DISK_READ_CHUNK)
  view = memoryview(buf)
  fd = os.open(path, os.O_RDONLY)
  total = 0
  try:
    start = time.perf_counter()
    while (got := os.readv(fd, [view])) > 0:
      total += got
    seconds = time.perf_counter() - start
  finally:
    os.close(fd)
  return total / seconds / 1e9


def write_disk_test_file(path: str, nbytes: int) -> None:
  rng = np.random.default_rng(0)
  with open(path, "wb") as f:
    left = nbytes
    while left > 0:
      block = rng.integers(0, 2**63, size=min(left, 64 << 20) // 8,
                           dtype=np.int64)
      f.write(block.tobytes())
      left -= block.nbytes
    f.flush()
    os.fsync(f.fileno())
