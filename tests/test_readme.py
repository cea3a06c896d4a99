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
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  prediction, radius, p_lower = capsys.readouterr().out.split()
  assert int(prediction) in range(-1, 10)
  assert float(radius) >= 0.0 and 0.0 <= float(p_lower) <= 1.0
