"""CLIP's prompt lists, loading user lists, the known/novel split."""

import json
import pathlib
import re

import pytest

from ovc_jax import prompts
from ovc_jax.errors import ConfigError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS_DIR = SHARED_DATA / "prompts"
needs_shared = pytest.mark.skipif(
    not PROMPTS_DIR.is_dir(),
    reason=(f"needs CLIP's published prompt lists: put clip_prompts.md (CLIP's "
            f"data/prompts.md) and clip_imagenet_prompts.json (imagenet_classes "
            f"and imagenet_templates of CLIP's notebook "
            f"Prompt_Engineering_for_ImageNet.ipynb) in {PROMPTS_DIR}"))


def _cifar10_section():
  """classes and templates of the CIFAR10 section of CLIP's prompts.md."""
  md = (PROMPTS_DIR / "clip_prompts.md").read_text(encoding="utf-8")
  section = md.split("## CIFAR10\n", 1)[1].split("\n## ", 1)[0]
  lists = {}
  for name in ("classes", "templates"):
    body = re.search(name + r" = \[(.*?)\n\]", section, re.S).group(1)
    lists[name] = re.findall(r"^\s*'(.*)',\s*$", body, re.M)
  return lists


@needs_shared
def test_cifar10_lists_match_clip():
  published = _cifar10_section()
  assert list(prompts.CIFAR10_CLASSES) == published["classes"]
  assert list(prompts.CIFAR10_TEMPLATES) == published["templates"]
  assert len(prompts.CIFAR10_CLASSES) == 10
  assert len(prompts.CIFAR10_TEMPLATES) == 18


@needs_shared
def test_imagenet_lists_match_clip():
  published = json.loads(
      (PROMPTS_DIR / "clip_imagenet_prompts.json").read_text(encoding="utf-8"))
  assert list(prompts.IMAGENET_CLASSES) == published["imagenet_classes"]
  assert list(prompts.IMAGENET_TEMPLATES) == published["imagenet_templates"]
  assert len(prompts.IMAGENET_CLASSES) == 1000
  assert len(prompts.IMAGENET_TEMPLATES) == 80


def test_builtin_lists_are_well_formed():
  for templates in (prompts.CIFAR10_TEMPLATES, prompts.IMAGENET_TEMPLATES):
    prompts.validate_templates(templates)
  prompts.validate_class_names(prompts.CIFAR10_CLASSES)
  # CLIP's ImageNet names repeat two names, as published.
  prompts.validate_class_names(prompts.IMAGENET_CLASSES, allow_duplicates=True)
  with pytest.raises(ConfigError, match="'missile' appears twice"):
    prompts.validate_class_names(prompts.IMAGENET_CLASSES)
  assert prompts.IMAGENET_CLASSES[0] == "tench"
  assert prompts.IMAGENET_CLASSES[999] == "toilet paper"


def test_templates_and_class_names_for():
  assert prompts.templates_for("cifar10") == list(prompts.CIFAR10_TEMPLATES)
  assert prompts.templates_for("imagenet") == list(prompts.IMAGENET_TEMPLATES)
  from ovc_jax.toy_world import TOY_TEMPLATES
  assert prompts.templates_for("toy") == list(TOY_TEMPLATES)
  assert prompts.class_names_for("cifar10") == list(prompts.CIFAR10_CLASSES)
  assert prompts.class_names_for("imagenet") == list(prompts.IMAGENET_CLASSES)
  # Copies: callers cannot change the constants.
  prompts.templates_for("cifar10").append("x {}")
  assert len(prompts.templates_for("cifar10")) == 18
  with pytest.raises(ConfigError, match="mnist"):
    prompts.templates_for("mnist")
  with pytest.raises(ConfigError, match="batches.meta"):
    prompts.class_names_for("toy")


@pytest.mark.parametrize("source, expected", [
    (["a {}.", "the {}."], ["a {}.", "the {}."]),
    ("a {}.;the {}.", ["a {}.", "the {}."]),
    ("a {}., the {}.", ["a {}.", "the {}."]),
    # ';' wins over ',', so templates may contain commas.
    ("a {}, a pet.; the {}.", ["a {}, a pet.", "the {}."]),
    ("a {}, a pet.;", ["a {}, a pet."]),
    ("a photo of a {}.", ["a photo of a {}."]),
])
def test_load_templates_from_list_and_flag(source, expected):
  assert prompts.load_templates(source) == expected


def test_load_from_file(tmp_path):
  path = tmp_path / "templates.txt"
  path.write_text("# my templates\n\na photo of a {}.\n"
                  "  a sketch of a {}, drawn.  \n\n# end\n", encoding="utf-8")
  expected = ["a photo of a {}.", "a sketch of a {}, drawn."]
  assert prompts.load_templates(str(path)) == expected
  assert prompts.load_templates(path) == expected
  names = tmp_path / "names.txt"
  names.write_text("chat\nchien\nécureuil\n", encoding="utf-8")
  assert prompts.load_class_names(str(names)) == ["chat", "chien", "écureuil"]
  assert prompts.load_class_names("cat, dog") == ["cat", "dog"]


def test_load_errors(tmp_path):
  with pytest.raises(ConfigError, match="missing.txt does not exist"):
    prompts.load_templates(str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("# nothing\n\n", encoding="utf-8")
  with pytest.raises(ConfigError, match="has no entries"):
    prompts.load_templates(str(empty))
  latin = tmp_path / "latin.txt"
  latin.write_bytes("caf\xe9 {}\n".encode("latin-1"))
  with pytest.raises(ConfigError, match="cannot read templates file"):
    prompts.load_templates(str(latin))
  with pytest.raises(ConfigError, match="list of strings"):
    prompts.load_templates(42)
  with pytest.raises(ConfigError, match="class name 1 is not a string"):
    prompts.load_class_names(["cat", 7])


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    (["a photo of a cat."], "'a photo of a cat.' must contain exactly one"),
    (["a {} and a {}."], "'a {} and a {}.' must contain exactly one"),
    (["a {0}."], "'a {0}.' must contain exactly one"),
    (["a {name}."], "must contain exactly one"),
    (["a {:>4}."], "must contain exactly one"),
    (["a {} }."], "not a valid format string"),
    (["a {}.", "a {}."], "'a {}.' is repeated"),
    (["a {}.", 3], "template 1 is not a string"),
    ("a {}.", "list of strings"),
])
def test_validate_templates_names_the_bad_one(bad, match):
  with pytest.raises(ConfigError, match=re.escape(match) if "{" in match
                     else match):
    prompts.validate_templates(bad)


def test_validate_templates_accepts_escaped_braces():
  assert prompts.validate_templates(["a {} {{tag}}."]) == ["a {} {{tag}}."]


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    (["cat", ""], "class name 1 is empty"),
    (["cat", "  "], "class name 1 is empty"),
    (["cat", "dog", "cat"], "'cat' appears twice .classes 0 and 2."),
    (["cat", None], "class name 1 is not a string"),
])
def test_validate_class_names(bad, match):
  with pytest.raises(ConfigError, match=match):
    prompts.validate_class_names(bad)


def test_split_is_seeded_and_recorded():
  templates = list(prompts.IMAGENET_TEMPLATES)
  known, novel = prompts.split_templates(templates, 10, seed=0)
  assert len(known) == 70 and len(novel) == 10
  assert set(known).isdisjoint(novel) and set(known) | set(novel) == set(
      templates)
  # Both parts keep the published order.
  assert known == [t for t in templates if t in known]
  assert novel == [t for t in templates if t in novel]
  assert prompts.split_templates(templates, 10, seed=0) == (known, novel)
  assert prompts.split_templates(templates, 10, seed=1) != (known, novel)


def test_split_golden_values():
  # Pinned: the PCG64 raw stream is stable across NumPy versions, so a change
  # here means the split algorithm changed and recorded runs no longer match.
  assert prompts.split_permutation(18, 0) == [
      6, 0, 2, 10, 5, 7, 9, 16, 4, 17, 1, 3, 14, 13, 15, 8, 12, 11]
  _, novel = prompts.split_templates(prompts.CIFAR10_TEMPLATES,
                                     prompts.NUM_NOVEL["cifar10"], 0)
  assert novel == ["a photo of a {}.", "a black and white photo of a {}.",
                   "a good photo of a {}."]
  _, novel = prompts.split_templates(prompts.IMAGENET_TEMPLATES,
                                     prompts.NUM_NOVEL["imagenet"], 0)
  assert novel == [
      "a bad photo of a {}.", "a black and white photo of the {}.",
      "a sculpture of the {}.", "a cropped photo of a {}.", "a plastic {}.",
      "a photo of the dirty {}.", "a blurry photo of a {}.",
      "a jpeg corrupted photo of the {}.", "a black and white photo of a {}.",
      "a photo of a small {}."]


def test_split_permutation_is_a_permutation():
  for n in (0, 1, 2, 18, 80):
    for seed in (0, 1, 123):
      assert sorted(prompts.split_permutation(n, seed)) == list(range(n))


@pytest.mark.parametrize("num_novel", [0, 18, -1, 2.5, True])
def test_split_rejects_bad_num_novel(num_novel):
  with pytest.raises(ConfigError, match="num_novel"):
    prompts.split_templates(prompts.CIFAR10_TEMPLATES, num_novel, 0)


def test_split_rejects_bad_seed():
  with pytest.raises(ConfigError, match="seed"):
    prompts.split_templates(prompts.CIFAR10_TEMPLATES, 3, -1)
