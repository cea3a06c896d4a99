"""Every relative link and image in README.md and docs/*.md resolves, and the
README's Layout and Experiments table name every module and entry point."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text):
  """The text without fenced code blocks and inline code spans."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading):
  """GitHub's anchor for a heading."""
  heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return heading.replace(" ", "-")


def _anchors(path):
  anchors, seen = set(), {}
  for line in _prose(path.read_text(encoding="utf-8")).splitlines():
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      slug = _slug(m.group(1))
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def _links(path):
  return [m.group(1) for m in LINK.finditer(_prose(path.read_text(
      encoding="utf-8")))]


def test_documents_have_links():
  # The pattern finds the links there are (a check that cannot pass vacuously).
  assert len(_links(REPO / "README.md")) >= 15
  assert any(t.endswith(".png") for t in _links(REPO / "docs" / "FOURIER.md"))


@pytest.mark.parametrize("document", DOCUMENTS,
                         ids=[str(d.relative_to(REPO)) for d in DOCUMENTS])
def test_every_relative_link_and_image_exists(document):
  broken = []
  for target in _links(document):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = (document.parent / path).resolve() if path else document
    if not resolved.exists():
      broken.append(f"{target}: no such file")
    elif not resolved.is_relative_to(REPO):
      broken.append(f"{target}: outside the repository")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      broken.append(f"{target}: no heading #{anchor}")
  assert not broken, f"{document.relative_to(REPO)}: {broken}"


def _readme_section(title):
  text = (REPO / "README.md").read_text(encoding="utf-8")
  section = text.split(f"\n## {title}\n", 1)[1]
  return section.split("\n## ", 1)[0]


def test_readme_layout_names_every_module():
  layout = _readme_section("Layout")
  package = REPO / "ovc_jax"
  names = [p.name for p in package.iterdir()
           if (p.suffix == ".py" and p.name != "__init__.py")
           or (p.is_dir() and (p / "__init__.py").is_file())]
  assert len(names) > 15
  missing = [n for n in names
             if not re.search(rf"(?<![\w/]){re.escape(n)}(/|\b)", layout)]
  assert not missing, f"README's Layout leaves out ovc_jax/{missing}"
  for certifier in (package / "certifiers").glob("*.py"):
    if certifier.name != "__init__.py":
      assert certifier.name in layout, certifier.name


def test_readme_experiments_table_names_every_entry_point():
  table = _readme_section("Experiments")
  entry_points = sorted(
      p.stem for p in (REPO / "experiments").glob("*.py")
      if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))
  assert {"certify", "paper", "benchmark", "attack", "fourier_heatmap",
          "merge", "write_toy_split", "train_toy_clip",
          "calibrate_mvn"} <= set(entry_points)
  missing = [e for e in entry_points
             if f"python -m experiments.{e}" not in table]
  assert not missing, f"README's Experiments table leaves out {missing}"
