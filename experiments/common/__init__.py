"""What every experiment entry point shares: error handling, progress, resumable output.

Library code takes plain arguments; this module is where flags and configs meet
it. A mistake of the user's (`ovc_jax.errors.OVCError`) ends the program with
one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

from ovc_jax.errors import ConfigError, OVCError

# JAX logs at INFO that it found no TPU on every start; not news to a user.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorator for absl mains: OVCError -> one-line message, exit status 1."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except OVCError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      sys.exit(1)

  return wrapped


def format_duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0.0)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Prints items done, items left, the rate and an ETA, one line per update."""

  def __init__(self, total: int, what: str = "inputs", stream=None,
               already_done: int = 0):
    self.total = total
    self.what = what
    self.done = already_done
    self.stream = stream or sys.stderr
    self._start = time.perf_counter()
    self._counted = 0  # items timed in this process (resumed ones are not)

  def update(self, count: int = 1, note: str = "") -> None:
    self.done += count
    self._counted += count
    elapsed = time.perf_counter() - self._start
    rate = elapsed / self._counted if self._counted else 0.0
    left = self.total - self.done
    line = (f"[{self.done}/{self.total} {self.what} done, {left} left] "
            f"{rate:.2f} s/{self.what.rstrip('s')}, "
            f"ETA {format_duration(rate * left)}")
    if note:
      line += f"  {note}"
    self.stream.write(line + "\n")
    self.stream.flush()


def atomic_write_text(path: str, text: str) -> None:
  """Writes a file via a temporary file and a rename: whole or not at all."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for k in sorted(set(a) | set(b)):
      diff = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
      if diff:
        return diff
    return None
  return None if a == b else f"{path}: {a!r} in the workdir, {b!r} now"


def check_workdir_config(workdir: str, config: Mapping[str, Any],
                         what: str) -> None:
  """Records `config` in a new workdir's config.json; refuses another one.

  Args:
    workdir: the run's directory (created if missing).
    config: the run's configuration as JSON values.
    what: what the workdir holds, for the message ("results", "a training
      run").

  Raises:
    ConfigError: config.json is corrupted or records a different
      configuration (the message names the first differing field).
  """
  path = os.path.join(workdir, "config.json")
  config = json.loads(json.dumps(config, sort_keys=True))
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    write_json(path, config)
    return
  with open(path) as f:
    try:
      previous = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is corrupted: {e}") from e
  diff = _first_difference(previous, config)
  if diff:
    raise ConfigError(
        f"workdir {workdir} holds {what} of a different configuration "
        f"({diff}); use another --workdir or the same flags")


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure to `path` through a temporary file (a killed
  run leaves no half-written PNG) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  os.replace(tmp, path)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)


class ResumableRun:
  """Exactly-once result rows in several TSV files, across kills and restarts.

  A workdir records the configuration it was started with (`config.json`)
  and, in `done.txt`, each input whose rows are all written. An input's rows
  are appended (flushed and fsync'ed) to every TSV first and its index is
  appended to `done.txt` last. On a restart, each TSV is cut back to the rows
  of inputs listed in `done.txt`, so rows of an input that was interrupted
  anywhere, half-written rows included, are dropped and computed again.

  A workdir started with a different configuration is refused: resuming never
  mixes two configurations in one file.
  """

  def __init__(self, workdir: str, config: Mapping[str, Any]):
    self.workdir = workdir
    self._done_path = os.path.join(workdir, "done.txt")
    check_workdir_config(workdir, config, "results")
    self.done = self._read_done()
    self._cleaned: set[str] = set()

  def _read_done(self) -> list[int]:
    if not os.path.exists(self._done_path):
      return []
    with open(self._done_path) as f:
      text = f.read()
    # A line without its newline is an interrupted append: not done.
    return [int(line) for line in text.split("\n")[:-1] if line.strip()]

  def prepare(self, tables: Mapping[str, str]) -> None:
    """Cleans every TSV this run writes ({path: header line}) before it starts."""
    for path, header in tables.items():
      self._prepare(path, header)

  def _prepare(self, path: str, header: str) -> None:
    """Cuts an existing TSV back to the rows of done inputs (once per run)."""
    if path in self._cleaned:
      return
    self._cleaned.add(path)
    done = set(self.done)
    kept = [header]
    if os.path.exists(path):
      with open(path) as f:
        lines = f.read().split("\n")
      for line in lines[1:-1]:  # the last element is '' or a partial row
        idx = line.split("\t", 1)[0]
        if idx.isdigit() and int(idx) in done:
          kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))

  def commit(self, idx: int, rows: Mapping[str, tuple[str, str]]) -> None:
    """Writes input `idx`'s rows: {tsv path: (header line, row line)}."""
    for path, (header, row) in rows.items():
      self._prepare(path, header)
      with open(path, "a") as f:
        f.write(row)
        f.flush()
        os.fsync(f.fileno())
    with open(self._done_path, "a") as f:
      f.write(f"{idx}\n")
      f.flush()
      os.fsync(f.fileno())
    self.done.append(idx)

  def remaining(self, indices: Iterable[int]) -> list[int]:
    done = set(self.done)
    return [i for i in indices if i not in done]


def write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
