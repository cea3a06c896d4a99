"""Captions of toy-world images, the zero-shot prompt templates, the vocabulary.

A caption describes its image truthfully: it names the image's class and, when
it mentions them, the image's real colour, size, style and background. Captions
are drawn from a small grammar,

    style-led:   "a {style} of {a|the} {size} {colour} {class} {on ...}."
    object-led:  "{a|the} {size} {colour} {class} {on ...}."
                 "{a|the} {size} {colour} {class} in a {style}."
    cartoons:    "a cartoon {size} {colour} {class} {on ...}."

with each optional part present or not at random, and `{style}` any phrase
that is true of the image: a blurry photo may be called a "blurry photo", a
"photo" or a "bad photo"; only a clean 'photo' is a "good photo"; a sketch is
also a "pencil sketch" or a "drawing". Every template of `TOY_TEMPLATES` is a
sentence of this grammar, so the text encoder sees the prompts it is later
certified with, each paired with the images it is true of.

`template_matches` says which templates are true of which images, for
per-template analyses; `vocabulary()` lists every word any caption or template
can contain (lower case, with '.' a word of its own), for a word-level
tokenizer.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ovc_jax.errors import ConfigError
from ovc_jax.toy_world import catalog as cat

TOY_CLASSES = cat.TOY_CLASSES

# The prompt templates for zero-shot classification and certification on the
# toy world: CIFAR-10's CLIP templates that make sense here (the first ten,
# verbatim) and style-, size- and background-specific ones. Each is true of a
# different subset of images (see `TEMPLATE_CONDITIONS`), so per-template
# accuracies differ, while the many near-duplicates ("a photo of a {}." /
# "a photo of the {}.") give novel prompts a close known prompt.
TOY_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a dark photo of the {}.",
    "a pixelated photo of a {}.",
    "a noisy photo of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a cartoon {}.",
    "a {} on a striped background.",
    "a photo of the large {}.",
)

# What each template says about an image besides its class: (styles it is
# true of, size it requires, background it requires); None: anything.
TEMPLATE_CONDITIONS: tuple[tuple[tuple[int, ...] | None, int | None,
                                 int | None], ...] = (
    (cat.PHOTO_STYLES, None, None),
    ((cat.BLURRY,), None, None),
    ((cat.BLACK_AND_WHITE,), None, None),
    ((cat.LOW_CONTRAST,), None, None),
    ((cat.HIGH_CONTRAST,), None, None),
    (cat.BAD_PHOTO_STYLES, None, None),
    ((cat.PHOTO,), None, None),
    (cat.PHOTO_STYLES, cat.SMALL, None),
    (cat.PHOTO_STYLES, cat.BIG, None),
    (cat.PHOTO_STYLES, None, None),
    ((cat.DARK,), None, None),
    ((cat.PIXELATED,), None, None),
    ((cat.NOISY,), None, None),
    ((cat.DRAWING, cat.SKETCH), None, None),
    ((cat.SKETCH,), None, None),
    ((cat.CARTOON,), None, None),
    (None, None, cat.STRIPED),
    (cat.PHOTO_STYLES, cat.BIG, None),
)
assert len(TEMPLATE_CONDITIONS) == len(TOY_TEMPLATES)


def _style_phrases() -> tuple[tuple[str, ...], ...]:
  """For each style, the phrases a caption may call it by (first: its name)."""
  phrases = []
  for s, name in enumerate(cat.STYLES):
    if s == cat.PHOTO:
      options = (name, "good photo")
    elif s in cat.PHOTO_STYLES:
      options = (name, "photo") + (
          ("bad photo",) if s in cat.BAD_PHOTO_STYLES else ())
    elif s == cat.SKETCH:
      options = (name, "pencil sketch", "drawing")
    else:
      options = (name,)
    phrases.append(options)
  return tuple(phrases)


STYLE_PHRASES = _style_phrases()
SIZE_PHRASES = {size: words for size, words in cat.SIZE_WORDS}
BACKGROUND_PHRASES = tuple(
    "on paper" if b == cat.PAPER else f"on a {name} background"
    for b, name in enumerate(cat.BACKGROUNDS))

# Probabilities of the grammar's optional parts.
_P_SIZE, _P_COLOUR, _P_BACKGROUND = 0.45, 0.45, 0.25
_P_STYLE_LED, _P_STYLE_SUFFIX, _P_THE = 0.65, 0.4, 0.3
# How often a style-led caption uses the style's own name (the rest: its
# other phrases, uniformly).
_P_STYLE_NAME = 0.6
_NUM_UNIFORMS = 9


def _choose(options: Sequence[str], u: float) -> str:
  return options[min(int(u * len(options)), len(options) - 1)]


def caption(label: int, style: int, colour: int, size: int, background: int,
            u: Sequence[float]) -> str:
  """One caption of an image from its attributes and 9 uniforms in [0, 1).

  Args:
    label: class index.
    style: style index.
    colour: colour index, or `catalog.NO_COLOUR` (then no colour is named).
    size: size index ('medium' is never named).
    background: background index.
    u: the random numbers that pick the caption's form and optional parts.
  """
  words = []
  if size in SIZE_PHRASES and u[0] < _P_SIZE:
    words.append(_choose(SIZE_PHRASES[size], u[1]))
  if colour != cat.NO_COLOUR and u[2] < _P_COLOUR:
    words.append(cat.COLOURS[colour])
  words.append(cat.TOY_CLASSES[label])
  thing = " ".join(words)
  where = (" " + BACKGROUND_PHRASES[background]
           if u[3] < _P_BACKGROUND else "")
  det = "the" if u[4] < _P_THE else "a"

  options = STYLE_PHRASES[style]
  if u[5] < _P_STYLE_NAME or len(options) == 1:
    phrase = options[0]
  else:
    phrase = _choose(options[1:], u[6])

  if u[7] < _P_STYLE_LED:
    if style == cat.CARTOON and u[8] < 0.5:
      return f"a cartoon {thing}{where}."
    return f"a {phrase} of {det} {thing}{where}."
  if u[8] < _P_STYLE_SUFFIX:
    return f"{det} {thing} in a {phrase}."
  return f"{det} {thing}{where}."


def sample_captions(rng: np.random.Generator, labels: np.ndarray,
                    attributes: dict[str, np.ndarray]) -> list[str]:
  """One caption per image; draws `rng.random((n, 9))` whatever the images.

  Args:
    rng: the generator (advanced).
    labels: int `[n]` classes.
    attributes: at least 'style', 'colour' (with `NO_COLOUR` where none is
      visible), 'size' and 'background', each int `[n]`.
  """
  labels = np.asarray(labels)
  u = rng.random((labels.shape[0], _NUM_UNIFORMS))
  columns = zip(labels.tolist(), attributes["style"].tolist(),
                attributes["colour"].tolist(), attributes["size"].tolist(),
                attributes["background"].tolist(), u.tolist())
  return [caption(*c) for c in columns]


def template_matches(attributes: dict[str, np.ndarray],
                     templates: Sequence[str] = TOY_TEMPLATES) -> np.ndarray:
  """bool `[n, len(templates)]`: is template t true of image i?

  Args:
    attributes: 'style', 'size' and 'background', each int `[n]`.
    templates: templates from `TOY_TEMPLATES` (any subset, any order).
  """
  style = np.asarray(attributes["style"])
  size = np.asarray(attributes["size"])
  background = np.asarray(attributes["background"])
  out = np.ones((style.shape[0], len(templates)), bool)
  for j, template in enumerate(templates):
    if template not in TOY_TEMPLATES:
      raise ConfigError(f"no conditions known for template {template!r}; "
                        "only TOY_TEMPLATES have them")
    styles, need_size, need_background = TEMPLATE_CONDITIONS[
        TOY_TEMPLATES.index(template)]
    if styles is not None:
      out[:, j] &= np.isin(style, styles)
    if need_size is not None:
      out[:, j] &= size == need_size
    if need_background is not None:
      out[:, j] &= background == need_background
  return out


_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def words(text: str) -> list[str]:
  """Lower-cased words and punctuation marks of `text` ('{}' removed)."""
  return _WORD.findall(text.replace("{}", " ").lower())


def vocabulary() -> list[str]:
  """Every word a caption or template can contain, sorted, each once."""
  pieces = ["a the of in on background paper cartoon ."]
  pieces += list(cat.TOY_CLASSES) + list(cat.COLOURS)
  pieces += [w for _, ws in cat.SIZE_WORDS for w in ws]
  pieces += [p for options in STYLE_PHRASES for p in options]
  pieces += list(BACKGROUND_PHRASES) + list(TOY_TEMPLATES)
  return sorted({w for p in pieces for w in words(p)})
