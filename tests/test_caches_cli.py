"""Compressed caches in the certify experiment, and `python -m experiments.caches`.

One certify run with --config.cache_format=int8 (compared with conftest's
float32 run of the same config); the caches CLI on copies of the float32
run's workdir: list, convert, verify, kills at every point of a conversion,
and the bad inputs.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import common
from experiments.common import cache_admin
from ovc_jax import cache_codec
from ovc_jax import caches

from commands import ENV, REPO
from test_experiments import TINY, run, tsv_rows_without_time

# These read the shared TINY run (conftest.tiny_certify_run) and this
# module's int8 run: on the xdist worker of test_experiments' readers of the
# TINY run, so that each is made once.
pytestmark = pytest.mark.xdist_group("tiny_certify_run")

NEW_COLUMNS = ("ambiguous", "regenerated")


def _without_new_columns(rows_by_table):
  out = {}
  for name, lines in rows_by_table.items():
    keep = [j for j, c in enumerate(lines[0]) if c not in NEW_COLUMNS]
    out[name] = [[line[j] for j in keep] for line in lines]
  return out


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, warm_python):
  workdir = str(tmp_path_factory.mktemp("certify_int8"))
  proc = run("experiments.certify", f"--workdir={workdir}", *TINY,
             "--config.cache_format=int8", warm=warm_python)
  return workdir, proc


@pytest.fixture
def float32_copy(tiny_certify_run, tmp_path):
  """A copy of conftest's float32 run (its caches may be changed)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_certify_run[0], workdir)
  return workdir


def _embedding_dirs(workdir):
  root = os.path.join(workdir, "caches", "sigma_0.25")
  return [os.path.join(root, idx, "embeddings")
          for idx in sorted(os.listdir(root))]


def _one_error_line(proc):
  assert proc.returncode == 1, (proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


def test_an_int8_run_certifies_the_float32_runs_rows(int8_run,
                                                     tiny_certify_run):
  workdir, proc = int8_run
  reference = tiny_certify_run[0]
  # The printed tables are the same, except the seconds.
  strip = lambda text: [line.rsplit(None, 2)[0] if "  " in line else line
                        for line in text.splitlines()
                        if not line.startswith("results:")]
  assert strip(proc.stdout) == strip(tiny_certify_run[1].stdout)
  got, want = tsv_rows_without_time(workdir), tsv_rows_without_time(reference)
  assert _without_new_columns(got) == _without_new_columns(want)
  cached = [name for name in got if os.sep + "cached" + os.sep in name]
  assert cached and all(got[n][0][-2:] == list(NEW_COLUMNS) for n in cached)
  assert all(NEW_COLUMNS[0] not in got[n][0] for n in got if n not in cached)
  for name in cached:  # regenerated = ambiguous on every row
    assert all(line[-1] == line[-2] for line in got[name][1:])
  for directory in _embedding_dirs(workdir):
    assert caches.read_metadata(directory)["format"] == "int8"
  with open(os.path.join(workdir, "summary.json")) as f:
    small = json.load(f)["cache_bytes_per_input_per_sigma"]["sigma_0.25"]
  with open(os.path.join(reference, "summary.json")) as f:
    big = json.load(f)["cache_bytes_per_input_per_sigma"]["sigma_0.25"]
  # On disk: 0.286x in arrays at d = 192, plus the .npy headers and metadata.
  assert small["embeddings"] < 0.35 * big["embeddings"]
  assert small["known"] == big["known"]


def test_list_convert_and_verify(float32_copy, warm_python):
  workdir = float32_copy
  exact = [caches.embeddings_of(caches.load_cache(d, "embeddings"))
           for d in _embedding_dirs(workdir)]
  listed = warm_python.run("experiments.caches", f"--workdir={workdir}")
  assert listed.returncode == 0, listed.stderr
  lines = listed.stdout.splitlines()
  assert sum(l.startswith("sigma_0.25/") and " embeddings float32 " in l
             and " 450 " in l for l in lines) == 3
  assert any("sigma 0.25" in l and "embeddings float32" in l
             and "3 caches" in l for l in lines)
  assert "all: 9 caches" in listed.stdout
  converted = warm_python.run("experiments.caches", f"--workdir={workdir}",
                              "--action=convert", "--to=int8")
  assert converted.returncode == 0, converted.stderr
  assert "converted 3 embedding cache(s) from float32 to int8" in (
      converted.stdout)
  for directory, rows in zip(_embedding_dirs(workdir), exact):
    packed = caches.load_embeddings(directory, _provenance_of(directory))
    for stream, r, p in zip(caches.STREAMS, rows, packed):
      assert isinstance(p, cache_codec.CompressedRows) and p.format == "int8"
      caches.check_within_bounds(r, p, stream)
  assert not [n for n in os.listdir(os.path.dirname(_embedding_dirs(
      workdir)[0])) if n.startswith(".")]
  again = warm_python.run("experiments.caches", f"--workdir={workdir}",
                          "--action=convert", "--to=int16")
  assert again.returncode == 0, again.stderr
  assert "converted 0" in again.stdout and "left as they are" in again.stdout
  listed = warm_python.run("experiments.caches", f"--workdir={workdir}")
  assert sum(l.startswith("sigma_0.25/") and " embeddings int8 " in l
             for l in listed.stdout.splitlines()) == 3
  verified = warm_python.run("experiments.caches", f"--workdir={workdir}",
                             "--action=verify", "--samples=3")
  assert verified.returncode == 0, verified.stderr
  assert "verified 9 cache(s)" in verified.stdout


def _provenance_of(directory):
  meta = caches.read_metadata(directory)
  p = dict(meta["provenance"])
  p["key"] = tuple(p["key"])
  return caches.Provenance(**p)


def _relabel(source, target, fields):
  """Copies embedding cache `source` over `target`, its metadata claiming
  `fields` of target's provenance (checksum recomputed: a consistent
  rewrite only regenerating samples can tell)."""
  with open(os.path.join(target, "metadata.json")) as f:
    claimed = json.load(f)["provenance"]
  shutil.rmtree(target)
  shutil.copytree(source, target)
  path = os.path.join(target, "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  for field in fields:
    meta["provenance"][field] = claimed[field]
  meta["checksum"] = caches.metadata_checksum(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


def test_verify_catches_a_compressed_cache_of_another_input(int8_run,
                                                            tmp_path,
                                                            warm_python):
  workdir = str(tmp_path / "run")
  shutil.copytree(int8_run[0], workdir)
  first, second = _embedding_dirs(workdir)[:2]
  _relabel(second, first, ("key", "input_sha256"))
  proc = warm_python.run("experiments.caches", f"--workdir={workdir}",
                         "--action=verify")
  line = _one_error_line(proc)
  assert first in line and "decodes" in line and "beyond its bound" in line


# A conversion killed (SIGKILL, no clean-up) at three points: just before the
# new cache replaces the old one, between the two renames of the fallback
# swap, and after the swap before the old cache is removed.
_KILLED_CONVERT = """
import os, signal, sys
from ovc_jax import caches
from experiments.common import cache_admin
point = sys.argv[2]
kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "before_swap":
  caches.replace_directory = kill
elif point == "between_renames":
  caches._exchange = lambda a, b: False
  rename = os.rename
  calls = []
  def second_kills(a, b):
    calls.append(a)
    if len(calls) == 2:
      kill()
    rename(a, b)
  caches.os.rename = second_kills
else:
  caches.shutil.rmtree = kill
cache_admin.convert_caches(sys.argv[1], "int8")
"""


@pytest.mark.parametrize("point", ["before_swap", "between_renames",
                                   "after_swap"])
def test_a_kill_during_convert_leaves_whole_caches(float32_copy, point,
                                                   warm_python):
  workdir = float32_copy
  first = _embedding_dirs(workdir)[0]
  before = caches.load_cache(first, "embeddings")
  before_rows = [np.array(a) for a in caches.embeddings_of(before)]
  proc = subprocess.run([sys.executable, "-c", _KILLED_CONVERT, workdir,
                         point], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr
  parent = os.path.dirname(first)
  leftovers = [n for n in os.listdir(parent) if n.startswith(".")
               or n.endswith(caches.OLD_SUFFIX)]
  assert leftovers  # what the kill left beside
  if point == "between_renames":
    assert not os.path.exists(first)  # repaired by the next run
  else:
    fmt = caches.load_cache(first, "embeddings").format  # whole
    assert fmt == ("int8" if point == "after_swap" else "float32")
  proc = warm_python.run("experiments.caches", f"--workdir={workdir}",
                         "--action=convert", "--to=int8")
  assert proc.returncode == 0, proc.stderr
  assert "after an interrupted write or conversion" in proc.stdout
  assert sorted(os.listdir(parent)) == ["embeddings", "gaussian", "known"]
  for directory in _embedding_dirs(workdir):
    cache = caches.load_cache(directory, "embeddings")
    assert cache.format == "int8"
  packed = caches.embeddings_of(caches.load_cache(first, "embeddings"))
  for rows, p in zip(before_rows, packed):
    caches.check_within_bounds(rows, p, first)


def test_a_full_disk_during_convert_keeps_the_old_cache(float32_copy,
                                                        monkeypatch, capsys):
  workdir = float32_copy
  real_save = caches._save_array  # pylint: disable=protected-access
  calls = []

  def fills_up(path, arr, directory):
    calls.append(path)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
    real_save(path, arr, directory)

  monkeypatch.setattr(caches, "_save_array", fills_up)
  convert = common.exit_on_user_error(cache_admin.convert_caches)
  with pytest.raises(SystemExit) as e:
    convert(workdir, "int8")
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the disk is full"), err
  first = _embedding_dirs(workdir)[0]
  assert caches.load_cache(first, "embeddings").format == "float32"
  assert sorted(os.listdir(os.path.dirname(first))) == [
      "embeddings", "gaussian", "known"]


def test_bad_inputs_fail_in_one_line(float32_copy, tmp_path, warm_python):
  workdir = float32_copy
  cases = [
      ([f"--workdir={tmp_path / 'missing'}"], "does not exist"),
      ([f"--workdir={tmp_path}"], "holds no caches"),
      ([f"--workdir={workdir}", "--action=convert", "--to=int4"],
       "flag --to=int4: value should be one of <int16|int8>"),
      ([f"--workdir={workdir}", "--action=erase"],
       "flag --action=erase: value should be one of <list|convert|verify>"),
      ([f"--workdir={workdir}", "--action=verify", "--samples=0"],
       "--samples=0: 0 is not a positive integer"),
      ([f"--workdir={workdir}", "extra"], "unexpected arguments: ['extra']"),
  ]
  for args, fragment in cases:
    line = _one_error_line(warm_python.run("experiments.caches", *args))
    assert fragment in line, (args, line)
  help_ = warm_python.run("experiments.caches", "--help")
  assert help_.returncode == 0 and "--action" in help_.stdout
  # A workdir another run holds.
  lock = common.acquire_workdir(workdir)
  try:
    for action in ("convert", "verify"):
      line = _one_error_line(warm_python.run(
          "experiments.caches", f"--workdir={workdir}", f"--action={action}"))
      assert "is in use by another run" in line
  finally:
    common.release_workdir(lock)
  assert caches.load_cache(_embedding_dirs(workdir)[0],
                           "embeddings").format == "float32"
  # A corrupted cache: its metadata edited by hand.
  path = os.path.join(_embedding_dirs(workdir)[1], "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  meta["provenance"]["sigma"] = 0.5
  with open(path, "w") as f:
    json.dump(meta, f)
  for action in ("list", "convert", "verify"):
    line = _one_error_line(warm_python.run(
        "experiments.caches", f"--workdir={workdir}", f"--action={action}"))
    assert f"cache metadata {path} does not match its checksum" in line


def test_cache_flags_are_checked_before_anything_is_written(tmp_path,
                                                            warm_python):
  workdir = tmp_path / "w"
  cases = [
      (["--config.cache_format=int4", *TINY],
       "--config.cache_format must be one of float32 | int16 | int8; got "
       "'int4'"),
      (["--config.cached_ambiguous=exact", *TINY],
       "cached_ambiguous must be one of ('regenerate', 'conservative'); got "
       "'exact'; set --config.cached_ambiguous"),
      (["--config=experiments/configs/certify.py:sequential",
        "--config.cache_format=int8"],
       "sequential mode writes none"),
  ]
  for args, fragment in cases:
    line = _one_error_line(warm_python.run(
        "experiments.certify", f"--workdir={workdir}", *args))
    assert fragment in line, line
  assert not workdir.exists()


def test_resuming_with_another_cache_format(float32_copy, warm_python):
  """regenerate: the format does not change a certificate, so a run resumes
  with another one; conservative: it does, and both fields are recorded."""
  workdir = float32_copy
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert "cache_format" not in recorded and "cached_ambiguous" not in recorded
  proc = warm_python.run("experiments.certify", f"--workdir={workdir}", *TINY,
                         "--config.cache_format=int16")
  assert proc.returncode == 0, proc.stderr
  assert "nothing was recomputed" in proc.stderr
  line = _one_error_line(warm_python.run(
      "experiments.certify", f"--workdir={workdir}", *TINY,
      "--config.cached_ambiguous=conservative"))
  assert "holds results of a different configuration (cache_format" in line
  from experiments.common import certify_job
  from experiments.configs import certify as certify_configs
  config = certify_configs.get_config()
  config.cached_ambiguous = "conservative"
  config.cache_format = "int8"
  record = certify_job.result_config(config)
  assert (record["cache_format"], record["cached_ambiguous"]) == (
      "int8", "conservative")
  config.cached_ambiguous = "regenerate"
  assert "cache_format" not in certify_job.result_config(config)


def test_single_mode_reads_and_verifies_another_runs_int8_caches(
    int8_run, tmp_path, warm_python):
  """Cached-OVC in single mode from the int8 run's caches (regenerating
  --config.verify_cache_samples of their samples first) gives that run's
  rows for the same prompt."""
  source = int8_run[0]
  workdir = str(tmp_path / "single")
  run("experiments.certify",
      "--config=experiments/configs/certify.py:cached", f"--workdir={workdir}",
      *TINY, f"--config.cache_dir={source}/caches",
      "--config.verify_cache_samples=6", warm=warm_python)
  got = tsv_rows_without_time(workdir)
  want = tsv_rows_without_time(source)
  (name, rows), = got.items()
  assert rows == want[os.path.join("tsv", "cached", "sigma_0.25",
                                   "novel00-a-photo-of-a-x.tsv")], name


def test_calibration_reads_int8_caches_exactly(int8_run, float32_copy,
                                               warm_python):
  """calibrate_mvn's exact certificates from int8 caches (ambiguous samples
  regenerated) are the float32 caches' ones: the same report."""
  reports = []
  for workdir in (int8_run[0], float32_copy):
    proc = warm_python.run("experiments.calibrate_mvn",
                           f"--certify_workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    reports.append([l for l in proc.stdout.splitlines()
                    if "delta" in l or "overshoot" in l])
  assert reports[0] and reports[0] == reports[1]
