"""Wall times of a call: median, least, and repeated until the least is not luck."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of fn() (which must return host values or block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def min_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Least wall time of fn() over repeats: what the code costs when the
  shared machine lets it run (the benchmark's medians are kept beside)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def timings(fn: Callable[[], Any], repeats: int, *, min_total_s: float = 1.0,
            max_repeats: int = 50) -> dict:
  """Least and median wall time of fn() over `repeats` calls, or more (up to
  max_repeats) until min_total_s have passed: a cheap call is repeated until
  the least of its times is not just the luck of the shared machine."""
  times = []
  while (len(times) < repeats
         or (sum(times) < min_total_s and len(times) < max_repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"min_s": min(times), "median_s": statistics.median(times),
          "repeats": len(times)}
