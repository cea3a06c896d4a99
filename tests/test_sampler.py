"""The keyed sampler: batch-size and device-count invariance, traces, sharding."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import sampler
from ovc_jax.classifiers import EmbeddingClassifier, LinearEncoder
from ovc_jax.errors import ConfigError

D, E, C = 12, 6, 5  # input size, embedding size, classes


def _linear_params(seed=0, prompts=None):
  rng = np.random.default_rng(seed)
  shape = (C, E) if prompts is None else (prompts, C, E)
  return {"encoder": {"A": jnp.asarray(rng.normal(size=(E, D)), jnp.float32),
                      "c": jnp.asarray(rng.normal(size=E) * 0.1, jnp.float32)},
          "class_embeddings": jnp.asarray(rng.normal(size=shape), jnp.float32)}


CLASSIFIER = EmbeddingClassifier(LinearEncoder(), normalize=True)


def _x(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(3, 2, 2)),
                     jnp.float32)


def test_sample_i_is_fold_in_of_i():
  key = jax.random.key(3)
  idx = jnp.array([0, 5, 17])
  noise = sampler.standard_normal_samples(key, idx, (4,))
  for row, i in zip(noise, [0, 5, 17]):
    np.testing.assert_array_equal(
        row, jax.random.normal(jax.random.fold_in(key, i), (4,)))


@pytest.mark.parametrize("outputs", [("counts", "predictions", "embeddings")])
def test_outputs_identical_for_every_batch_size(outputs):
  params, x, key = _linear_params(), _x(), jax.random.key(0)
  n = 200
  results = [sampler.sample_under_noise(
      CLASSIFIER, params, x, key, num_samples=n, sigma=0.7, batch_size=b,
      num_classes=C, outputs=outputs) for b in (1, 7, 64, n)]
  first = jax.device_get(results[0])
  assert first["counts"].sum() == n
  assert first["predictions"].shape == (n,)
  assert first["embeddings"].shape == (n, E)
  np.testing.assert_array_equal(
      first["counts"], np.bincount(first["predictions"], minlength=C))
  for r in results[1:]:
    r = jax.device_get(r)
    np.testing.assert_array_equal(r["counts"], first["counts"])
    np.testing.assert_array_equal(r["predictions"], first["predictions"])
    np.testing.assert_allclose(r["embeddings"], first["embeddings"], atol=1e-6)


def test_counts_and_predictions_of_many_prompts():
  params, x, key = _linear_params(prompts=3), _x(), jax.random.key(1)
  out = jax.device_get(sampler.sample_under_noise(
      CLASSIFIER, params, x, key, num_samples=50, sigma=0.5, batch_size=16,
      num_classes=C, outputs=("counts", "predictions")))
  assert out["counts"].shape == (3, C)
  assert out["predictions"].shape == (50, 3)
  for p in range(3):
    np.testing.assert_array_equal(
        out["counts"][p], np.bincount(out["predictions"][:, p], minlength=C))
  # Prompt p alone on the same key gives the same predictions.
  single = dict(params, class_embeddings=params["class_embeddings"][1])
  alone = sampler.sample_under_noise(
      CLASSIFIER, single, x, key, num_samples=50, sigma=0.5, batch_size=16,
      num_classes=C, outputs=("predictions",))
  np.testing.assert_array_equal(alone["predictions"], out["predictions"][:, 1])


def test_noise_is_what_the_formula_says():
  """Embeddings from the sampler equal the encoder on x + sigma * normal(fold_in(key, i))."""
  params, x, key = _linear_params(), _x(), jax.random.key(2)
  out = sampler.sample_under_noise(
      CLASSIFIER, params, x, key, num_samples=9, sigma=0.3, batch_size=4,
      num_classes=C, outputs=("embeddings",))
  noise = sampler.standard_normal_samples(key, jnp.arange(9), x.shape)
  expected = CLASSIFIER.embed(params["encoder"], x[None] + 0.3 * noise)
  np.testing.assert_allclose(out["embeddings"], expected, atol=1e-6)


TRACES = []


@dataclasses.dataclass(frozen=True)
class CountingClassifier:
  def __call__(self, params, inputs):
    TRACES.append(inputs.shape)  # runs only while tracing
    return CLASSIFIER(params, inputs)


def test_compiled_once_per_shape():
  params = _linear_params()
  TRACES.clear()
  kwargs = dict(num_samples=100, sigma=0.25, batch_size=32, num_classes=C)
  sampler.sample_under_noise(CountingClassifier(), params, _x(1),
                             jax.random.key(0), **kwargs)
  traced = len(TRACES)
  assert traced >= 1
  # A second input, key, sigma and class matrix of the same shapes: no retrace.
  other = _linear_params(seed=5)
  sampler.sample_under_noise(CountingClassifier(), other, _x(2),
                             jax.random.key(9), **dict(kwargs, sigma=0.5))
  assert len(TRACES) == traced, "certifying a second input re-traced"


@pytest.mark.parametrize("bad, message", [
    (dict(num_samples=0), "noise samples"),
    (dict(batch_size=0), "batch size"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-1.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(outputs=("logits",)), "unknown sampler output"),
])
def test_bad_arguments(bad, message):
  kwargs = dict(num_samples=10, sigma=0.5, batch_size=4, num_classes=C)
  kwargs.update(bad)
  with pytest.raises(ConfigError, match=message):
    sampler.sample_under_noise(CLASSIFIER, _linear_params(), _x(),
                               jax.random.key(0), **kwargs)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from test_sampler import CLASSIFIER, C, _linear_params, _x
    from ovc_jax import sampler
    assert jax.device_count() == 4, jax.devices()
    params, x, key = _linear_params(), _x(), jax.random.key(0)
    out = {{}}
    for name, mesh in (("one", None), ("four", sampler.sample_mesh()),
                       ("two", sampler.sample_mesh(jax.devices()[:2]))):
      for b in (7, 64):
        r = jax.device_get(sampler.sample_under_noise(
            CLASSIFIER, params, x, key, num_samples=203, sigma=0.7,
            batch_size=b, num_classes=C, outputs=("counts", "predictions"),
            mesh=mesh))
        out[f"{{name}}-{{b}}"] = [r["counts"].tolist(), r["predictions"].tolist()]
    print(json.dumps(out))
""")


def test_sharded_over_four_host_devices():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  script = SHARDED_SCRIPT.format(tests=os.path.dirname(__file__))
  proc = subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  reference = results.pop("one-7")
  assert sum(reference[0]) == 203
  for name, value in results.items():
    assert value == reference, name


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_key_streams_are_pairwise_disjoint(seed):
  ids = list(sampler.KEY_STREAMS.values())
  assert len(set(ids)) == len(ids)
  assert set(sampler.KEY_STREAMS) >= {"selection", "estimation", "prediction",
                                      "gaussian"}
  key = jax.random.key(seed)
  m = 300
  samples = {
      name: np.asarray(sampler.standard_normal_samples(
          sampler.stream_key(key, name), jnp.arange(m), (4,)))
      for name in sampler.KEY_STREAMS}
  # The named helpers are the same streams.
  np.testing.assert_array_equal(samples["selection"], np.asarray(
      sampler.standard_normal_samples(sampler.selection_key(key),
                                      jnp.arange(m), (4,))))
  np.testing.assert_array_equal(samples["estimation"], np.asarray(
      sampler.standard_normal_samples(sampler.estimation_key(key),
                                      jnp.arange(m), (4,))))
  names = sorted(samples)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      # No sample of one stream equals any sample of another (a shared sample
      # key would give an identical row).
      same = np.all(samples[a][:, None] == samples[b][None], axis=-1)
      assert not same.any(), (a, b)


def test_unknown_key_stream():
  with pytest.raises(ConfigError, match="unknown key stream"):
    sampler.stream_key(jax.random.key(0), "selections")


def _bincount_reference(preds, valid, num_classes):
  preds = np.asarray(preds)
  flat = preds.reshape(preds.shape[0], -1)
  out = []
  for p in range(flat.shape[1]):
    col = flat[np.asarray(valid), p]
    col = col[(col >= 0) & (col < num_classes)]
    out.append(np.bincount(col, minlength=num_classes))
  return np.stack(out).reshape(preds.shape[1:] + (num_classes,))


@pytest.mark.parametrize("shape", [(40,), (40, 3)])
def test_count_classes_equals_bincount(shape):
  rng = np.random.default_rng(len(shape))
  preds = rng.integers(-1, C + 1, size=shape)  # -1 and C are out of range
  assert (preds == -1).any() and (preds == C).any()
  valid = rng.random(shape[0]) < 0.7
  got = np.asarray(jax.jit(sampler.count_classes, static_argnums=2)(
      jnp.asarray(preds, jnp.int32), jnp.asarray(valid), C))
  expected = _bincount_reference(preds, valid, C)
  assert got.shape == shape[1:] + (C,)
  np.testing.assert_array_equal(got, expected)
  # All rows valid: every in-range prediction is counted.
  all_valid = np.asarray(sampler.count_classes(
      jnp.asarray(preds, jnp.int32), jnp.ones(shape[0], bool), C))
  np.testing.assert_array_equal(
      all_valid, _bincount_reference(preds, np.ones(shape[0], bool), C))
  assert all_valid.sum() == np.sum((preds >= 0) & (preds < C))
