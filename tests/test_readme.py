"""The README's commands, its Python example and the main job's output are
the ones that work and what the code prints."""

import ast
import io
import os
import re
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_ci_runs_exactly_the_readme_test_command():
  blocks = re.findall(r"```\n(.*?)\n```", _readme(), flags=re.S)
  test_command = [b for b in blocks if "pytest" in b]
  assert len(test_command) == 1
  with open(os.path.join(REPO, ".ci", "run")) as f:
    commands = [line for line in f.read().splitlines()
                if line and not line.startswith("#") and not line.startswith(
                    ("set ", "cd "))]
  assert commands == [test_command[0]]


def test_readme_is_short():
  assert len(_readme().splitlines()) <= 300


def _example_and_output():
  """The README's first Python block and the output block right after it."""
  m = re.search(r"```python\n(.*?)\n```\n\nIt prints:\n\n```text\n(.*?)\n```",
                _readme(), flags=re.S)
  assert m, "the library example must be followed by 'It prints:' and its output"
  return m.group(1), m.group(2)


@pytest.mark.heavy
def test_readme_python_example_runs(capsys):
  block, expected = _example_and_output()
  assert len(block.splitlines()) <= 25
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  # The noise is keyed and every value printed is rounded: the output is
  # deterministic, so the README shows it exactly.
  assert printed == expected + "\n"
  lines = printed.splitlines()
  assert lines[0].startswith("known ")
  by_method = {line.split()[0]: line.split() for line in lines[1:]}
  assert set(by_method) == {"standard", "irs", "cached", "mvn"}
  from ovc_jax import toy_world  # pylint: disable=g-import-not-at-top
  for method, (_, name, radius, approximate) in by_method.items():
    assert name in toy_world.TOY_CLASSES or name == "abstain"
    assert float(radius) >= 0.0
    assert approximate == str(method == "mvn")
  # Cached-OVC is standard RS, bit for bit.
  assert by_method["cached"] == ["cached"] + by_method["standard"][1:]


def _main_job_block():
  blocks = [b for b in re.findall(r"```\n(.*?)\n```", _readme(), flags=re.S)
            if b.startswith("model: ")]
  assert len(blocks) == 1, "the README shows the main job's output once"
  return blocks[0]


def _parse_main_job_block(block):
  """The values in the README's copy of the main job's output."""
  # pylint: disable=g-import-not-at-top
  from experiments.common import certify_job
  by_label = {label: name for name, label in certify_job.METHOD_NAMES.items()}
  inputs = int(re.search(r"^dataset: \w+, (\d+) inputs,", block, re.M).group(1))
  sigma = re.search(r"^sigma = (\S+)$", block, re.M).group(1)
  results = re.search(r"^results: (\S+)/summary\.json, .* and (\S+)$", block,
                      re.M)
  methods = {}
  radii = ["0", "0.25", "0.5", "1"]
  for line in block.splitlines():
    role = line.split(" ", 1)[0]
    if role not in ("known", "novel"):
      continue
    rest = line[len(role):].strip()
    label = max((l for l in by_label if rest.startswith(l + " ")), key=len)
    values = rest[len(label):].split()
    entry = {"certified_accuracy": dict(zip(radii, map(float, values[:4]))),
             "seconds_per_input": float(values[4])}
    if len(values) == 6:
      entry["speedup_over_standard"] = float(values[5].rstrip("x"))
    methods[f"{role}/{by_label[label]}/sigma_{sigma}"] = entry
  identical = re.search(r"^Cached-OVC identical to standard RS: (.*)$", block,
                        re.M).group(1)
  summary = {"model": {"name": block.split()[1],
                       "note": certify_job.MODEL_NOTE},
             "inputs": inputs, "methods": methods,
             "cached_identical_to_standard": ast.literal_eval(identical),
             "figure": results.group(2)}
  return results.group(1), summary


def test_readme_main_job_output_is_what_certify_prints():
  """The README's block is print_report's output, byte for byte, for the
  default config and the values the block shows (the job itself is too slow
  to run here; tests/test_experiments.py runs it at CI size)."""
  # pylint: disable=g-import-not-at-top
  from experiments.common import certify_job
  from experiments.configs import certify as certify_configs
  block = _main_job_block()
  workdir, summary = _parse_main_job_block(block)
  assert workdir == os.path.join("workdirs", "certify")  # the default run
  assert set(summary["methods"]) == {
      "known/standard/sigma_0.25", "novel/standard/sigma_0.25",
      "novel/irs/sigma_0.25", "novel/cached/sigma_0.25",
      "novel/mvn/sigma_0.25"}
  setup = types.SimpleNamespace(config=certify_configs.get_config(),
                                workdir=workdir)
  stream = io.StringIO()
  certify_job.print_report(setup, summary, stream=stream)
  assert stream.getvalue() == "\n" + block + "\n"
  # What the README says about it: Cached-OVC is standard RS on the novel prompts.
  accuracy = {k: v["certified_accuracy"] for k, v in summary["methods"].items()}
  assert accuracy["novel/cached/sigma_0.25"] == accuracy["novel/standard/sigma_0.25"]


# The first line of the batched example.
BATCHED_MARKER = "# Certify a batch of toy images in one compiled call."


def test_readme_batched_example_runs(capsys):
  m = re.search(r"```python\n(" + re.escape(BATCHED_MARKER) +
                r".*?)\n```\n\nIt prints[^\n]*:\n\n```text\n(.*?)\n```",
                _readme(), flags=re.S)
  assert m, "the batched example must be followed by its output"
  block, expected = m.group(1), m.group(2)
  assert len(block.splitlines()) <= 15
  assert "jax.jit(jax.vmap(" in block
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert printed == expected + "\n"
  lines = [line.rsplit(" ", 2) for line in printed.splitlines()]
  assert len(lines) == 8
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from ovc_jax import datasets, models, preprocessing, sampler, toy_world, zeroshot
  from ovc_jax.certificates import SmoothingParams
  from ovc_jax.certifiers import standard
  from ovc_jax.classifiers import EmbeddingClassifier
  test = datasets.load_dataset("toy")
  for i, (true_name, predicted, radius) in enumerate(lines):
    assert true_name == test.class_names[test.labels[i]]
    assert predicted in toy_world.TOY_CLASSES or predicted == "abstain"
    assert float(radius) >= 0.0
  assert sum(p != "abstain" for _, p, _ in lines) >= 4
  # The first and last inputs as standard.certify certifies them alone.
  clip = models.load_clip("toy")
  classifier = EmbeddingClassifier(clip.model.embed_images)
  params = classifier.params(clip.params, zeroshot.class_embeddings(
      clip, "a photo of a {}.", test.class_names))
  smoothing = SmoothingParams(sigma=0.25, n0=100, n=1000, batch_size=100)
  for i in (0, 7):
    x = preprocessing.preprocess(
        jnp.asarray(test.images[i], jnp.float32) / 255, clip.preprocess)
    cert = standard.certify(sampler.input_key(0, i), classifier, params, x,
                            smoothing)
    name = test.class_names[cert.prediction] if cert.prediction >= 0 else (
        "abstain")
    assert lines[i][1] == name
    assert cert.radius - 1e-4 <= float(lines[i][2]) <= cert.radius + 5e-5
