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


def test_readme_python_example_runs(capsys):
  block, = re.findall(r"```python\n(.*?)\n```", _readme(), flags=re.S)
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
