"""The code's layering, read from its import statements (no import runs).

experiments/ imports no module of its own in a cycle (in functions included:
a cycle hidden in a function body is still a cycle), and the library,
ovc_jax/, imports nothing from experiments/.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _module_name(path: pathlib.Path, root: pathlib.Path = REPO) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imported(path: pathlib.Path, root: pathlib.Path = REPO) -> set[str]:
  """Every module name an import statement of `path` names, anywhere in it
  (`from a import b` names both a.b and a: b may be a module or a name)."""
  out = set()
  package = _module_name(path, root).split(".")
  if path.name != "__init__.py":
    package.pop()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the file's package upwards
        up = package[:len(package) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)
  return out


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """{module: the modules under `root` it imports} for every .py under root."""
  files = {_module_name(p): p for p in root.rglob("*.py")}
  return {name: {m for m in _imported(path) if m in files and m != name}
          for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a] of the graph, or None."""
  state = {}  # absent: not seen; 1: on the current path; 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c",
                                                              "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_in_function_bodies_too(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
  (tmp_path / "pkg" / "b.py").write_text(
      "def f():\n  from pkg import a\n  return a\n")
  files = {p.stem: p for p in (tmp_path / "pkg").glob("*.py")}
  assert "pkg.b" in _imported(files["a"], tmp_path)
  assert "pkg.a" in _imported(files["b"], tmp_path)


def test_experiments_import_no_cycle():
  graph = import_graph(REPO / "experiments")
  common = "experiments.common"
  # The graph is the real one: the job modules and their shared parts.
  assert {f"{common}.cli", f"{common}.files", f"{common}.workdir",
          f"{common}.resumable", f"{common}.progress"} <= graph[common]
  assert f"{common}.certify_job" in graph[f"{common}.distributed"]
  assert f"{common}.distributed_record" in graph[f"{common}.certify_job"]
  assert "experiments.bench.large" in graph["experiments.benchmark"]
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_shared_modules_do_not_import_the_jobs():
  graph = import_graph(REPO / "experiments")
  shared = [f"experiments.common.{m}" for m in
            ("cli", "config_lists", "files", "workdir", "resumable",
             "progress")] + ["experiments.common"]
  for name in shared:
    assert graph[name] <= set(shared), (name, graph[name] - set(shared))


def test_the_library_imports_nothing_from_experiments():
  offenders = sorted(
      f"{path.relative_to(REPO)}: {name}"
      for path in (REPO / "ovc_jax").rglob("*.py")
      for name in _imported(path)
      if name == "experiments" or name.startswith("experiments."))
  assert len(list((REPO / "ovc_jax").rglob("*.py"))) > 20
  assert not offenders, offenders
