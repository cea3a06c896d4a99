"""One run per workdir, and the workdir's record of its configuration.

  workdir_lock           one process writes a workdir (fcntl.flock on WORKDIR/.lock)
  check_workdir_path     refuses a workdir that cannot be a folder
  check_workdir_config   config.json: a workdir holds one configuration (and
                         one model's weights)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Mapping

from experiments.common.files import USED_WORKDIRS
from experiments.common.files import WorkdirError
from experiments.common.files import disk_error
from experiments.common.files import os_error_message
from experiments.common.files import write_json
from ovc_jax.errors import ConfigError

# config.json's key for the weights' content hashes (not a config field).
WEIGHTS_KEY = "model_weights"


# ---------------------------------------------------------------------------
# One run per workdir


class _Lock:
  """An flock held on WORKDIR/.lock by this process (counted: re-entrant)."""

  def __init__(self, workdir: str, fd: int):
    self.workdir = workdir
    self.fd = fd
    self.count = 0


_LOCKS: dict[str, _Lock] = {}
LOCK_NAME = ".lock"


def check_workdir_path(workdir: str, flag: str = "--workdir") -> None:
  """Raises WorkdirError when `workdir` cannot be a folder: it is a file, or
  a file stands where one of its parents should be. Creates nothing."""
  if not workdir:
    raise WorkdirError(f"{flag} is empty")
  what = "workdir" if flag == "--workdir" else flag
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{what} {workdir} is a file, not a folder; pass "
                       f"another {flag}")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"{what} {workdir} cannot be created: {parent} is a "
                       f"file, not a folder; pass another {flag}")


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  except OSError:
    text = ""
  return " ".join(text.split()) or "a process that has not written its pid yet"


def acquire_workdir(workdir: str, flag: str = "--workdir") -> _Lock:
  """Takes this process's exclusive lock on `workdir` (created if missing).

  Raises:
    WorkdirError: the workdir is a file or cannot be created or written, or
      another process holds it (the message names its pid and host).
  """
  check_workdir_path(workdir, flag)
  what = "workdir" if flag == "--workdir" else flag
  key = os.path.realpath(workdir)
  lock = _LOCKS.get(key)
  if lock is None:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"{what} {workdir} cannot be created: "
                         f"{os_error_message(e, workdir)}") from e
    path = os.path.join(workdir, LOCK_NAME)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"{what} {workdir} cannot be written: "
                         f"{os_error_message(e, path)}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"{what} {workdir} is in use by another run ({holder}); wait for "
            f"it to finish or stop it, or pass another {flag}") from e
      raise WorkdirError(f"{what} {workdir} cannot be locked: "
                         f"{os_error_message(e, path)}") from e
    try:
      record = (f"pid {os.getpid()} on host {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}")
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (record[:1000] + "\n").encode())
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f"{what} {workdir} cannot be written: "
                         f"{os_error_message(e, path)}") from e
    lock = _LOCKS[key] = _Lock(workdir, fd)
    if workdir not in USED_WORKDIRS:
      USED_WORKDIRS.append(workdir)
  lock.count += 1
  return lock


def release_workdir(lock: _Lock) -> None:
  lock.count -= 1
  if lock.count > 0:
    return
  for key, held in list(_LOCKS.items()):
    if held is lock:
      del _LOCKS[key]
  try:
    os.ftruncate(lock.fd, 0)  # nobody holds it now
  except OSError:
    pass
  os.close(lock.fd)  # releases the flock


@contextlib.contextmanager
def workdir_lock(workdir: str, flag: str = "--workdir"):
  """Holds an exclusive lock on `workdir` (WORKDIR/.lock) for the block.

  One process at a time writes a workdir: a second run of any experiment on
  it stops with one line naming the workdir and the pid and host holding it.
  The lock is the kernel's (fcntl.flock), so a run that was killed, even with
  kill -9, holds nothing: resuming its workdir just works. Re-entrant within
  a process.
  """
  lock = acquire_workdir(workdir, flag)
  try:
    yield lock
  except (KeyboardInterrupt, OSError) as e:
    e._ovc_workdir = workdir  # for the message; the outermost lock's wins
    raise
  finally:
    release_workdir(lock)


# ---------------------------------------------------------------------------
# The workdir's record of its configuration


def first_difference(a: Any, b: Any,
                     sides: tuple[str, str] = ("in the workdir", "now"),
                     path: str = "") -> str | None:
  """The first field where two JSON configs differ, as "field: A SIDE_A, B
  SIDE_B", or None."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for k in sorted(set(a) | set(b)):
      diff = first_difference(a.get(k), b.get(k), sides,
                              f"{path}.{k}" if path else k)
      if diff:
        return diff
    return None
  return None if a == b else f"{path}: {a!r} {sides[0]}, {b!r} {sides[1]}"


def check_workdir_config(workdir: str, config: Mapping[str, Any],
                         what: str, *,
                         weights: Mapping[str, str] | None = None) -> None:
  """Records `config` in a new workdir's config.json; refuses another one.

  Args:
    workdir: the run's directory (created if missing).
    config: the run's configuration as JSON values.
    what: what the workdir holds, for the message ("results", "a training
      run").
    weights: content hashes of the model's weights ({"sha256": ...,
      "fingerprint": ...}); recorded beside the config, and a workdir
      recorded with other weights is refused (the hashes both sides know are
      compared). None: not checked.

  Raises:
    ConfigError: config.json is corrupted or records a different
      configuration (the message names the first differing field).
    WorkdirError: the workdir was started with other weights, or config.json
      cannot be written.
  """
  path = os.path.join(workdir, "config.json")
  config = json.loads(json.dumps(config, sort_keys=True))
  config.pop(WEIGHTS_KEY, None)
  weights = dict(weights or {})
  if not os.path.exists(path):
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise disk_error(e, workdir) from e
    write_json(path, {**config, WEIGHTS_KEY: weights} if weights else config)
    return
  try:
    with open(path) as f:
      previous = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is corrupted ({e}); use another --workdir") from e
  except OSError as e:
    raise WorkdirError(f"cannot read {path}: {os_error_message(e)}") from e
  if not isinstance(previous, dict):
    raise ConfigError(f"{path} is corrupted (not a JSON object); use another "
                      "--workdir")
  recorded = previous.pop(WEIGHTS_KEY, None) or {}
  diff = first_difference(previous, config)
  if diff:
    raise ConfigError(
        f"workdir {workdir} holds {what} of a different configuration "
        f"({diff}); use another --workdir or the same flags")
  if weights:
    for kind in ("sha256", "fingerprint"):
      if kind in recorded and kind in weights and recorded[kind] != weights[kind]:
        raise WorkdirError(
            f"workdir {workdir} was started with other model weights (weights "
            f"{kind} {recorded[kind]} in the workdir, {weights[kind]} now): "
            "resuming would mix two models' rows; restore those weights or "
            "pass another --workdir")
    if any(k not in recorded for k in weights):
      # A workdir of an older version, or a hash this version adds: record it.
      write_json(path, {**previous, WEIGHTS_KEY: {**weights, **recorded}})
