"""The experiments, end to end on the embedded default (the toy-world CLIP).

Each command runs as a user runs it, in a subprocess, in CI-sized settings:
a fresh interpreter where the test is about the run or its process (kill,
resume, timings), a fork of one warm interpreter (conftest's `warm_python`)
where only the command's output matters (bad flags, analysis of a finished
run).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ovc_jax import results

import commands
from commands import ENV, PLAIN_ENV, REPO

# A CI-sized ovc-mode run: 3 toy test images, one sigma, small n.
TINY = ["--config.skip=400", "--config.n0=50", "--config.n=400",
        "--config.irs.n_p=200", "--config.irs.gamma=0.05",
        "--config.batch_size=200", "--config.num_novel=2"]

# The tests that read the shared TINY run (conftest.tiny_certify_run) run on
# one xdist worker, so that it is made once.
SHARES_TINY_RUN = pytest.mark.xdist_group("tiny_certify_run")


def run(module, *args, check=True, timeout=600, env=None, warm=None):
  """`python -m module args...` in REPO: a fresh interpreter, or a fork of
  the `warm_python` fixture's (`warm`), which saves the seconds of importing
  JAX where the test is not about the process itself."""
  if warm is not None:
    assert env is None, "the warm interpreter has the tests' ENV"
    proc = warm.run(module, *args, timeout=timeout)
  else:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=ENV if env is None else env,
                          capture_output=True, text=True, timeout=timeout)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def tsv_rows_without_time(workdir):
  """{relative path: rows with the time column removed} of a run's TSVs."""
  out = {}
  for path in results.list_tsvs(os.path.join(workdir, "tsv")):
    with open(path) as f:
      lines = f.read().splitlines()
    time_col = lines[0].split("\t").index("time")
    out[os.path.relpath(path, workdir)] = [
        [v for j, v in enumerate(line.split("\t")) if j != time_col]
        for line in lines]
  return out


@pytest.fixture(scope="module")
def certify_run(tiny_certify_run):
  """conftest's session-wide TINY run (tests/test_distributed.py's reference
  too): (workdir, completed process)."""
  workdir, proc, _ = tiny_certify_run
  return workdir, proc


@SHARES_TINY_RUN
def test_certify_reports_every_method(certify_run):
  workdir, proc = certify_run
  for name in ("standard RS", "Modified-IRS", "Cached-OVC", "MVN-OVC (approximate)"):
    assert name in proc.stdout
  assert "toy-world CLIP" in proc.stderr + proc.stdout
  assert "ETA" in proc.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["inputs"] == 3
  # The main job draws its curves too.
  assert summary["figure"] == os.path.join(workdir, "certified_accuracy.png")
  assert os.path.getsize(summary["figure"]) > 10_000
  assert summary["cached_identical_to_standard"] == {"sigma_0.25": True}
  for method in ("standard", "irs", "cached", "mvn"):
    entry = summary["methods"][f"novel/{method}/sigma_0.25"]
    assert entry["seconds_per_input"] > 0
    assert entry["speedup_over_standard"] > 0
  # MVN rows say they are approximate.
  mvn = results.list_tsvs(os.path.join(workdir, "tsv", "mvn"))
  assert mvn and all(results.read_tsv(p)["approximate"].all() for p in mvn)


@SHARES_TINY_RUN
def test_summary_equals_a_cohen_style_computation_on_the_tsvs(certify_run):
  workdir, _ = certify_run
  with open(os.path.join(workdir, "summary.json")) as f:
    tables = json.load(f)["tables"]
  assert tables
  for rel, summary in tables.items():
    with open(os.path.join(workdir, rel)) as f:
      lines = f.read().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"))) for line in lines[1:]]
    # Cohen's analyze.py: (df["correct"] & (df["radius"] >= r)).mean()
    for r, value in summary["certified_accuracy"].items():
      expected = np.mean([int(row["correct"]) == 1 and float(row["radius"]) >= float(r)
                          for row in rows])
      assert value == pytest.approx(expected), (rel, r)
    assert summary["abstention_rate"] == pytest.approx(
        np.mean([row["predict"] == "-1" for row in rows]))


@pytest.mark.heavy  # starts its xdist group early
@SHARES_TINY_RUN
def test_kill_and_resume_gives_the_uninterrupted_tsvs(certify_run, tmp_path):
  reference, _ = certify_run
  workdir = str(tmp_path / "killed")
  done = os.path.join(workdir, "done.txt")
  # kill -9 twice, at different points: each run pauses in the middle of the
  # input after the first it finishes (commands.paused_certify), so each kill
  # lands mid-input, the first in input 400, the second in input 800.
  for _ in range(2):
    proc = subprocess.Popen(
        commands.paused_certify(f"--workdir={workdir}", *TINY),
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = open(done).read().count("\n") if os.path.exists(done) else 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(done) and open(done).read().count("\n") > before:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with open(done) as f:
    assert f.read() == "0\n400\n"
  run("experiments.certify", f"--workdir={workdir}", *TINY)
  assert tsv_rows_without_time(workdir) == tsv_rows_without_time(reference)


@SHARES_TINY_RUN
def test_analyze_draws_and_tabulates(certify_run, warm_python):
  workdir, _ = certify_run
  proc = warm_python.run("experiments.analyze", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Its own figure: certify's certified_accuracy.png is left alone.
  assert os.path.getsize(os.path.join(workdir, "analysis.png")) > 10_000
  assert "Cached-OVC" in proc.stdout and "r>=0" in proc.stdout


@SHARES_TINY_RUN
def test_calibrate_mvn(certify_run, warm_python):
  workdir, _ = certify_run
  proc = warm_python.run("experiments.calibrate_mvn",
                         f"--certify_workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "calibration.json")) as f:
    report = json.load(f)
  assert report["overall"]["pairs"] == 3 * 18  # inputs x (known + novel) prompts
  assert report["recommended_delta"] >= report["overall"]["delta"]
  assert "approximate" in proc.stdout
  assert os.path.exists(os.path.join(workdir, "mvn_vs_exact.png"))


@pytest.mark.parametrize("flag, message", [
    ("--config.sigmas=0.0,", "--config.sigmas holds 0.0"),
    ("--config.sigmas=-0.5,", "--config.sigmas holds -0.5"),
    ("--config.sigmas=nan,", "--config.sigmas holds 'nan,', which is not a number"),
    ("--config.sigmas=0.25,0.25", "--config.sigmas lists 0.25 twice"),
    ("--config.sigmaz=0.5", "unknown config field 'sigmaz' in "
     "--config.sigmaz=0.5 (did you mean --config.sigmas?); the fields are: "
     "alpha, backbone"),
    ("--config.n=many", "flag --config.n=many"),
    ("--config.n0=0", "n0"),
    ("--config.n=0", "n (estimation draws)"),
    ("--config.alpha=1.5", "alpha"),
    ("--config.batch_size=0", "batch size"),
    ("--config.irs.gamma=1.0", "gamma"),
    ("--config.mvn.delta=-0.1", "margin delta"),
    ("--config.irs.n_p=100000", "cannot exceed n"),
    ("--config.backbone=/nonexistent/model", "unknown model"),
    ("--config.dataset=mnist", "mnist"),
])
def test_bad_flags_fail_cleanly_and_write_nothing(warm_python, tmp_path, flag,
                                                  message):
  workdir = tmp_path / "w"
  proc = warm_python.run("experiments.certify", f"--workdir={workdir}", *TINY,
                         flag)
  assert proc.returncode == 1
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  # One line, in the one style.
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert proc.stderr.count("error: ") == 1
  assert not workdir.exists()


@SHARES_TINY_RUN
def test_a_workdir_of_another_configuration_is_refused(certify_run,
                                                       warm_python):
  workdir, _ = certify_run
  before = tsv_rows_without_time(workdir)
  proc = warm_python.run("experiments.certify", f"--workdir={workdir}", *TINY,
                         "--config.seed=1")
  assert proc.returncode != 0
  assert "different configuration (seed" in proc.stderr
  assert tsv_rows_without_time(workdir) == before


@pytest.mark.heavy
def test_paper_experiments_write_consistent_tables_and_figures(tmp_path,
                                                              warm_python):
  workdir = str(tmp_path / "paper")
  run("experiments.paper", "--config=experiments/configs/paper.py:ci",
      f"--workdir={workdir}", warm=warm_python)
  with open(os.path.join(workdir, "paper.json")) as f:
    report = json.load(f)
  for name in ("certified_accuracy_toy", "irs_applied_vs_sigma", "agreement_toy",
               "similarity_vs_pA_toy", "cached_vs_standard", "mvn_vs_exact",
               "speedup", "speedup_vs_embedding_time"):
    assert os.path.getsize(os.path.join(workdir, "figures", name + ".png")) > 10_000
  for name in ("certified_accuracy", "irs_speedup", "memory_speedup", "mvn_calibration"):
    for ext in (".csv", ".md"):
      assert os.path.exists(os.path.join(workdir, "tables", name + ext))
  assert report["cached_vs_standard"]["all_equal"]
  # The certified-accuracy table is the mean over known prompts of the TSVs'.
  run_dir = os.path.join(workdir, "runs", "toy", "normalized")
  for row in report["certified_accuracy"]:
    if row["noise_space"] != "normalized":
      continue
    paths = results.list_tsvs(os.path.join(run_dir, "tsv", "standard",
                                           f"sigma_{row['sigma']:g}"))
    known = [p for p in paths if os.path.basename(p).startswith("known")]
    expected = np.mean([results.summarize_tsv(p)["certified_accuracy"]["0.5"]
                        for p in known])
    assert row["r>=0.5"] == pytest.approx(expected)
  # IRS applied fractions are those of the IRS TSVs.
  for row in report["irs"]:
    run_dir = os.path.join(workdir, "runs", "toy", row["noise_space"])
    paths = results.list_tsvs(os.path.join(run_dir, "tsv", "irs",
                                           f"sigma_{row['sigma']:g}"))
    expected = np.mean([results.read_tsv(p)["irs_applied"].mean() for p in paths])
    assert row["irs_applied_fraction"] == pytest.approx(expected)


@pytest.mark.heavy
def test_benchmark_writes_every_field(tmp_path):
  workdir = str(tmp_path / "bench")
  # Without the shared compilation cache: the benchmark times compilation
  # (its cold / warm children use their own) and peak memory with it.
  proc = run("experiments.benchmark", f"--workdir={workdir}",
             "--config=experiments/configs/benchmark.py:ci", env=PLAIN_ENV)
  with open(os.path.join(workdir, "benchmark.json")) as f:
    report = json.load(f)
  for field in ("device", "jax_version", "n", "batch_size"):
    assert field in report
  toy = report["architectures"]["toy"]
  for field in ("encoder_images_per_s", "peer_encoder_images_per_s",
                "flops_per_image", "achieved_flops_per_s", "compile_s_cold",
                "compile_s_warm"):
    assert toy[field] is not None and toy[field] > 0, field
  for classes in ("10", "1000"):
    row = toy["classes"][classes]
    for field in ("standard_rs_s", "irs_s", "cached_ovc_s", "mvn_ovc_s",
                  "speedup_cached", "speedup_mvn", "speedup_irs",
                  "cache_bytes_cached", "cache_bytes_mvn", "sampler_overhead"):
      assert row[field] > 0, (classes, field)
    assert row["cached_identical_to_standard"]
  assert "speedup_cached" in proc.stdout
  assert os.path.getsize(os.path.join(workdir, "speedup.png")) > 10_000
  # The large-n section: both certifiers at large.n, standard RS scaled (and
  # said to be), a roofline against rates measured in the run, peak memory.
  large = report["large"]["toy"]
  assert large["n"] == report["large_n"] == 5000
  for rate in ("memory_gbps", "disk_gbps", "matmul_gflops"):
    assert large["machine"][rate] > 0, rate
  for classes in ("10", "1000"):
    row = large["classes"][classes]
    for field in ("cached_memory", "cached_disk_warm", "cached_disk_cold",
                  "cached_read_path_cold", "mvn_memory", "mvn_disk_warm",
                  "mvn_disk_cold", "cached_input_jax", "cached_input_numpy",
                  "cached_input_memmap_warm"):
      assert 0 < row[field]["min_s"] <= row[field]["median_s"], field
    assert row["inputs_identical"]
    assert row["standard_scaled"] and row["standard_s"] > 0
    assert [p[0] for p in row["standard_fit"]["points"]] == [200, 500]
    assert row["standard_s_from_encoder_rate"] > 0
    assert row["speedup_cached_memory"] > 1
    assert row["resident_before_cold"] in (None, 0.0) or (
        row["resident_before_cold"] < 0.05)
    for method in ("cached", "cached_cold", "mvn", "standard"):
      assert row["roofline"][method]["gflops"] > 0, method
  memory = large["classes"]["1000"]["peak_memory"]
  for method in ("cached", "mvn"):  # the ci variant leaves standard RS out
    assert memory[method]["first"]["peak_added_bytes"] > 0, method
  for text in ("n = 5,000 section", "SCALED", "roofline", "peak memory",
               "approximate"):
    assert text in proc.stdout, text
  # The batched section: 8 toy inputs in one jit(vmap(core.certify)) call
  # against a loop over standard.certify, the same certificates.
  batched = report["batched"]
  assert (batched["inputs"], batched["n0"], batched["n"]) == (8, 20, 100)
  row = batched["rows"]["50"]
  assert row["samples_per_step_batched"] == 8 * 50
  assert row["batched_s"] > 0 and row["loop_s"] > 0
  assert row["speedup"] == pytest.approx(row["loop_s"] / row["batched_s"])
  assert row["same_counts"] and row["same_predictions"]
  assert row["radius_within_tolerance"]
  assert "one jit(vmap(core.certify)) call" in proc.stdout
  # The compressed-cache section: bytes, ambiguous rows, regeneration and
  # the identity with standard RS on the toy CLIP's own rows; Cached-OVC's
  # time from memory and a cold disk against float32; the storage table.
  section = report["compressed"]
  assert section["formats"] == ["int16", "int8"]
  toy_row = section["toy_real"]["sigmas"]["0.25"]
  assert toy_row["rows_per_input"] == 200  # n0 + n of the ci variant
  for fmt, ratio in (("int16", 0.6), ("int8", 0.3)):
    assert 0 < toy_row[fmt]["ratio"] < ratio, fmt
    assert toy_row[fmt]["identical_to_standard"], fmt
    for classes in ("10", "1000"):
      cell = toy_row[fmt]["classes"][classes]
      assert 0 <= cell["ambiguous_share"] <= cell["ambiguous_share_max"] <= 1
      assert cell["encoder_passes"] >= cell["encoder_rows"] >= 0
  timing = section["timing"]["toy"]
  assert timing["n"] == 5000 and timing["disk_gbps"] > 0
  for classes in ("10", "1000"):
    row = timing["classes"][classes]
    for fmt in ("float32", "int16", "int8"):
      for where in ("memory", "cold"):
        assert 0 < row[fmt][where]["min_s"] <= row[fmt][where]["median_s"]
    assert row["speedup_int8_cold"] > 0 and row["speedup_int16_memory"] > 0
    assert row["conservative_radius_at_most_exact"]
  storage = section["storage"]
  assert storage["ViT-B/32"]["float32"] == 500 * 4 * 100_100 * 512 * 4
  assert storage["total"]["int8"] < 0.26 * storage["total"]["float32"]
  assert any("regenerate mode identical" in t["target"]
             for t in report["targets"])
  assert "Compressed caches" in proc.stdout
