"""Entry points a newcomer meets first: their --help, their defaults, and the
shipped checkpoints/ they leave alone unless asked."""

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import common
from experiments.common import shipped
from experiments.configs import certify as certify_configs
from experiments.configs import fourier_heatmap as fourier_configs

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _run(module, *args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=120)


def _digests(folder):
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def _one_error_line(proc):
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


# ---------------------------------------------------------------------------
# fourier_heatmap --help


def test_fourier_heatmap_help_lists_every_variant():
  text = " ".join(common.config_help(fourier_configs).split())
  assert "Variants: (none)" not in text
  variants = text.split("Variants: ", 1)[1].split(". Fields", 1)[0]
  words = " " + re.sub(r"[|;,()]", " ", variants) + " "
  names = (*fourier_configs.DATASET_V, *certify_configs.BACKBONES,
           *fourier_configs.CLASSIFIERS, "single_blank", "quick")
  for name in names:
    assert f" {name} " in words, name
    fourier_configs.get_config(name)  # and each one it lists is accepted
  example = fourier_configs.EXAMPLE_VARIANTS
  assert f"fourier_heatmap.py:{example}" in text
  fourier_configs.get_config(example)


# ---------------------------------------------------------------------------
# write_toy_split


def test_write_toy_split_help_exits_0_with_a_positive_montage_flag():
  proc = _run("experiments.write_toy_split", "--help")
  assert proc.returncode == 0, proc.stderr
  assert "--[no]montage" in proc.stdout and "no_montage" not in proc.stdout
  assert "--[no]export_to_checkpoints" in proc.stdout
  assert "workdirs/toy_world" in proc.stdout


def test_write_toy_split_writes_its_workdir_by_default(tmp_path):
  proc = _run("experiments.write_toy_split", "--num_images=20", "--nomontage",
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "workdirs" / "toy_world"
  assert (out / "cifar-10-batches-py" / "test_batch").is_file()
  assert (out / "split.json").is_file() and not (out / "examples.png").exists()


def test_write_toy_split_refuses_the_shipped_split_without_the_flag():
  before = _digests(shipped.TOY_WORLD)
  for flag in ("--workdir", "--out"):
    proc = _run("experiments.write_toy_split", f"{flag}=checkpoints/toy_world",
                "--num_images=20", "--nomontage")
    line = _one_error_line(proc)
    assert "would overwrite the shipped checkpoints/toy_world" in line
    assert "--export_to_checkpoints" in line
  assert _digests(shipped.TOY_WORLD) == before


# ---------------------------------------------------------------------------
# The guard itself (train_toy_clip's export and write_toy_split's output)


def test_train_toy_clip_exports_under_its_workdir_by_default(tmp_path):
  workdir = str(tmp_path / "w")
  assert shipped.toy_clip_export_dir(
      workdir, None, export_to_checkpoints=False) == os.path.join(
          workdir, "export")
  given = str(tmp_path / "elsewhere")
  assert shipped.toy_clip_export_dir(
      workdir, given, export_to_checkpoints=False) == given
  assert shipped.toy_clip_export_dir(
      workdir, None, export_to_checkpoints=True) == shipped.TOY_CLIP


@pytest.mark.parametrize("workdir, export_dir, to_checkpoints, fragment", [
    ("w", "checkpoints/toy_clip", False,
     "--export_dir=checkpoints/toy_clip would overwrite the shipped "
     "checkpoints/toy_clip; pass --export_to_checkpoints"),
    ("w", os.path.join(shipped.TOY_CLIP, "sub"), False,
     "would overwrite the shipped checkpoints/toy_clip"),
    ("w", "/tmp/elsewhere", True,
     "--export_to_checkpoints writes checkpoints/toy_clip; drop "
     "--export_dir=/tmp/elsewhere"),
    (os.path.join(shipped.TOY_CLIP, "w"), None, False,
     "lies in the shipped checkpoints/toy_clip; pass another --workdir"),
    ("checkpoints/toy_world", None, True,
     "lies in the shipped checkpoints/toy_world"),
])
def test_shipped_folders_need_the_explicit_flag(
    tmp_path, monkeypatch, workdir, export_dir, to_checkpoints, fragment):
  monkeypatch.chdir(REPO)
  with pytest.raises(common.WorkdirError) as e:
    shipped.toy_clip_export_dir(workdir, export_dir,
                                export_to_checkpoints=to_checkpoints)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_shipped_folders_exist():
  # The guard protects real folders: the embedded default's model and data.
  assert (pathlib.Path(shipped.TOY_CLIP) / "model.safetensors").is_file()
  assert (pathlib.Path(shipped.TOY_WORLD) / "split.json").is_file()
