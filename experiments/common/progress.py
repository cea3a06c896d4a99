"""What a long run prints while it works: items done, rate, ETA; and timing."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def format_duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0.0)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Prints items done, items left, the rate and an ETA, one line per update.

  The rate is an exponential moving average of the seconds per item of the
  recent updates (weight `smoothing` on the newest), so that the ETA follows
  a run whose items get slower or faster; `per` says what one item counts
  (e.g. "all prompts and methods of one input").
  """

  def __init__(self, total: int, what: str = "inputs", stream=None,
               already_done: int = 0, per: str = "", smoothing: float = 0.3):
    self.total = total
    self.what = what
    self.done = already_done
    self.stream = stream or sys.stderr
    self.per = per
    self.smoothing = smoothing
    self._last = time.perf_counter()
    self._counted = 0  # items timed in this process (resumed ones are not)
    self.rate: float | None = None  # smoothed seconds per item

  def update(self, count: int = 1, note: str = "") -> None:
    now = time.perf_counter()
    self.done += count
    self._counted += count
    if count > 0:
      recent = (now - self._last) / count
      self.rate = (recent if self.rate is None else
                   self.smoothing * recent + (1 - self.smoothing) * self.rate)
    self._last = now
    rate = self.rate or 0.0
    left = max(self.total - self.done, 0)
    unit = self.what[:-1] if self.what.endswith("s") else self.what
    per = f" ({self.per})" if self.per else ""
    line = (f"[{self.done}/{self.total} {self.what} done, {left} left] "
            f"{rate:.2f} s/{unit}{per}, ETA {format_duration(rate * left)}")
    if note:
      line += f"  {note}"
    self.stream.write(line + "\n")
    self.stream.flush()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(fn(), the seconds it took on the wall clock)."""
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start
