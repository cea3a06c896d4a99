"""The experiments under bad inputs, concurrency, full disks and Ctrl-C.

Every case ends in one line `error: ...` and a non-zero exit status, leaves
nothing half-written, and a later run resumes. Most cases run in this process
on the toy-world CLIP (compiled once, by the `reference` fixture); those that
are about the command line run it in a subprocess, and fail before any
certification.
"""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import analyze
from experiments import calibrate_mvn
from experiments import common
from experiments.common import certify_job
from experiments.common import curves
from experiments.configs import benchmark as benchmark_configs
from experiments.configs import certify as certify_configs
from experiments.configs import paper as paper_configs
from experiments.configs import train_toy_clip as train_configs
from ovc_jax import results
from ovc_jax.errors import ConfigError, DataError, OVCError
from ovc_jax.models import weights_io

import commands
from commands import ENV, REPO

# Most tests here read the module's reference run (compiled once): one
# xdist worker runs them all, so that it is made once.
pytestmark = pytest.mark.xdist_group("reliability_reference")

# tests/test_experiments.py's TINY: 3 toy test images (0, 400, 800).
TINY = {"skip": 400, "n0": 50, "n": 400, "irs.n_p": 200, "irs.gamma": 0.05,
        "batch_size": 200, "num_novel": 2}
TINY_FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()]

# Holds a workdir's lock, as a run does, until killed.
HOLDER = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from experiments import common
common.acquire_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def change_one_weight(model) -> str:
  """Adds 1e-3 to one tensor of model/model.safetensors; its new sha256."""
  path = str(model / "model.safetensors")
  weights = weights_io.read_safetensors(path)
  name = sorted(weights)[0]
  weights[name] = weights[name] + np.float32(1e-3)
  weights_io.write_safetensors(weights, path)
  return weights_io.file_sha256(path)


def tiny_config(**overrides):
  config = certify_configs.get_config()
  for key, value in {**TINY, **overrides}.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def assert_one_line_error(proc, *fragments, status=1):
  """Exit status, no traceback, and one `error: ...` line holding fragments."""
  assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])
  return errors[0]


def certify(config, workdir):
  """certify_job.run, quietly; returns (summary, what it said)."""
  stream = io.StringIO()
  _, summary = certify_job.run(config, str(workdir), stream=stream)
  return summary, stream.getvalue()


def tsv_rows(workdir):
  """{relative path: rows (time column dropped)} of a run's TSVs."""
  out = {}
  for path in results.list_tsvs(os.path.join(str(workdir), "tsv")):
    with open(path) as f:
      lines = f.read().splitlines()
    drop = lines[0].split("\t").index("time")
    out[os.path.relpath(path, str(workdir))] = [
        [v for j, v in enumerate(line.split("\t")) if j != drop]
        for line in lines]
  return out


def empty_folders(root):
  return [d for d, subdirs, files in os.walk(root) if not subdirs and not files]


@contextlib.contextmanager
def lock_held_elsewhere(workdir):
  """A second process holding `workdir`'s lock; yields it (killed after)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted in-process run of TINY (compiles what the rest reuse)."""
  workdir = tmp_path_factory.mktemp("reference") / "w"
  certify(tiny_config(), workdir)
  return str(workdir)


# ---------------------------------------------------------------------------
# One run per workdir


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_not(
    reference, tmp_path):
  del reference  # compiled
  workdir = tmp_path / "w"
  config = tiny_config(max=400)  # one input
  with lock_held_elsewhere(workdir) as holder:
    with pytest.raises(common.WorkdirError) as e:
      certify(config, workdir)
    message = str(e.value)
    assert f"workdir {workdir} is in use by another run (pid {holder.pid} " \
        in message and "\n" not in message
    assert sorted(os.listdir(workdir)) == [".lock"]  # nothing written
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 left the lock file, with the dead pid in it: no lock for all that.
  with open(workdir / ".lock") as f:
    assert f"pid {holder.pid}" in f.read()
  summary, _ = certify(config, workdir)
  assert summary["inputs"] == 1
  assert os.path.getsize(workdir / ".lock") == 0  # released


@pytest.mark.heavy
def test_two_runs_started_together_then_ctrl_c_then_resume(reference, tmp_path):
  """Both start at once: one runs, the other stops at once naming it (no
  'no known cache'); Ctrl-C ends the first with status 130, and the resume
  ends with every row once, equal to an uninterrupted run's."""
  workdir = tmp_path / "w"
  flags = [f"--workdir={workdir}", *[f for f in TINY_FLAGS if "skip" not in f],
           "--config.skip=100"]  # 10 inputs
  # The winner pauses mid-input once it has finished one: the Ctrl-C below
  # always finds it running, even when the machine is slow to send it, and
  # it handles Ctrl-C as in a terminal, whatever pytest was started with.
  procs = [subprocess.Popen(commands.paused_certify(*flags), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for _ in range(2)]
  done = workdir / "done.txt"
  deadline = time.time() + 300
  while time.time() < deadline and not (done.exists() and done.read_text()):
    if all(p.poll() is not None for p in procs):
      break
    time.sleep(0.02)
  running = [p for p in procs if p.poll() is None]
  assert len(running) == 1, [p.communicate() for p in procs]
  winner = running[0]
  winner.send_signal(signal.SIGINT)
  outputs = {p: p.communicate(timeout=120) for p in procs}
  loser = next(p for p in procs if p is not winner)
  loser_proc = subprocess.CompletedProcess([], loser.returncode, *outputs[loser])
  assert_one_line_error(loser_proc, f"workdir {workdir} is in use by another "
                        f"run (pid {winner.pid} ")
  winner_proc = subprocess.CompletedProcess([], winner.returncode,
                                            *outputs[winner])
  assert_one_line_error(winner_proc, "interrupted", "run the same command "
                        "again to resume", status=130)
  for _, err in outputs.values():
    assert "no known cache" not in err
  certify(tiny_config(skip=100), workdir)  # the resume
  expected = tsv_rows(reference)
  got = tsv_rows(workdir)
  assert sorted(got) == sorted(expected)
  for rel, rows in got.items():
    assert [int(r[0]) for r in rows[1:]] == list(range(0, 1000, 100))
    # Rows depend on the input alone: the inputs both runs certified agree.
    assert [r for r in rows if r[0] in ("idx", "0", "400", "800")] == expected[rel]
  with open(done) as f:
    assert sorted(map(int, f.read().split())) == list(range(0, 1000, 100))


def test_paper_refuses_a_workdir_in_use(warm_python, tmp_path):
  workdir = tmp_path / "paper"
  with lock_held_elsewhere(workdir) as holder:
    proc = warm_python.run("experiments.paper", f"--workdir={workdir}",
                           "--config=experiments/configs/paper.py:ci")
  assert_one_line_error(proc, f"(pid {holder.pid} ")


def test_analyze_into_a_workdir_in_use_is_refused(reference):
  with lock_held_elsewhere(reference) as holder:
    with pytest.raises(common.WorkdirError, match=f"pid {holder.pid} "):
      analyze.run(reference, [], [])


def test_calibration_refuses_a_certify_workdir_in_use(reference):
  with lock_held_elsewhere(reference) as holder:
    with pytest.raises(common.WorkdirError) as e:
      calibrate_mvn.run(reference)
  assert (f"--certify_workdir {reference} is in use by another run "
          f"(pid {holder.pid} ") in str(e.value)
  assert not os.path.exists(os.path.join(reference, "calibration.json"))


# ---------------------------------------------------------------------------
# The weights a workdir was started with


def test_weights_swapped_between_a_kill_and_a_resume_are_refused(reference,
                                                                  tmp_path):
  del reference  # compiled
  model = tmp_path / "model"
  shutil.copytree(os.path.join(REPO, "checkpoints", "toy_clip"), model)
  os.remove(model / "model.safetensors.sha256")  # the copy is edited below
  workdir = tmp_path / "w"
  config = tiny_config(backbone=str(model), max=800)  # inputs 0 and 400
  certify(config, workdir)
  with open(workdir / "config.json") as f:
    old = json.load(f)[common.WEIGHTS_KEY]["sha256"]
  assert old == weights_io.file_sha256(str(model / "model.safetensors"))
  (workdir / "done.txt").write_text("0\n")  # as if killed after input 0
  before = tsv_rows(workdir)
  new = change_one_weight(model)
  with pytest.raises(common.WorkdirError) as e:
    certify(config, workdir)
  message = str(e.value)
  assert str(workdir) in message and old in message and new in message
  assert "\n" not in message
  assert tsv_rows(workdir) == before


# ---------------------------------------------------------------------------
# Full disks


def _enospc(path=None):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.mark.parametrize("where", ["start", "caches", "rows"])
def test_a_full_disk_says_so_and_where_and_the_run_resumes(reference, tmp_path,
                                                            monkeypatch, where):
  workdir = tmp_path / "w"
  real_fsync, real_save = os.fsync, certify_job.ovc.save_caches

  def fsync(fd):
    target = os.readlink(f"/proc/self/fd/{fd}")
    if where == "start" and os.path.basename(target).startswith(".tmp-"):
      raise _enospc()  # config.json's temporary file
    if where == "rows" and target.endswith(".tsv") and (
        workdir / "done.txt").exists():
      raise _enospc()  # the second input's first row
    return real_fsync(fd)

  def save_caches(directory, *args, **kwargs):
    if where == "caches" and directory.endswith(os.sep + "400"):
      os.makedirs(os.path.join(directory, "embeddings"))  # a partial write
      raise _enospc()
    return real_save(directory, *args, **kwargs)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(certify_job.ovc, "save_caches", save_caches)
  with pytest.raises(common.WorkdirError) as e:
    certify(tiny_config(), workdir)
  message = str(e.value)
  assert message.startswith("the disk is full") and "\n" not in message
  expected_path = {"start": str(workdir / "config.json"),
                   "caches": os.path.join(str(workdir), "caches", "sigma_0.25",
                                          "400"),
                   "rows": str(workdir / "tsv")}[where]
  assert expected_path in message
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
  if where == "start":
    assert not (workdir / "config.json").exists()
  else:
    assert (workdir / "done.txt").read_text() == "0\n"
  assert empty_folders(workdir) == []
  monkeypatch.undo()  # space freed
  certify(tiny_config(), workdir)
  assert tsv_rows(workdir) == tsv_rows(reference)
  assert empty_folders(workdir) == []


def _fill(folder):
  """Fills the file system of `folder` to the last byte; returns the file."""
  path = os.path.join(folder, "ballast")
  with open(path, "wb", buffering=0) as f:
    for size in (1 << 20, 1 << 12, 1):
      try:
        while True:
          f.write(b"\0" * size)
      except OSError as e:
        assert e.errno == errno.ENOSPC
  return path


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs (needs root and CAP_SYS_ADMIN; skipped elsewhere)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                         str(mount)], capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  try:
    yield str(mount)
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


class _FillAfterFirstInput(io.StringIO):
  """The progress stream: fills the disk once the first input is done."""

  def __init__(self, folder):
    super().__init__()
    self.folder, self.ballast = folder, None

  def write(self, text):
    if self.ballast is None and text.startswith("[1/"):
      self.ballast = _fill(self.folder)
    return super().write(text)


def test_a_really_full_disk_at_start_and_mid_run(reference, small_disk):
  workdir = os.path.join(small_disk, "w")
  ballast = _fill(small_disk)
  with pytest.raises(common.WorkdirError, match="the disk is full"):
    certify(tiny_config(), workdir)
  os.remove(ballast)
  stream = _FillAfterFirstInput(small_disk)
  with pytest.raises(common.WorkdirError) as e:
    certify_job.run(tiny_config(), workdir, stream=stream)
  assert "the disk is full" in str(e.value) and workdir in str(e.value)
  assert open(os.path.join(workdir, "done.txt")).read() == "0\n"
  assert empty_folders(workdir) == []
  os.remove(stream.ballast)
  certify(tiny_config(), workdir)
  assert tsv_rows(workdir) == tsv_rows(reference)


# ---------------------------------------------------------------------------
# Workdirs that cannot be one


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder no one can write to: chmod 0o500 (not root), else a read-only
  tmpfs, else /sys (where even root may not create folders)."""
  if os.geteuid() != 0:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    yield str(folder)
    folder.chmod(0o700)
    return
  folder = tmp_path / "ro"
  folder.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                         str(folder)], capture_output=True)
  if proc.returncode == 0:
    try:
      yield str(folder)
    finally:
      subprocess.run(["umount", "-l", str(folder)], check=False)
  else:
    yield "/sys"


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_unusable_workdirs_fail_in_one_line(tmp_path, read_only_dir, case):
  (tmp_path / "a_file").write_text("x")
  workdir = {"file": tmp_path / "a_file",
             "under_a_file": tmp_path / "a_file" / "w",
             "read_only": os.path.join(read_only_dir, "w")}[case]
  with pytest.raises(common.WorkdirError) as e:
    certify(tiny_config(), workdir)
  message = str(e.value)
  assert "\n" not in message and str(workdir) in message
  assert {"file": "is a file, not a folder",
          "under_a_file": f"{tmp_path / 'a_file'} is a file",
          "read_only": "cannot be created"}[case] in message
  assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("module, args", [
    ("experiments.certify", TINY_FLAGS),
    ("experiments.benchmark", ["--config.architectures=('toy',)"]),
    ("experiments.train_toy_clip",
     ["--config=experiments/configs/train_toy_clip.py:tiny"]),
])
def test_a_workdir_that_is_a_file_fails_in_one_line(warm_python, tmp_path,
                                                    module, args):
  path = tmp_path / "a_file"
  path.write_text("x")
  proc = warm_python.run(module, f"--workdir={path}", *args)
  assert_one_line_error(proc, f"workdir {path} is a file")
  assert path.read_text() == "x"


# ---------------------------------------------------------------------------
# The journal


def test_a_garbage_line_in_done_txt_fails_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  common.ResumableRun(str(workdir), {"x": 1})
  (workdir / "done.txt").write_text("0\nabc\n")
  with pytest.raises(OVCError) as e:
    common.ResumableRun(str(workdir), {"x": 1})
  assert "done.txt line 2 is 'abc'" in str(e.value)
  assert "\n" not in str(e.value)


def test_a_partial_done_line_is_cut_before_the_next_append(tmp_path):
  workdir = tmp_path / "w"
  common.ResumableRun(str(workdir), {"x": 1}).commit(0, {})
  with open(workdir / "done.txt", "a") as f:
    f.write("4")  # killed before its newline
  run = common.ResumableRun(str(workdir), {"x": 1})
  assert run.done == [0]
  run.commit(8, {})
  assert (workdir / "done.txt").read_text() == "0\n8\n"  # not "0\n48\n"


# ---------------------------------------------------------------------------
# Config values


@pytest.mark.parametrize("sigmas, fragment", [
    (("nan,",), "holds 'nan,', which is not a number"),
    (("abc,",), "holds 'abc,', which is not a number"),
    (("",), "--config.sigmas is empty"),
    ((), "--config.sigmas is empty"),
    ((-0.5,), "holds -0.5; each entry must be a finite number > 0"),
    ((float("nan"),), "holds nan"),
    ((float("inf"),), "holds inf"),
    ((True,), "holds True, which is not a number"),
    ((0.25, 0.25), "lists 0.25 twice"),
])
def test_bad_sigma_lists_are_refused(sigmas, fragment):
  with pytest.raises(ConfigError) as e:
    certify_job.validate(tiny_config(sigmas=sigmas))
  assert fragment in str(e.value) and "--config.sigmas" in str(e.value)


def test_name_lists_given_as_a_b_are_split_and_checked():
  # --config.backbones=vit_b32,rn50 reaches the config as ('vit_b32,rn50',).
  assert common.check_name_list(("vit_b32,rn50",), "backbones") == (
      "vit_b32", "rn50")
  with pytest.raises(ConfigError, match="--config.backbones lists 'toy' twice"):
    common.check_name_list(("toy,toy",), "backbones")
  with pytest.raises(ConfigError, match="holds 'foo'; choose from normalized"):
    common.check_name_list(("foo,",), "noise_spaces", ("normalized", "pixel"))


@pytest.mark.parametrize("field, value, flag", [
    ("irs.n_p", 100_000, "--config.irs.n_p"),
    ("n0", 0, "--config.n0"),
    ("n", 0, "--config.n"),
    ("alpha", 1.5, "--config.alpha"),
    ("batch_size", 0, "--config.batch_size"),
    ("irs.gamma", 1.0, "--config.irs.gamma"),
    ("mvn.delta", -0.1, "--config.mvn.delta"),
    ("mvn.batch_size", 0, "--config.mvn.batch_size"),
    ("noise_space", "pixels", "--config.noise_space"),
])
def test_library_config_errors_name_the_flag(field, value, flag):
  with pytest.raises(ConfigError) as e:
    certify_job.validate(tiny_config(**{field: value}))
  assert f"set {flag}" in str(e.value) or f"or {flag}" in str(e.value)


def test_single_mode_irs_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ConfigError, match="pass --config.mode=ovc"):
    certify(tiny_config(mode="single", method="irs"), tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_help_exits_0_and_lists_variants_and_fields(warm_python):
  proc = warm_python.run("experiments.certify", "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for word in ("Variants:", "cifar10", "vit_b32", "quick", "irs.n_p=2000",
               "sigmas=(0.25,)", "download=False"):
    assert word in proc.stdout, word


@pytest.mark.parametrize("module, variants", [
    (certify_configs, ["cifar10", "vit_l14", "quick", "paper", "single",
                       "mvn", "pixel"]),
    (paper_configs, ["cifar10", "imagenet", "ci", "paper"]),
    (benchmark_configs, ["quick", "full"]),
    (train_configs, ["tiny", "no_eval_cert"]),
])
def test_config_help_names_every_variant_and_field(module, variants):
  text = common.config_help(module)
  for variant in variants:
    assert variant in text, variant
  for field in common.config_fields(module.get_config()):
    assert f"{field}=" in text, field


def test_cifar10_without_its_files_names_the_flag_that_downloads(tmp_path,
                                                                 monkeypatch):
  config = tiny_config(dataset="cifar10", data_dir=str(tmp_path / "none"))
  with pytest.raises(DataError) as e:
    certify_job.build_setup(config, str(tmp_path / "w"))
  assert "--config.download=True" in str(e.value)
  assert "pass download=True" not in str(e.value)
  with pytest.raises(ConfigError, match="cifar10 only"):
    certify_job.validate(tiny_config(download=True))
  seen = {}

  def load_dataset(name, root, **kwargs):
    seen.update(name=name, root=root, **kwargs)
    raise DataError("stop here")

  monkeypatch.setattr(certify_job.datasets, "load_dataset", load_dataset)
  config.download = True
  with pytest.raises(DataError, match="stop here"):
    certify_job.build_setup(config, str(tmp_path / "w"))
  assert seen == {"name": "cifar10", "root": str(tmp_path / "none"),
                  "download": True}
  # A field that changes no result: not part of what a workdir compares.
  assert "download" not in certify_job.result_config(config)


# ---------------------------------------------------------------------------
# What a user reads and gets


def test_progress_eta_follows_the_recent_rate(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(common.progress.time, "perf_counter", lambda: clock[0])
  stream = io.StringIO()
  progress = common.Progress(20, "inputs", stream=stream,
                             per="all prompts and methods of one input")
  for seconds in [1.0] * 5 + [4.0] * 5:  # it slows down
    clock[0] += seconds
    progress.update()
  line = stream.getvalue().splitlines()[-1]
  assert "s/input (all prompts and methods of one input)" in line
  minutes, secs = map(int, re.search(r"ETA (\d+):(\d+)", line).groups())
  # 10 inputs left at ~4 s each; the mean since the start (2.5 s) said 0:25.
  assert minutes * 60 + secs >= 33


def test_rerunning_a_finished_workdir_says_nothing_was_recomputed(reference):
  before = tsv_rows(reference)
  summary, said = certify(tiny_config(), reference)
  assert "nothing was recomputed" in said and reference in said
  assert summary["recomputed_inputs"] == 0
  assert tsv_rows(reference) == before


def test_main_figure_shows_cached_ovc_and_names_model_n_and_alpha(
    reference, monkeypatch):
  seen = {}
  real = curves.save_figure

  def save_figure(fig, path):
    ax = fig.axes[0]
    seen["title"] = ax.get_title()
    seen["lines"] = {line.get_label(): line for line in ax.get_lines()}
    real(fig, path)

  monkeypatch.setattr(curves, "save_figure", save_figure)
  certify(tiny_config(), reference)
  assert "toy-world CLIP" in seen["title"]
  assert "n=400" in seen["title"] and "α=0.001" in seen["title"]
  cached = [line for label, line in seen["lines"].items()
            if label.startswith("Cached-OVC")]
  assert len(cached) == 1
  assert "identical to standard RS" in cached[0].get_label()
  assert cached[0].get_marker() not in (None, "None", "")


def test_config_and_summary_json_get_the_usual_file_mode(reference, tmp_path):
  mask = os.umask(0o022)
  os.umask(mask)
  for name in ("config.json", "summary.json"):
    mode = stat.S_IMODE(os.stat(os.path.join(reference, name)).st_mode)
    assert mode == 0o666 & ~mask, (name, oct(mode))
  old = os.umask(0o022)
  try:
    common.write_json(str(tmp_path / "x.json"), {})
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode) == 0o644


def test_analyze_writes_its_own_figure(reference):
  with open(os.path.join(reference, "certified_accuracy.png"), "rb") as f:
    main_figure = f.read()
  out = analyze.run(reference, [], [])
  assert out == os.path.join(reference, "analysis.png")
  assert os.path.getsize(out) > 10_000
  with open(os.path.join(reference, "certified_accuracy.png"), "rb") as f:
    assert f.read() == main_figure


def test_analyze_refuses_a_non_numeric_radius_in_one_line(reference,
                                                          warm_python,
                                                          tmp_path):
  source = results.list_tsvs(os.path.join(reference, "tsv"))[0]
  with open(source) as f:
    lines = f.read().splitlines()
  column = lines[0].split("\t").index("radius")
  fields = lines[1].split("\t")
  fields[column] = "abc"
  bad = tmp_path / "bad.tsv"
  bad.write_text("\n".join([lines[0], "\t".join(fields)] + lines[2:]) + "\n")
  with pytest.raises(DataError, match="line 2: column 'radius' holds 'abc'"):
    analyze.run(None, [str(bad)], [], out=str(tmp_path / "a.png"))
  proc = warm_python.run("experiments.analyze", f"--tsv={bad}",
                         f"--out={tmp_path / 'a.png'}")
  assert_one_line_error(proc, f"{bad} line 2: column 'radius' holds 'abc'")
  assert not (tmp_path / "a.png").exists()


def test_user_errors_are_one_line(capsys):
  """The decorator every main has: OVCError, OSError, Ctrl-C."""
  for exc, status, fragment in [
      (ConfigError("bad thing"), 1, "error: bad thing"),
      (_enospc("/some/where"), 1, "error: the disk is full: no space left on "
       "device (/some/where)"),
      (OSError(errno.EROFS, "Read-only file system", "/ro"), 1,
       "error: read-only file system (/ro)"),
      (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C)"),
  ]:
    def main(exc=exc):
      raise exc
    with pytest.raises(SystemExit) as e:
      common.exit_on_user_error(main)()
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.startswith(fragment) and err.count("\n") == 1, err
  assert issubclass(common.WorkdirError, OVCError)


# ---------------------------------------------------------------------------
# CLIPure-Cos flags, calibration's caches and a cache on a full disk


@pytest.mark.parametrize("value", ["none", "clipure", "CLIPURE_COS", "yes"])
def test_purify_values_are_checked(value):
  with pytest.raises(ConfigError) as e:
    certify_job.validate(tiny_config(purify=value))
  message = str(e.value)
  assert message == (
      "--config.purify must be '' (plain CLIP only) or 'clipure_cos' "
      "(CLIPure-Cos beside plain CLIP; variant clipure); got " f"{value!r}")


def test_clipure_single_cached_from_a_cache_dir_finishes(reference, tmp_path):
  """clipure,cached reads caches an earlier run left in --config.cache_dir;
  its comparison figure used to look for a standard-RS table that single
  mode does not write, so no summary.json was ever written."""
  del reference  # compiled
  clip = {"purify": "clipure_cos", "clipure.steps": 1,
          "clipure.step_size": 0.1, "max": 800, "mode": "single"}
  first = tmp_path / "first"
  certify(tiny_config(method="standard", **clip), first)  # leaves caches
  summary, _ = certify(tiny_config(
      method="cached", cache_dir=str(first / "caches"), **clip),
                       tmp_path / "second")
  assert (tmp_path / "second" / "summary.json").exists()
  assert os.path.getsize(summary["comparison_figure"]) > 0
  rows = tsv_rows(tmp_path / "second")
  assert {p.split(os.sep)[1] for p in rows} == {"cached", "clipure_cos"}
  # Cached-OVC is standard RS, bit for bit, on each base classifier.
  for path, table in tsv_rows(first).items():
    cached = rows[path.replace(os.sep + "standard" + os.sep,
                               os.sep + "cached" + os.sep)]
    predict_radius = lambda t: [(r[2], r[3]) for r in t]  # pylint: disable=unnecessary-lambda-assignment
    assert predict_radius(cached) == predict_radius(table)


def _forge_embeddings(directory):
  """Rolls a cache's estimation rows by one and rewrites its CRC and
  checksum: a consistent forgery only regeneration can tell."""
  from ovc_jax import caches  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, "estimation.npy")
  arr = np.roll(np.load(path), 1, axis=0)
  np.save(path, arr)
  with open(os.path.join(directory, "metadata.json")) as f:
    meta = json.load(f)
  meta["arrays"]["estimation"]["crc32"] = caches._crc32(arr)  # pylint: disable=protected-access
  meta["checksum"] = caches.metadata_checksum(meta)
  with open(os.path.join(directory, "metadata.json"), "w") as f:
    json.dump(meta, f)


def test_calibration_regenerates_samples_of_the_caches_it_reads(reference,
                                                                tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(reference, workdir)
  cache = os.path.join(workdir, "caches", "sigma_0.25", "400", "embeddings")
  _forge_embeddings(cache)
  with pytest.raises(OVCError) as e:
    calibrate_mvn.run(workdir)
  message = str(e.value)
  assert f"cache {cache}" in message and "\n" not in message, message
  assert not os.path.exists(os.path.join(workdir, "calibration.json"))


def test_a_short_cache_write_says_the_disk_is_full(reference, tmp_path,
                                                   monkeypatch):
  """NumPy reports a full disk during np.save as 'N requested and M
  written', without errno; the message must say the disk is full, where."""
  workdir = tmp_path / "w"
  real_save = np.save

  def save(path, arr, *args, **kwargs):
    # The caches of the second input (400), once the first is done.
    if ".tmp-cache-" in str(path) and (workdir / "done.txt").exists():
      raise OSError("4096 requested and 4064 written")
    return real_save(path, arr, *args, **kwargs)

  monkeypatch.setattr(np, "save", save)
  with pytest.raises(common.WorkdirError) as e:
    certify(tiny_config(), workdir)
  message = str(e.value)
  assert message.startswith("the disk is full: no space left on device"), (
      message)
  assert os.path.join(str(workdir), "caches", "sigma_0.25", "400") in message
  assert (workdir / "done.txt").read_text() == "0\n"
  assert empty_folders(workdir) == []
  monkeypatch.undo()  # space freed
  certify(tiny_config(), workdir)
  assert tsv_rows(workdir) == tsv_rows(reference)
  # A short write elsewhere (NumPy's wording, no errno) reads the same.
  assert common.os_error_message(
      OSError("4096 requested and 10 written"), "/x/y").startswith(
          "the disk is full: no space left on device (/x/y)")
