"""Sequential OVC: the known prompts' pass keeps exactly its draws, and a novel
prompt certified from them (growing them when its rule needs more) gets what
the sequential certifier gives it from scratch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovc_jax import cache_codec
from ovc_jax import caches
from ovc_jax import ovc
from ovc_jax.certificates import SmoothingParams
from ovc_jax.certifiers import cached_ovc
from ovc_jax.certifiers import sequential as sq
from ovc_jax.certifiers.modified_irs import IRSParams
from ovc_jax.classifiers import EmbeddingClassifier
from ovc_jax.errors import ConfigError, OVCError

D, E, C = 8, 6, 5


def mlp_encoder(params, inputs):
  h = jnp.tanh(inputs.reshape(inputs.shape[0], -1) @ params["w1"])
  return h @ params["w2"]


MLP = EmbeddingClassifier(mlp_encoder, normalize=True)
SMOOTHING = SmoothingParams(sigma=0.5, n0=64, n=1600, alpha=0.01,
                            batch_size=50)
PARAMS = ovc.OVCParams(SMOOTHING, IRSParams(n_p=100))
SEQ = sq.SequentialParams(max_radius=0.15, n_max=1600, first_block=50)


def setup(num_prompts):
  rng = np.random.default_rng(0)
  enc = {"w1": jnp.asarray(rng.normal(size=(D, 16)) / 2, jnp.float32),
         "w2": jnp.asarray(rng.normal(size=(16, E)), jnp.float32)}
  u = rng.normal(size=(num_prompts, C, E))
  return enc, jnp.asarray(u / np.linalg.norm(u, axis=-1, keepdims=True),
                          jnp.float32)


def assert_same(a, b):
  assert (a.draws, a.checkpoint, a.reason) == (b.draws, b.checkpoint, b.reason)
  assert a.certificate.prediction == b.certificate.prediction
  assert a.certificate.radius == b.certificate.radius
  np.testing.assert_array_equal(a.certificate.counts, b.certificate.counts)


def test_novel_prompts_from_the_known_pass_equal_scratch_including_growth():
  enc, prompts = setup(10)
  known, novel = prompts[:2], prompts[2:]
  grew = same = 0
  for i in range(4):
    x = jnp.asarray(np.random.default_rng(20 + i).normal(size=D), jnp.float32)
    key = jax.random.key(i)
    k = ovc.certify_known_prompts_sequential(MLP, enc, x, key, known, PARAMS,
                                             SEQ)
    used = max(r.draws for r in k.results)
    assert k.embedding_draws.estimation.shape[0] == used  # exactly the draws
    assert k.encoder_passes == SMOOTHING.n0 + used  # checkpoints % 50 == 0
    for p in range(len(known)):
      assert_same(k.results[p], sq.certify_sequential(
          MLP, MLP.params(enc, known[p]), x, key, SMOOTHING, SEQ))
    for u in novel:
      got = ovc.certify_novel_prompt_sequential(
          "cached", MLP, enc, x, key, k.embedding_draws, u, PARAMS, SEQ)
      scratch = sq.certify_sequential(MLP, MLP.params(enc, u), x, key,
                                      SMOOTHING, SEQ)
      assert_same(got.result, scratch)
      assert not got.approximate
      have = k.embedding_draws.estimation.shape[0]
      if scratch.draws > have:  # the cache had to grow, by its tail only
        grew += 1
        assert got.encoder_passes == scratch.draws - have
        assert got.embedding_draws.estimation.shape[0] == scratch.draws
        np.testing.assert_array_equal(got.embedding_draws.estimation[:have],
                                      k.embedding_draws.estimation)
      else:
        same += 1
        assert got.encoder_passes == 0
        assert got.embedding_draws is k.embedding_draws
  assert grew and same, (grew, same)  # both cases were exercised


def test_mvn_from_the_draws_made_is_labelled_approximate():
  enc, prompts = setup(3)
  x = jnp.asarray(np.random.default_rng(5).normal(size=D), jnp.float32)
  key = jax.random.key(5)
  k = ovc.certify_known_prompts_sequential(MLP, enc, x, key, prompts[:2],
                                           PARAMS, SEQ)
  got = ovc.certify_novel_prompt_sequential(
      "mvn", MLP, enc, x, key, k.embedding_draws, prompts[2], PARAMS, SEQ)
  assert got.approximate and got.method == "mvn"
  assert got.encoder_passes == 0 and got.result.draws == SEQ.n_max
  assert int(np.sum(got.result.certificate.counts)) == SEQ.n_max


def test_bad_calls():
  enc, prompts = setup(2)
  x = jnp.zeros(D, jnp.float32)
  key = jax.random.key(0)
  with pytest.raises(ConfigError, match="unknown sequential method"):
    ovc.certify_novel_prompt_sequential("irs", MLP, enc, x, key, None,
                                        prompts[0], PARAMS, SEQ)
  with pytest.raises(ConfigError, match=r"\[P, C, d\]"):
    ovc.certify_known_prompts_sequential(MLP, enc, x, key, prompts[0],
                                         PARAMS, SEQ)


@pytest.mark.parametrize("precision", [None, 0.05])
def test_replay_from_a_full_cache_equals_the_live_run_and_its_passes(precision):
  """Replaying the sequential run on a fixed-n cache gives the live run's
  results and counts its encoder passes, growth of the cache included."""
  enc, prompts = setup(8)
  known, novel = prompts[:3], prompts[3:]
  seq = SEQ.replace(precision=precision)
  grew = 0
  for i in range(3):
    x = jnp.asarray(np.random.default_rng(40 + i).normal(size=D), jnp.float32)
    key = jax.random.key(40 + i)
    live_known = ovc.certify_known_prompts_sequential(MLP, enc, x, key, known,
                                                      PARAMS, seq)
    cache, passes, live_novel = live_known.embedding_draws, 0, []
    for u in novel:
      r = ovc.certify_novel_prompt_sequential("cached", MLP, enc, x, key,
                                              cache, u, PARAMS, seq)
      cache, passes = r.embedding_draws, passes + r.encoder_passes
      live_novel.append(r.result)
    grew += passes > 0
    full = ovc.certify_known_prompts(MLP, enc, x, key, known, PARAMS).caches
    replay = ovc.replay_sequential(full.embedding_draws, known, list(novel),
                                   PARAMS, seq)
    for a, b in zip(replay.known, live_known.results):
      assert_same(a, b)
    for a, b in zip(replay.novel, live_novel):
      assert_same(a, b)
    assert replay.encoder_passes == live_known.encoder_passes + passes
  assert grew  # some novel prompt extended the cache


def test_replay_needs_a_cache_of_n_max_draws():
  enc, prompts = setup(2)
  x = jnp.zeros(D, jnp.float32)
  full = ovc.certify_known_prompts(
      MLP, enc, x, jax.random.key(0), prompts,
      ovc.OVCParams(SMOOTHING.replace(n=800), IRSParams(n_p=100))).caches
  with pytest.raises(ConfigError, match="at least n_max = 1600"):
    ovc.replay_sequential(full.embedding_draws, prompts, [], PARAMS, SEQ)


def _near_tie(u, eps):
  u = np.array(u)
  u[1] = u[0] + eps * np.random.default_rng(9).normal(size=u.shape[1])
  return jnp.asarray(u, jnp.float32)


def test_a_compressed_cache_grows_and_certifies_as_scratch():
  """Known pass's draws compressed to int8; novel prompts (near ties among
  them, so that samples are ambiguous) certified from them in regenerate
  mode equal the sequential certifier from scratch, growth included; the
  grown cache keeps its mean and its old rows, and the new rows are within
  their bounds. Conservative mode certifies the same class or abstains; at
  the same stop it never certifies a larger radius (it may stop later, with
  a wider bound at each checkpoint, and so reach a larger one: sound too)."""
  fmt = "int8"
  enc, prompts = setup(6)
  known = prompts[:2]
  novel = list(prompts[2:4]) + [_near_tie(prompts[4], 1e-4),
                                _near_tie(prompts[5], 1e-6)]
  conservative = dataclasses.replace(PARAMS, cached_ambiguous="conservative")
  grew = ambiguous = 0
  for i in range(2):
    x = jnp.asarray(np.random.default_rng(20 + i).normal(size=D), jnp.float32)
    key = jax.random.key(i)
    k = ovc.certify_known_prompts_sequential(MLP, enc, x, key, known, PARAMS,
                                             SEQ)
    packed = cached_ovc.compress_draws(k.embedding_draws, fmt)
    have = packed.estimation.shape[0]
    for u in novel:
      got = ovc.certify_novel_prompt_sequential(
          "cached", MLP, enc, x, key, packed, u, PARAMS, SEQ)
      scratch = sq.certify_sequential(MLP, MLP.params(enc, u), x, key,
                                      SMOOTHING, SEQ)
      assert_same(got.result, scratch)
      cert = got.result.certificate
      assert cert.regenerated == cert.ambiguous
      ambiguous += cert.ambiguous
      grown = got.embedding_draws.estimation
      assert isinstance(grown, cache_codec.CompressedRows)
      assert grown.shape[0] == max(have, scratch.draws)
      if scratch.draws > have:
        grew += 1
        np.testing.assert_array_equal(grown.mean, packed.estimation.mean)
        for part in ("scale", "codes", "bound"):
          np.testing.assert_array_equal(getattr(grown, part)[:have],
                                        getattr(packed.estimation, part))
        exact = sq.extend_embeddings(MLP, MLP.params(enc, u), x, key,
                                     k.embedding_draws, scratch.draws,
                                     SMOOTHING).estimation
        caches.check_within_bounds(np.asarray(exact), grown, "grown cache")
      sure = ovc.certify_novel_prompt_sequential(
          "cached", MLP, enc, x, key, packed, u, conservative, SEQ)
      assert sure.result.certificate.regenerated == 0
      assert sure.result.certificate.prediction in (
          scratch.certificate.prediction, -1)
      if sure.result.draws == scratch.draws:
        assert sure.result.certificate.radius <= scratch.certificate.radius
  assert grew and ambiguous, (grew, ambiguous)


def test_rows_encoded_against_a_given_mean():
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(40, E)).astype(np.float32)
  mean = rng.normal(size=E).astype(np.float32)
  packed = cache_codec.encode_rows(rows, "int8", mean=mean)
  np.testing.assert_array_equal(packed.mean, mean)
  caches.check_within_bounds(rows, packed, "rows")
  for bad in (mean[:-1], mean.astype(np.float64),
              np.full(E, np.nan, np.float32)):
    with pytest.raises(OVCError, match="mean to encode against"):
      cache_codec.encode_rows(rows, "int8", mean=bad)
