"""Whole files or none, and disk errors as one line.

A file is written through a temporary file and a rename, so a killed run or a
full disk leaves the old file or the new one, never half of one. An OSError
becomes a `WorkdirError` whose one-line message says what went wrong where
and what to do (a full disk, a read-only or missing folder).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from typing import Any

from ovc_jax.errors import OVCError


class WorkdirError(OVCError):
  """A workdir cannot be used: a file, not writable, full, damaged or in use."""


# The workdirs this process has locked, newest last: a message about an error
# without a path names the last one (the lock may be released by then).
USED_WORKDIRS: list[str] = []


def workdir_of(e: BaseException | None) -> str | None:
  """The workdir a run was writing when `e` ended it: the outermost
  `workdir_lock` it passed through, else the last workdir this process used."""
  workdir = getattr(e, "_ovc_workdir", None)
  if workdir is None and USED_WORKDIRS:
    workdir = USED_WORKDIRS[-1]
  return workdir


def os_error_message(e: OSError, path: str | None = None) -> str:
  """One line for an OSError: what went wrong where, and what to do."""
  where = path or e.filename
  if where is None:
    workdir = workdir_of(e)
    where = f"under {workdir}" if workdir else None
  at = f" ({where})" if where else ""
  # NumPy reports a short write (a full disk) without errno.
  short_write = e.errno is None and re.search(r"\d+ requested and \d+ written",
                                              str(e))
  if e.errno in (errno.ENOSPC, errno.EDQUOT) or short_write:
    return (f"the disk is full: no space left on device{at}; free some space "
            "there (or use another --workdir) and run the same command again: "
            "finished work is kept")
  if e.errno == errno.EROFS:
    return f"read-only file system{at}: use a --workdir on a writable disk"
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"permission denied{at}: use a --workdir you can write to"
  reason = " ".join((e.strerror or str(e)).split())
  return f"{reason}{at}"


def disk_error(e: OSError, path: str) -> WorkdirError:
  """The WorkdirError of an OSError raised while writing `path`."""
  error = WorkdirError(os_error_message(e, path))
  error.errno = e.errno
  return error


def _file_mode() -> int:
  """0o666 less the umask: the mode open() gives a new file."""
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


def atomic_write_text(path: str, text: str) -> None:
  """Writes a file via a temporary file and a rename: whole or not at all.

  The file gets the mode a plain open() would give it (0o644 under umask
  022). Raises WorkdirError (one line: a full disk, a read-only folder, ...)
  when it cannot be written; nothing is left half-written.
  """
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.fchmod(fd, _file_mode())
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise disk_error(e, path) from e
    raise


def write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure to `path` through a temporary file (a killed
  run leaves no half-written PNG) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp.png"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(tmp)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise disk_error(e, path) from e
    raise
  finally:
    plt.close(fig)


def remove_empty_dirs(path: str, stop: str) -> None:
  """Removes `path` and its parents while empty, up to and including `stop`."""
  path, stop = os.path.abspath(path), os.path.abspath(stop)
  while path.startswith(stop):
    try:
      os.rmdir(path)
    except OSError:
      return
    if path == stop:
      return
    path = os.path.dirname(path)


def discard_dir(path: str, stop: str) -> None:
  """Removes an incomplete folder and the empty folders above it up to `stop`."""
  shutil.rmtree(path, ignore_errors=True)
  remove_empty_dirs(os.path.dirname(os.path.abspath(path)), stop)
