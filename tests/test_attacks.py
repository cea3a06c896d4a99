"""PGD attacks: constraints, the known optimum on linear classifiers, restarts,
bad inputs, and the attack experiment's error handling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import attacks
from ovc_jax import clipure
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError, InputError

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))
E, C = 8, 4


def tanh_encoder(params, images):
  """A small non-linear encoder on [B, 4, 4, 3] images."""
  h = jnp.tanh(images.reshape(images.shape[0], -1) @ params["w1"])
  return h @ params["w2"]


TANH = EmbeddingClassifier(tanh_encoder, normalize=True)
PURIFIED = EmbeddingClassifier(
    clipure.PurifiedEncoder(tanh_encoder, steps=3, step_size=0.5),
    normalize=True)


def tanh_setup(batch=6, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w1": jnp.asarray(rng.normal(size=(D, 16)) / 2, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(16, E)), jnp.float32)}
  u = rng.normal(size=(C, E))
  u = jnp.asarray(u / np.linalg.norm(u, axis=1, keepdims=True), jnp.float32)
  images = rng.uniform(size=(batch,) + SHAPE).astype(np.float32)
  images[0, 0] = 0.0  # pixels on the box's faces
  images[1, 1] = 1.0
  z = tanh_encoder(params, jnp.asarray(images))
  labels = np.array(jnp.argmax(z @ u.T, axis=1), np.int32)  # clean-correct
  labels[-1] = (labels[-1] + 1) % C  # one clean mistake
  return params, u, images, labels


@pytest.mark.parametrize("norm,eps,step", [("linf", 8 / 255, 2 / 255),
                                           ("l2", 0.5, 0.2)])
def test_adversarial_images_stay_within_eps_and_the_pixel_box(norm, eps, step):
  params, u, images, labels = tanh_setup()
  result = attacks.pgd_attack(TANH, params, images, labels, u, jax.random.key(0),
                              norm=norm, eps=eps, steps=8, step_size=step,
                              restarts=2)
  adv = np.asarray(result.adversarial)
  assert adv.shape == images.shape
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  delta = (adv - images).reshape(len(images), -1)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-7
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps * (1 + 1e-6)
  correct = np.asarray(result.correct)
  clean = np.asarray(result.clean_correct)
  np.testing.assert_array_equal(clean, np.arange(6) < 5)
  assert not np.any(correct & ~clean)  # robust implies clean
  assert not correct.all()  # the attack does something
  # Where an image was fooled with a clear margin, its adversarial image is
  # misclassified when evaluated again.
  again = np.asarray(attacks.predict_correct(TANH, params, adv, labels, u))
  clear = np.asarray(result.margin) > 1e-3
  assert not np.any(again & clear)
  np.testing.assert_array_equal(again[~correct & clear], False)


def test_eps_zero_changes_nothing():
  params, u, images, labels = tanh_setup()
  clean = np.asarray(attacks.predict_correct(TANH, params, images, labels, u))
  for norm in attacks.NORMS:
    result = attacks.pgd_attack(TANH, params, images, labels, u,
                                jax.random.key(1), norm=norm, eps=0.0, steps=3,
                                step_size=0.1, restarts=2)
    np.testing.assert_array_equal(np.asarray(result.adversarial), images)
    np.testing.assert_array_equal(np.asarray(result.correct), clean)
    np.testing.assert_array_equal(np.asarray(result.clean_correct), clean)


def test_more_restarts_only_fool_more_and_keys_are_per_image():
  params, u, images, labels = tanh_setup(seed=1)
  kw = dict(norm="linf", eps=3 / 255, steps=3, step_size=1 / 255)
  key = jax.random.key(2)
  one = attacks.pgd_attack(TANH, params, images, labels, u, key, restarts=1, **kw)
  three = attacks.pgd_attack(TANH, params, images, labels, u, key, restarts=3, **kw)
  # Restart 0 is the same in both; an image must survive every restart.
  assert not np.any(np.asarray(three.correct) & ~np.asarray(one.correct))
  assert np.all(np.asarray(three.margin) >= np.asarray(one.margin))
  # With per-image keys, an image's attack does not depend on its batch.
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(6))
  full = attacks.pgd_attack(TANH, params, images, labels, u, keys, restarts=1, **kw)
  np.testing.assert_array_equal(np.asarray(full.correct), np.asarray(one.correct))
  part = attacks.pgd_attack(TANH, params, images[2:4], labels[2:4], u,
                            keys[2:4], restarts=1, **kw)
  np.testing.assert_allclose(np.asarray(part.adversarial),
                             np.asarray(full.adversarial)[2:4], atol=1e-6)


def test_the_attack_differentiates_through_the_purification():
  params, u, images, labels = tanh_setup(seed=2)
  blank = jnp.asarray(np.random.default_rng(3).normal(size=E), jnp.float32)
  pparams = clipure.purified_encoder_params(params, blank)
  z = PURIFIED.embed(pparams, jnp.asarray(images))
  labels = np.asarray(jnp.argmax(z @ u.T, axis=1), np.int32)  # purified-correct
  kw = dict(norm="l2", eps=1.0, steps=5, step_size=0.3, restarts=1,
            random_start=False)
  plain = attacks.pgd_attack(TANH, params, images, labels, u, jax.random.key(0), **kw)
  pure = attacks.pgd_attack(PURIFIED, pparams, images, labels, u,
                            jax.random.key(0), **kw)
  assert np.all(np.isfinite(np.asarray(pure.adversarial)))
  # Other gradients, other points; and the attack fools the purified model too.
  assert not np.allclose(np.asarray(pure.adversarial),
                         np.asarray(plain.adversarial), atol=1e-3)
  assert np.asarray(pure.clean_correct).all()
  assert not np.asarray(pure.correct).all()


def binary_linear(seed, norm):
  """z = w.x + c_i (class 0 iff z >= 0) on three images at 0.5 + small noise,
  each at distance 0.2 from the boundary in `norm`: the minimal perturbation
  has L2 norm margin / ||w||_2, or L-inf norm margin / ||w||_1."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=D)
  x0 = (0.5 + rng.uniform(-0.05, 0.05, size=(3, D))).astype(np.float32)
  dist = 0.2
  margin = dist * (np.linalg.norm(w) if norm == "l2" else np.abs(w).sum())
  c = margin - x0.astype(np.float64) @ w  # w.x0 + c = margin > 0: class 0
  return w, x0.reshape((3,) + SHAPE), c, dist


LINEAR = EmbeddingClassifier(LinearEncoder(), normalize=False)


@pytest.mark.parametrize("norm", attacks.NORMS)
def test_pgd_reaches_the_minimal_perturbation_of_a_linear_classifier(norm):
  w, x0, c, dist = binary_linear(0, norm)
  u = jnp.asarray([[1.0], [-1.0]], jnp.float32)  # logits (z, -z)
  label = np.zeros(1, np.int32)
  kw = dict(norm=norm, steps=40, step_size=0.25 * dist, restarts=1,
            logit_scale=1.0)
  for i in range(3):  # one offset c_i per image: each alone
    params = {"A": jnp.asarray(w[None], jnp.float32),
              "c": jnp.asarray([c[i]], jnp.float32)}
    x = x0[i:i + 1]
    above = attacks.pgd_attack(LINEAR, params, x, label, u, jax.random.key(i),
                               eps=1.02 * dist, **kw)
    below = attacks.pgd_attack(LINEAR, params, x, label, u, jax.random.key(i),
                               eps=0.98 * dist, **kw)
    assert bool(above.clean_correct[0]) and bool(below.clean_correct[0])
    assert not bool(above.correct[0])
    assert bool(below.correct[0])
    delta = (np.asarray(above.adversarial) - x).reshape(-1)
    size = np.abs(delta).max() if norm == "linf" else np.linalg.norm(delta)
    assert dist * (1 - 1e-5) <= size <= 1.02 * dist * (1 + 1e-6)


@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"),
    (dict(step_size=0.0), "step size"), (dict(step_size=-1.0), "step size"),
    (dict(restarts=0), "restarts"), (dict(norm="l1"), "norm"),
    (dict(logit_scale=0.0), "logit scale")])
def test_bad_arguments_raise_config_error(kwargs, name):
  params, u, images, labels = tanh_setup()
  args = dict(norm="linf", eps=0.1, steps=1, step_size=0.1, restarts=1)
  args.update(kwargs)
  with pytest.raises(ConfigError, match=name):
    attacks.pgd_attack(TANH, params, images, labels, u, jax.random.key(0), **args)


def test_images_outside_the_pixel_box_raise_input_error():
  params, u, images, labels = tanh_setup()
  with pytest.raises(InputError, match=r"\[0, 1\]"):
    attacks.pgd_attack(TANH, params, images * 2, labels, u, jax.random.key(0),
                       norm="l2", eps=0.1, steps=1, step_size=0.1)


# ---------------------------------------------------------------------------
# The experiment's bad flags: one line, exit status 1 (conftest's warm_python:
# the command as `python -m` runs it, without starting Python and JAX again).


@pytest.mark.parametrize("flag,word", [("--config.linf.eps=-0.1", "eps"),
                                       ("--config.steps=-1", "steps"),
                                       ("--config.l2.step_size=0", "step size")])
def test_attack_experiment_bad_flag_exits_1_with_one_line(warm_python, tmp_path,
                                                          flag, word):
  proc = warm_python.run("experiments.attack", f"--workdir={tmp_path}",
                         "--config=experiments/configs/attack.py:quick", flag,
                         timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ") and word in lines[0]
  assert not os.path.exists(tmp_path / "results.tsv")


@pytest.mark.parametrize("flags,words", [
    (["--config.clipure.attack_gradients=full,exact"],
     ["attack gradient must be one of", "'exact'"]),
    (["--config.clipure.attack_gradients=bpda", "--config.clipure.steps=0"],
     ["attack gradient 'bpda' needs a purified classifier"]),
    (["--config.clipure.attack_gradients=full,full"], ["names one twice"]),
    (["--config.clipure.batch_equivalents=0,2"], ["batch_equivalents"])])
def test_attack_experiment_bad_attack_gradient_exits_1_with_one_line(
    warm_python, tmp_path, flags, words):
  proc = warm_python.run("experiments.attack", f"--workdir={tmp_path}",
                         "--config=experiments/configs/attack.py:quick",
                         *flags, timeout=300)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ")
  for word in words:
    assert word in lines[0]
  assert not os.path.exists(tmp_path / "results.tsv")


def test_masking_variant_lists_every_gradient_and_batch_equivalent():
  from experiments import attack as attack_experiment  # pylint: disable=g-import-not-at-top
  from experiments.configs import attack as attack_configs  # pylint: disable=g-import-not-at-top
  models = attack_experiment.models_of(attack_configs.get_config("masking"))
  assert len(models) == 13
  assert models[0].key == "clip" and models[0].step_size is None
  keys = [m.key for m in models]
  assert keys[1:4] == ["clipure", "clipure_official", "clipure_bpda"]
  assert "clipure_b256_bpda" in keys
  steps = {m.key: m.step_size for m in models}
  np.testing.assert_allclose(
      [steps["clipure"], steps["clipure_b2"], steps["clipure_b32_official"],
       steps["clipure_b256_bpda"]],
      [30.0, 30 / np.sqrt(2), 30 / np.sqrt(32), 30 / np.sqrt(256)])
  # The default config's table is unchanged: CLIP and CLIPure-Cos.
  assert [m.key for m in attack_experiment.models_of(
      attack_configs.get_config())] == ["clip", "clipure"]


@pytest.mark.heavy
def test_attack_experiment_runs_with_the_official_gradient_ci_sized(tmp_path):
  # CI-sized: 2 images, 1 PGD step, 2 purification steps of size 30.
  from experiments import attack as attack_experiment  # pylint: disable=g-import-not-at-top
  from experiments.configs import attack as attack_configs  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  config = attack_configs.get_config("quick")
  config.max, config.batch_size, config.steps = 100, 2, 1  # images 0 and 50
  config.clipure.steps = 2
  config.clipure.attack_gradients = "official"
  config.clipure.gradient_path_images = 2
  setup, summary = attack_experiment.run(config, str(tmp_path),
                                         stream=io.StringIO())
  assert list(summary["models"]) == ["clip", "clipure_official"]
  assert summary["models"]["clipure_official"]["attack_gradient"] == "official"
  columns = attack_experiment.read_results(str(tmp_path / "results.tsv"),
                                           setup.models)
  assert len(columns["idx"]) == 2
  assert "clipure_official_linf" in columns and "clipure_linf" not in columns
  path = summary["gradient_path"]
  # 2 steps of 30: what is left of the gradient is at most (1 + 900)^-1 of it
  # across the plane of (z, blank), less within it (float64).
  ratio = path["embedding_float64"]["norm_ratio"]
  assert 0 < ratio["max"] <= 1.001 / 901
  assert path["image_float32"]["norm_ratio"]["max"] < 1e-2
  geo = path["geometry"]
  np.testing.assert_allclose(geo["turn_per_step_degrees"],
                             np.degrees(np.arctan(30.0)))
  out = io.StringIO()
  attack_experiment.print_report(setup, summary, stream=out)
  assert "official gradient" in out.getvalue()
  assert "gradient path" in out.getvalue()
