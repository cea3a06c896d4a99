"""Fourier heat maps (ovc_jax.fourier) and their experiment's entry point."""

import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ovc_jax import fourier
from ovc_jax.certificates import ABSTAIN, SmoothingParams
from ovc_jax.certifiers import standard
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError

# The run and its rerun share the session's JAX compilation cache.
from commands import REPO
import test_reliability_experiments  # pylint: disable=g-import-not-at-top,wrong-import-position


# ---------------------------------------------------------------------------
# The basis


@pytest.mark.parametrize("height,width", [(8, 8), (6, 10), (7, 9), (32, 32)])
def test_basis_is_real_unit_norm_and_orthonormal_up_to_mirrored_pairs(
    height, width):
  basis = np.asarray(fourier.basis_images(height, width))
  half = width // 2 + 1
  assert basis.shape == (height, half, height, width)
  assert basis.dtype == np.float32 and np.all(np.isfinite(basis))  # real
  basis = basis.astype(np.float64)
  flat = basis.reshape(height * half, -1)
  np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-5)
  # Gram matrix = identity, except that the half-plane holds the mirrored
  # pairs of columns 0 and W/2 twice: those entries are the same image.
  expected = np.zeros((height * half, height * half))
  for k in range(height):
    for l in range(half):
      mk, ml = fourier.mirror(k, l, height, width)
      expected[k * half + l, k * half + l] = 1.0
      if ml < half:
        expected[k * half + l, mk * half + ml] = 1.0
  np.testing.assert_allclose(flat @ flat.T, expected, atol=1e-5)
  # The closed form of the construction: a unit-norm cosine.
  y, x = np.mgrid[:height, :width]
  for k, l in [(0, 0), (1, 0), (height - 1, 1), (2, half - 1)]:
    cosine = np.cos(2 * np.pi * (k * y / height + l * x / width))
    np.testing.assert_allclose(basis[k, l], cosine / np.linalg.norm(cosine),
                               atol=1e-6)


# ---------------------------------------------------------------------------
# The map's layout


def gatheluck_heatmap(matrix):
  """gatheluck/FourierHeatmap v0.2's create_fourier_heatmap_from_error_matrix,
  on their low-centred row order (rows rolled by H/2), written in NumPy."""
  rolled = np.roll(matrix, matrix.shape[0] // 2, axis=0)
  right = rolled[1:, :-1]
  left = np.flip(right, (0, 1))
  return np.concatenate([left[:, :-1], right], axis=1)


def test_map_layout_32_is_gatheluck_31x31_centred_on_the_lowest_frequency():
  assert fourier.map_shape(32, 32) == (31, 31)
  assert len(fourier.map_frequencies(32, 32)) == 31 * 16
  matrix = np.random.default_rng(0).random((32, 17))
  centred = fourier.heatmap_from_half_plane(matrix)
  assert centred.shape == (31, 31)
  np.testing.assert_array_equal(centred, gatheluck_heatmap(matrix))
  k = 15
  assert centred[k, k] == matrix[0, 0]                 # centre: (0, 0)
  assert centred[k + 3, k + 2] == matrix[3, 2]          # (ky, kx) = (3, 2)
  assert centred[k - 3, k - 2] == matrix[3, 2]          # its mirror
  assert centred[k - 5, k] == matrix[32 - 5, 0]         # (-5, 0)
  assert centred[k - 4, k + 7] == matrix[32 - 4, 7]     # (-4, 7)


def test_map_layout_224_is_the_63x63_low_frequency_crop():
  assert fourier.default_max_frequency(224, 224) == 31
  assert fourier.map_shape(224, 224) == (63, 63)
  freqs = fourier.map_frequencies(224, 224)
  assert len(freqs) == 63 * 32
  assert max(max(abs(fourier.signed_frequency(k, l, 224)[0]), l)
             for k, l in freqs) == 31
  matrix = np.random.default_rng(1).random((224, 113))
  centred = fourier.heatmap_from_half_plane(matrix)
  assert centred.shape == (63, 63)
  full = gatheluck_heatmap(matrix)                      # 223 x 223
  c = full.shape[0] // 2
  np.testing.assert_array_equal(centred, full[c - 31:c + 32, c - 31:c + 32])
  assert centred[31, 31] == matrix[0, 0]


# ---------------------------------------------------------------------------
# Exact answers: a linear classifier along one basis image


def linear_classifier(direction, margin):
  """Predicts 1 iff <direction, x> + margin > 0 (x flattened HWC)."""
  base = EmbeddingClassifier(LinearEncoder(), normalize=False)
  params = base.params(
      {"A": jnp.asarray(direction.reshape(1, -1), jnp.float32),
       "c": jnp.asarray([margin], jnp.float32)},
      jnp.asarray([[0.0], [1.0]], jnp.float32))
  return fourier.PlainClassifier(base), params


SIZE, NUM, V, KEY = 16, 400, 2.0, jax.random.key(7)


@pytest.mark.parametrize("target", [(3, 2), (SIZE - 5, 0)])
def test_grey_linear_classifier_errs_only_at_its_frequency_at_rate_one_half(
    target):
  # w = U_ab in channel 0 only; x0 = 0.5 (so <w, x0> = 0) and margin m = 1.
  # Perturbed, <w, x'> = m + v r_0 <U_ab, U_kl>: at U_ab (and its mirror, the
  # same image) it is m - v < 0 exactly when r_0 = -1 (v = 2 > m), elsewhere
  # m (orthogonal). |v U| <= 2 sqrt(2/256) = 0.18 < 0.5: no clipping.
  a, b = target
  u = np.asarray(fourier.basis_image(SIZE, SIZE, a, b))
  w = np.zeros((SIZE, SIZE, 3), np.float32)
  w[..., 0] = u
  clf, params = linear_classifier(w, 1.0)
  images = np.full((NUM, SIZE, SIZE, 3), 0.5, np.float32)
  labels = np.ones(NUM, np.int64)
  heatmap = fourier.fourier_heatmap(clf, params, images, labels, KEY, v=V,
                                    batch_size=128)
  assert heatmap.clean.errors == 0
  erring = {(a, b)} | ({fourier.mirror(a, b, SIZE, SIZE)} if b == 0 else set())
  e = heatmap.error_matrix
  for k, l in fourier.map_frequencies(SIZE, SIZE):
    if (k, l) in erring:
      # Exactly the images whose channel-0 sign, regenerated alone, is -1.
      signs = fourier.channel_signs(KEY, k, l, np.arange(NUM), SIZE)
      assert e[k, l] == np.mean(signs[:, 0] == -1)
      assert abs(e[k, l] - 0.5) < 0.1  # 1/2 in expectation (sd 0.025)
    else:
      assert e[k, l] == 0.0, (k, l)
  # In the map: nonzero at +-(ky, kx) only.
  kmax = fourier.default_max_frequency(SIZE, SIZE)
  ky, kx = fourier.signed_frequency(a, b, SIZE)
  nonzero = {tuple(int(i) - kmax for i in p)
             for p in np.argwhere(heatmap.error_map > 0)}
  assert nonzero == {(ky, kx), (-ky, -kx)}
  # Batching does not change a single sign.
  again = fourier.evaluate(clf, params,
                           fourier.image_batches(images, labels, 37), KEY,
                           (a, b), V)
  assert again.error_rate == e[a, b]


def test_three_channel_linear_classifier_errs_when_all_three_signs_are_negative():
  # w = U_ab / sqrt(3) in every channel: <w, x'> = m + v (r_0 + r_1 + r_2) /
  # sqrt(3). With v / sqrt(3) = 1.15 < m = 2 < sqrt(3) v = 3.46 it crosses
  # zero only when r = (-1, -1, -1): error probability 1/8.
  a, b = 2, 5
  u = np.asarray(fourier.basis_image(SIZE, SIZE, a, b))
  w = np.repeat(u[..., None], 3, axis=-1) / np.sqrt(3.0)
  clf, params = linear_classifier(w, 2.0)
  images = np.full((NUM, SIZE, SIZE, 3), 0.5, np.float32)
  labels = np.ones(NUM, np.int64)
  batches = fourier.image_batches(images, labels, 200)
  result = fourier.evaluate(clf, params, batches, KEY, (a, b), V)
  signs = fourier.channel_signs(KEY, a, b, np.arange(NUM), SIZE)
  assert result.errors == int(np.sum(np.all(signs == -1, axis=1)))
  assert abs(result.error_rate - 1 / 8) < 0.06
  assert fourier.evaluate(clf, params, batches, KEY, (a, b + 1), V).errors == 0


def test_perturbation_is_clipped_to_pixel_range():
  basis = fourier.basis_image(8, 8, 1, 1)
  x = jnp.zeros((2, 8, 8, 3)).at[1].set(1.0)
  out = fourier.perturb(x, basis, jnp.ones((2, 3)), 50.0)
  assert float(out.min()) == 0.0 and float(out.max()) == 1.0


# ---------------------------------------------------------------------------
# The smoothed classifier


def test_predict_rule_equals_scipy_binomtest():
  alpha = 0.01
  rows = [(a, b) for a in range(0, 41) for b in range(0, a + 1)]
  counts = np.array([[b, a, 0] for a, b in rows])  # top class is index 1
  got = fourier.predict_from_counts(counts, alpha)
  for (a, b), g in zip(rows, got):
    if a + b == 0:
      want = ABSTAIN
    else:
      want = 1 if stats.binomtest(a, a + b, 0.5).pvalue <= alpha else ABSTAIN
    if a == b and a > 0:
      want = ABSTAIN
    assert g == want, (a, b)
  # Ties go to the lower class index, as in standard.predict.
  assert fourier.predict_from_counts([[0, 30, 30]], alpha)[0] == ABSTAIN
  assert fourier.predict_from_counts([[50, 0, 50, 0]], 0.5)[0] == ABSTAIN


def test_smoothed_classifier_is_standard_predict_per_image():
  rng = np.random.default_rng(3)
  size, classes = 6, 3
  base = EmbeddingClassifier(LinearEncoder(), normalize=False)
  params = base.params(
      {"A": jnp.asarray(rng.normal(size=(4, size * size * 3)), jnp.float32),
       "c": jnp.zeros(4, jnp.float32)},
      jnp.asarray(rng.normal(size=(classes, 4)), jnp.float32))
  smoothing = SmoothingParams(sigma=0.3, n0=1, n=40, alpha=0.01, batch_size=16)
  clf = fourier.SmoothedClassifier(base, classes, smoothing.sigma, smoothing.n,
                                   smoothing.alpha, smoothing.batch_size)
  images = jnp.asarray(rng.random((10, size, size, 3)), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(
      jnp.arange(10))
  got, abstained = clf.decide(np.asarray(jax.jit(clf.device_outputs)(
      params, images, keys)))
  want = [standard.predict(keys[i], base, params, images[i], smoothing)
          for i in range(10)]
  assert got.tolist() == want
  assert abstained.tolist() == [p == ABSTAIN for p in want]
  assert ABSTAIN in want and any(p != ABSTAIN for p in want)


def test_abstentions_count_as_errors_and_are_reported():
  u = np.asarray(fourier.basis_image(8, 8, 1, 0))
  w = np.repeat(u[..., None], 3, axis=-1)
  plain, params = linear_classifier(w, 1.0)
  images = np.full((20, 8, 8, 3), 0.5, np.float32)
  labels = np.ones(20, np.int64)
  batches = fourier.image_batches(images, labels, 8)
  # n = 1: one draw is never significant, PREDICT always abstains.
  always, p = fourier.smoothed_classifier(plain, params, num_classes=2,
                                          sigma=0.1, n=1, batch_size=1)
  result = fourier.evaluate(always, p, batches, KEY, (3, 2), V)
  assert result == fourier.FrequencyResult(20, 20, 20)
  assert result.abstention_rate == 1.0
  # Tiny sigma: every draw agrees, PREDICT returns the base prediction.
  sharp, p = fourier.smoothed_classifier(plain, params, num_classes=2,
                                         sigma=1e-6, n=20, batch_size=20)
  for freq in [(1, 0), (3, 2)]:
    want = fourier.evaluate(plain, params, batches, KEY, freq, V)
    got = fourier.evaluate(sharp, p, batches, KEY, freq, V)
    assert got.errors == want.errors and got.abstentions == 0
  assert fourier.evaluate(plain, params, batches, KEY, (1, 0), V).errors > 0


# ---------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("call,message", [
    (lambda: fourier.check_v(0.0), "v (the L2 norm"),
    (lambda: fourier.check_v(-4.0), "v (the L2 norm"),
    (lambda: fourier.check_v(float("nan")), "v (the L2 norm"),
    (lambda: fourier.check_v(float("inf")), "v (the L2 norm"),
    (lambda: fourier.check_image_size(3, 32), "at least 4x4"),
    (lambda: fourier.map_shape(32, 32, 16), "max_frequency"),
    (lambda: fourier.SmoothedClassifier(None, 2, 0.25, 0), "n (noise draws"),
    (lambda: fourier.check_smoothing(sigma=0.25, n=0, alpha=0.001,
                                     batch_size=1), "n (noise draws"),
])
def test_bad_inputs_raise_config_error_with_one_line(call, message):
  with pytest.raises(ConfigError) as info:
    call()
  assert message in str(info.value) and "\n" not in str(info.value)


def test_small_images_are_refused_by_the_map():
  clf, params = linear_classifier(np.zeros((3, 3, 3), np.float32), 1.0)
  with pytest.raises(ConfigError, match="at least 4x4"):
    fourier.fourier_heatmap(clf, params, np.zeros((2, 3, 3, 3)), [1, 1], KEY,
                            v=1.0)
  with pytest.raises(ConfigError, match="v "):
    fourier.fourier_heatmap(clf, params, np.zeros((2, 3, 3, 3)), [1, 1], KEY,
                            v=0.0)


# ---------------------------------------------------------------------------
# The experiment


def test_experiment_with_v_zero_exits_1_with_one_line(warm_python, tmp_path):
  workdir = str(tmp_path / "w")
  proc = warm_python.run("experiments.fourier_heatmap", "--config.v=0",
                         f"--workdir={workdir}", timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: v "), proc.stderr
  assert not os.path.exists(workdir)


def test_experiment_quick_writes_maps_and_resumes(tmp_path, warm_python):
  workdir = str(tmp_path / "w")
  config = "--config=experiments/configs/fourier_heatmap.py:quick"
  proc = warm_python.run("experiments.fourier_heatmap", config,
                         f"--workdir={workdir}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stderr
  for name in ("error_map.npy", "error_map.csv", "error_map.png",
               "error_half_plane.npy", "summary.json", "frequencies.tsv"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  centred = np.load(os.path.join(workdir, "error_map.npy"))
  assert centred.shape == (5, 5) and np.all((0 <= centred) & (centred <= 1))
  with open(os.path.join(workdir, "frequencies.tsv")) as f:
    first = f.read()
  assert len(first.splitlines()) == 1 + 1 + 15  # header, clean, 5 x 3
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["maps"]["error"]["files"]["png"] == "error_map.png"
  # A rerun finds every row written and writes none again.
  proc = warm_python.run("experiments.fourier_heatmap", config,
                         f"--workdir={workdir}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "frequencies.tsv")) as f:
    assert f.read() == first
  np.testing.assert_array_equal(np.load(os.path.join(workdir, "error_map.npy")),
                                centred)


def _strict_json(path):
  """json.load that refuses NaN and Infinity (not JSON)."""
  def refuse(name):
    raise ValueError(f"{name} in {path}: not valid JSON")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_resume_with_other_weights_is_refused_and_k1_summary_is_json(tmp_path):
  """In process (compiled once): max_frequency = 1 leaves the middle band
  empty, which is null in summary.json (NaN is not JSON); a resume after a
  kill with other weights is refused, as certify and attack refuse it."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments import fourier_heatmap as fh  # pylint: disable=g-import-not-at-top
  from experiments.configs import fourier_heatmap as fh_config  # pylint: disable=g-import-not-at-top
  from ovc_jax.models import weights_io  # pylint: disable=g-import-not-at-top
  model = tmp_path / "model"
  shutil.copytree(os.path.join(REPO, "checkpoints", "toy_clip"), model)
  os.remove(model / "model.safetensors.sha256")  # the copy is edited below
  config = fh_config.get_config("quick")
  config.backbone, config.max_frequency, config.num_images = str(model), 1, 4
  workdir = str(tmp_path / "w")
  fh.run(config, workdir, stream=io.StringIO())
  summary = _strict_json(os.path.join(workdir, "summary.json"))
  bands = summary["maps"]["error"]["band_means"]
  assert bands["middle"] is None and bands["low"] is not None
  assert "null" in summary["maps"]["error"]["band_means_note"]
  old = weights_io.file_sha256(str(model / "model.safetensors"))
  assert summary["model"]["weights"]["sha256"] == old
  tsv = os.path.join(workdir, "frequencies.tsv")
  with open(tsv) as f:
    rows = f.read().splitlines()
  with open(os.path.join(workdir, "done.txt")) as f:
    done = f.read().splitlines()
  with open(os.path.join(workdir, "done.txt"), "w") as f:
    f.write(done[0] + "\n")  # as if killed after the clean pass
  new = test_reliability_experiments.change_one_weight(model)
  with pytest.raises(common.WorkdirError) as e:
    fh.run(config, workdir, stream=io.StringIO())
  message = str(e.value)
  assert "other model weights" in message and old in message and new in message
  assert "\n" not in message
  with open(tsv) as f:
    assert f.read().splitlines() == rows  # nothing written
