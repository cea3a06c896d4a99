"""The README's commands and its Python example are the ones that work."""

import os
import re

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


# The first line of the batched example; the OVC example is the other one.
BATCHED_MARKER = "# Certify a batch of toy images in one compiled call."


def _python_blocks():
  """(the OVC example, the batched example): the README has exactly one of
  each, told apart by the batched one's first line."""
  blocks = re.findall(r"```python\n(.*?)\n```", _readme(), flags=re.S)
  batched = [b for b in blocks if b.splitlines()[0] == BATCHED_MARKER]
  others = [b for b in blocks if b.splitlines()[0] != BATCHED_MARKER]
  assert len(batched) == 1 and len(others) == 1, len(blocks)
  return others[0], batched[0]


def test_readme_python_example_runs(capsys):
  block, _ = _python_blocks()
  assert len(block.splitlines()) <= 25
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  lines = capsys.readouterr().out.splitlines()
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


def test_readme_batched_example_runs(capsys):
  _, block = _python_blocks()
  assert len(block.splitlines()) <= 15
  assert "jax.jit(jax.vmap(" in block
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  lines = [line.rsplit(" ", 2) for line in capsys.readouterr().out.splitlines()]
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
