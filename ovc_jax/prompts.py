"""Prompt templates and class names: the built-in ones, and user-given ones.

`templates_for` and `class_names_for` give a dataset's built-in lists (CLIP's
published ones, `ovc_jax.clip_lists`, or the toy world's templates); the
`load_*` and `validate_*` functions read and check user-given lists. A
template holds one `{}` that the class name replaces.

Modified-IRS needs the templates split into *known* prompts, certified first,
and *novel* prompts, certified afterwards from what the known ones left.
`split_templates` makes that split from a seed, reproducibly; `NUM_NOVEL`
holds each dataset's default number of novel prompts (see
`ovc_jax.dataset_settings`).
"""

from __future__ import annotations

import os
import string
from typing import Sequence

import numpy as np

# The built-in lists and NUM_NOVEL are re-exported here for callers.
from ovc_jax.clip_lists import (CIFAR10_CLASSES, CIFAR10_TEMPLATES,
                                IMAGENET_CLASSES, IMAGENET_TEMPLATES)
from ovc_jax.dataset_settings import NUM_NOVEL, SETTINGS
from ovc_jax.errors import ConfigError

# Datasets with built-in class names. The toy world's come from its
# batches.meta.
DATASETS = tuple(n for n, s in SETTINGS.items() if s.class_names is not None)

# Source strings with one of these are read as a list; ';' wins, so that
# entries may contain commas ("a photo of a {}, a type of pet.;...").
_SEPARATORS = (";", ",")


def templates_for(dataset: str) -> list[str]:
  """CLIP's templates for 'cifar10' or 'imagenet'; the toy world's for 'toy'."""
  if dataset not in SETTINGS:
    raise ConfigError(f"no built-in templates for dataset {dataset!r}; "
                      f"known: {sorted(SETTINGS)} (or give a template list)")
  return list(SETTINGS[dataset].templates)


def class_names_for(dataset: str) -> list[str]:
  """CLIP's class names of `dataset` ('cifar10', 'imagenet'), in label order."""
  if dataset not in DATASETS:
    hint = (" (the toy world's names are in its batches.meta: use "
            "datasets.load_dataset('toy').class_names)" if dataset == "toy"
            else "")
    raise ConfigError(f"no built-in class names for dataset {dataset!r}; "
                      f"known: {sorted(DATASETS)}{hint}")
  return list(SETTINGS[dataset].class_names)


def _read_entries(source: str | os.PathLike | Sequence[str],
                  what: str) -> list[str]:
  """A list of strings from a list, a separated string or a text file.

  A string naming an existing file is read as UTF-8, one entry per line;
  blank lines and lines starting with '#' are skipped. Any other string is
  split on ';' if it has one, else on ','. Entries are stripped of surrounding
  whitespace; empty ones are kept so that validation can name them.
  """
  if isinstance(source, os.PathLike) or (
      isinstance(source, str) and os.path.isfile(source)):
    path = os.fspath(source)
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise ConfigError(f"cannot read {what} file {path}: {e}") from e
    entries = [l.strip() for l in lines]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
      raise ConfigError(f"{what} file {path} has no entries (one per line; "
                        "blank lines and '#' comments are skipped)")
    return entries
  if isinstance(source, str):
    if source.endswith(".txt"):
      raise ConfigError(f"{what} file {source} does not exist")
    sep = next((s for s in _SEPARATORS if s in source), None)
    parts = source.split(sep) if sep else [source]
    # A trailing separator ("a, b;") does not make an empty last entry.
    if sep and parts[-1].strip() == "":
      parts = parts[:-1]
    return [p.strip() for p in parts]
  if isinstance(source, Sequence):
    return list(source)  # validation names any entry that is not a string
  raise ConfigError(f"{what} must be a list of strings, a ';'/','-separated "
                    f"string or a text file; got {type(source).__name__}")


def validate_templates(templates: Sequence[str]) -> list[str]:
  """Checks a template list; returns it as a list.

  Every template must hold exactly one `{}` placeholder and no other format
  field (`{0}`, `{name}` or a stray brace would break `str.format`), and no
  template may repeat: a novel prompt equal to a known one tests nothing.

  Raises:
    ConfigError: naming the first bad template.
  """
  if isinstance(templates, str) or not isinstance(templates, Sequence):
    raise ConfigError(
        f"templates must be a list of strings; got {type(templates).__name__}")
  templates = list(templates)
  if not templates:
    raise ConfigError("the template list is empty")
  seen = set()
  for i, t in enumerate(templates):
    if not isinstance(t, str):
      raise ConfigError(f"template {i} is not a string: {t!r}")
    try:
      fields = [f for _, f, _, _ in string.Formatter().parse(t)
                if f is not None]
    except ValueError as e:
      raise ConfigError(
          f"template {i} {t!r} is not a valid format string: {e} (write a "
          "literal brace as '{{' or '}}')") from e
    if fields != [""] or "{}" not in t:
      raise ConfigError(
          f"template {i} {t!r} must contain exactly one '{{}}' placeholder "
          f"for the class name and no other format field; found "
          f"{len(fields)} field(s)")
    if t in seen:
      raise ConfigError(f"template {i} {t!r} is repeated")
    seen.add(t)
  return templates


def validate_class_names(names: Sequence[str], *,
                         allow_duplicates: bool = False) -> list[str]:
  """Checks a class-name list; returns it as a list.

  Names must be non-empty strings and, unless `allow_duplicates`, distinct: two
  classes with one name get one text embedding, and argmax then never picks the
  second. CLIP's published ImageNet list has two such pairs (see
  `IMAGENET_CLASSES`); pass `allow_duplicates=True` to keep it as published.

  Raises:
    ConfigError: naming the first bad or repeated name.
  """
  if isinstance(names, str) or not isinstance(names, Sequence):
    raise ConfigError(
        f"class names must be a list of strings; got {type(names).__name__}")
  names = list(names)
  if not names:
    raise ConfigError("the class-name list is empty")
  first = {}
  for i, n in enumerate(names):
    if not isinstance(n, str):
      raise ConfigError(f"class name {i} is not a string: {n!r}")
    if not n.strip():
      raise ConfigError(f"class name {i} is empty")
    if n in first and not allow_duplicates:
      raise ConfigError(f"class name {n!r} appears twice (classes {first[n]} "
                        f"and {i})")
    first.setdefault(n, i)
  return names


def load_templates(source: str | os.PathLike | Sequence[str]) -> list[str]:
  """Templates from a list, a ';'/','-separated string or a UTF-8 text file.

  Args:
    source: a list of templates; a string naming an existing text file (one
      template per line, blank lines and '#' comment lines skipped); or a flag
      string split on ';' (or on ',' when it has no ';').

  Returns:
    The validated templates, in order.

  Raises:
    ConfigError: unreadable file, empty list, or a template without exactly
      one '{}'.
  """
  return validate_templates(_read_entries(source, "templates"))


def load_class_names(source: str | os.PathLike | Sequence[str], *,
                     allow_duplicates: bool = False) -> list[str]:
  """Class names from a list, a ','/';'-separated string or a text file.

  Same sources as `load_templates`; names are checked by
  `validate_class_names`.
  """
  return validate_class_names(_read_entries(source, "class names"),
                              allow_duplicates=allow_duplicates)


def split_permutation(num_items: int, seed: int) -> list[int]:
  """A permutation of range(num_items) that depends only on `seed`.

  Durstenfeld's shuffle driven by the raw 64-bit outputs of PCG64 seeded with
  `seed`: for i = n-1, ..., 1 swap items i and (next_raw() mod (i + 1)). The
  raw stream of a NumPy bit generator is fixed across NumPy versions (unlike
  `Generator.permutation`, whose algorithm NumPy may change), and the modulo
  bias is below n / 2^64.
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(
        f"split seed must be a non-negative integer; got {seed!r}")
  order = list(range(num_items))
  if num_items < 2:
    return order
  raw = np.random.PCG64(int(seed)).random_raw(num_items - 1)
  for k, i in enumerate(range(num_items - 1, 0, -1)):
    j = int(raw[k]) % (i + 1)
    order[i], order[j] = order[j], order[i]
  return order


def split_templates(templates: Sequence[str], num_novel: int,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits templates at random into known and novel prompts (Modified-IRS).

  The novel templates are those at the first `num_novel` positions of
  `split_permutation(len(templates), seed)`; both parts keep the templates'
  original order, so the split is a pure function of (templates, num_novel,
  seed) that a run can record and re-create.

  Args:
    templates: the templates (validated here).
    num_novel: how many to hold out, 1 <= num_novel < len(templates).
    seed: the split's seed, a non-negative integer.

  Returns:
    (known, novel): lists of len(templates) - num_novel and num_novel templates.
  """
  templates = validate_templates(templates)
  if (isinstance(num_novel, bool)
      or not isinstance(num_novel, (int, np.integer))
      or not 1 <= num_novel < len(templates)):
    raise ConfigError(f"num_novel must be an integer in [1, "
                      f"{len(templates) - 1}] for {len(templates)} templates; "
                      f"got {num_novel!r}")
  novel_idx = set(split_permutation(len(templates), seed)[:num_novel])
  known = [t for i, t in enumerate(templates) if i not in novel_idx]
  novel = [t for i, t in enumerate(templates) if i in novel_idx]
  return known, novel
