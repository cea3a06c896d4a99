"""Exactly-once TSV rows across kills and restarts (`ResumableRun`)."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from experiments.common.files import WorkdirError
from experiments.common.files import atomic_write_text
from experiments.common.files import disk_error
from experiments.common.workdir import acquire_workdir
from experiments.common.workdir import check_workdir_config
from experiments.common.workdir import release_workdir


class ResumableRun:
  """Exactly-once result rows in several TSV files, across kills and restarts.

  A workdir records the configuration it was started with (`config.json`)
  and, in `done.txt`, each input whose rows are all written. An input's rows
  are appended (flushed and fsync'ed) to every TSV first and its index is
  appended to `done.txt` last. On a restart, each TSV is cut back to the rows
  of inputs listed in `done.txt`, so rows of an input that was interrupted
  anywhere, half-written rows included, are dropped and computed again.

  A workdir started with a different configuration (or other model weights)
  is refused: resuming never mixes two configurations in one file. The run
  holds the workdir's lock (`workdir_lock`) from construction until `close()`
  (or until it is garbage collected): a second process cannot write it.
  """

  def __init__(self, workdir: str, config: Mapping[str, Any], *,
               weights: Mapping[str, str] | None = None):
    self.workdir = workdir
    self._done_path = os.path.join(workdir, "done.txt")
    self._lock = acquire_workdir(workdir)
    try:
      check_workdir_config(workdir, config, "results", weights=weights)
      self.done = self._read_done()
    except BaseException:
      self.close()
      raise
    self._cleaned: set[str] = set()

  def close(self) -> None:
    lock, self._lock = getattr(self, "_lock", None), None
    if lock is not None:
      release_workdir(lock)

  def __enter__(self) -> "ResumableRun":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _read_done(self) -> list[int]:
    if not os.path.exists(self._done_path):
      return []
    try:
      with open(self._done_path) as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise WorkdirError(f"cannot read {self._done_path}: {e}") from e
    lines = text.split("\n")
    done = []
    for number, line in enumerate(lines[:-1], 1):
      if not line.strip():
        continue
      if not line.strip().isdigit():
        raise WorkdirError(
            f"{self._done_path} line {number} is {line[:40]!r}, not an input "
            "index: the file is damaged; delete that line (its input is "
            "computed again) or pass another --workdir")
      done.append(int(line))
    if lines[-1]:
      # A line without its newline is an interrupted append: not done. It is
      # cut off now, or the next append would run on from it.
      atomic_write_text(self._done_path, "".join(f"{i}\n" for i in done))
    return done

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
      if len(kept) > 1 and lines[0] + "\n" != header:
        # Rows of other columns (an older version of the job) under this
        # header would make the file unreadable.
        raise WorkdirError(
            f"{path} has other columns than this run writes: it was written "
            "by another version of ovc_jax; pass another --workdir")
    atomic_write_text(path, "".join(kept))

  def _append(self, path: str, text: str) -> None:
    try:
      with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise disk_error(e, path) from e

  def commit(self, idx: int, rows: Mapping[str, tuple[str, str]]) -> None:
    """Writes input `idx`'s rows: {tsv path: (header line, row line)}."""
    for path, (header, row) in rows.items():
      self._prepare(path, header)
      self._append(path, row)
    self._append(self._done_path, f"{idx}\n")
    self.done.append(idx)

  def remaining(self, indices: Iterable[int]) -> list[int]:
    done = set(self.done)
    return [i for i in indices if i not in done]
