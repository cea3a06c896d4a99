"""Config fields that hold lists: of numbers, or of names.

ml_collections hands a list field over as a tuple, a single value or the one
string `a,b` of `--config.FIELD=a,b`; these turn each into a checked tuple or
a ConfigError naming the flag and the bad entry.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

from ovc_jax.errors import ConfigError


def check_number_list(values: Any, field: str, *, minimum: float = 0.0,
                      allow_minimum: bool = False, integer: bool = False,
                      allow_empty: bool = False) -> tuple:
  """A config list of numbers: each finite and above `minimum`, none twice.

  Args:
    values: the field's value (ml_collections turns an unparseable
      `--config.FIELD=...` into a tuple holding the text).
    field: the field's path, for the message (`--config.FIELD`).
    minimum: the bound every number must exceed (or reach, with
      `allow_minimum`).
    integer: whole numbers only.
    allow_empty: an empty list is fine.

  Returns:
    The values as a tuple.

  Raises:
    ConfigError: naming the flag and the bad entry.
  """
  flag = f"--config.{field}"
  example = f"{flag}=1,2" if integer else f"{flag}=0.25,0.5"
  if isinstance(values, (str, numbers.Number)):
    values = (values,)
  values = tuple(values)
  if all(isinstance(v, str) and not v.strip(" ,") for v in values):
    values = ()  # "--config.FIELD=" or "--config.FIELD=,"
  if not values and not allow_empty:
    raise ConfigError(f"{flag} is empty; give one or more numbers separated by "
                      f"commas, e.g. {example}")
  bound = ">=" if allow_minimum else ">"
  for v in values:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      raise ConfigError(
          f"{flag} holds {v!r}, which is not a number; give "
          f"{'whole ' if integer else ''}numbers {bound} {minimum:g} "
          f"separated by commas, e.g. {example}")
    if integer and float(v) != int(v):
      raise ConfigError(f"{flag} holds {v!r}, which is not a whole number")
    if not math.isfinite(float(v)) or (v < minimum if allow_minimum
                                       else v <= minimum):
      raise ConfigError(f"{flag} holds {v!r}; each entry must be a finite "
                        f"number {bound} {minimum:g}")
  seen = set()
  for v in values:
    if float(v) in seen:
      raise ConfigError(
          f"{flag} lists {v!r} twice; each value is computed once, so give it "
          "once")
    seen.add(float(v))
  return values


def check_name_list(values: Any, field: str, choices: Iterable[str] | None = None
                    ) -> tuple:
  """A config list of names: non-empty strings (of `choices`), none twice."""
  flag = f"--config.{field}"
  if isinstance(values, str):
    values = (values,)
  values = tuple(values)
  if len(values) == 1 and isinstance(values[0], str) and "," in values[0]:
    # --config.FIELD=a,b arrives as the one string 'a,b'.
    values = tuple(v.strip() for v in values[0].split(",") if v.strip())
  if not values:
    raise ConfigError(f"{flag} is empty")
  choices = tuple(choices) if choices is not None else None
  for v in values:
    if not isinstance(v, str) or not v.strip():
      raise ConfigError(f"{flag} holds {v!r}, which is not a name")
    if choices is not None and v not in choices:
      raise ConfigError(f"{flag} holds {v!r}; choose from {', '.join(choices)}")
  if len(set(values)) != len(values):
    twice = next(v for v in values if values.count(v) > 1)
    raise ConfigError(f"{flag} lists {twice!r} twice; give it once")
  return values
