"""The toy world: determinism, seeds, captions, the CIFAR-layout test split."""

import hashlib
import json
import pathlib
import pickle
import pickletools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ovc_jax.datasets import cifar
from ovc_jax.errors import ConfigError
from ovc_jax.toy_world import captions
from ovc_jax.toy_world import catalog as cat
from ovc_jax.toy_world import rendering
from ovc_jax.toy_world import scenes as scenes_lib
from ovc_jax.toy_world import seeds
from ovc_jax.toy_world import shapes
from ovc_jax.toy_world import split
from ovc_jax.toy_world import stream

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "checkpoints" / "toy_world"
SHARED_CIFAR = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                / "cifar10-first100")


# --------------------------------------------------------------------------
# The training stream.


def test_sample_batch_shapes_dtypes_and_range():
  images, texts, labels, attrs = stream.sample_batch((0, 0), 64)
  assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
  assert images.flags.c_contiguous
  assert 0.0 <= images.min() and images.max() <= 1.0
  assert len(texts) == 64 and all(isinstance(t, str) for t in texts)
  assert labels.shape == (64,) and labels.dtype == np.int64
  assert labels.min() >= 0 and labels.max() < cat.NUM_CLASSES
  for key in ("style", "colour", "size", "background", "radius", "angle"):
    assert attrs[key].shape == (64,), key
  assert attrs["center"].shape == (64, 2)
  assert set(np.unique(attrs["colour"])) <= set(range(-1, len(cat.COLOURS)))


def test_same_seed_same_bits_and_steps_differ():
  a = stream.sample_batch((3, 7), 48)
  b = stream.sample_batch((3, 7), 48)
  assert a[0].tobytes() == b[0].tobytes()
  assert a[1] == b[1]
  np.testing.assert_array_equal(a[2], b[2])
  for key in a[3]:
    np.testing.assert_array_equal(a[3][key], b[3][key])
  # An explicit generator of the same stream gives the same batch.
  c = stream.sample_batch(seeds.train_rng(3, 7), 48)
  assert a[0].tobytes() == c[0].tobytes()
  # An int seed is step 0 of that seed.
  assert (stream.sample_batch(3, 8)[0].tobytes()
          == stream.sample_batch((3, 0), 8)[0].tobytes())
  # Other steps and seeds differ.
  assert not np.array_equal(a[0], stream.sample_batch((3, 8), 48)[0])
  assert not np.array_equal(a[0], stream.sample_batch((4, 7), 48)[0])


def test_train_batches_iterates_steps():
  it = stream.train_batches(5, 4, start_step=2)
  first, second = next(it), next(it)
  assert first[1] == stream.sample_batch((5, 2), 4)[1]
  assert second[0].tobytes() == stream.sample_batch((5, 3), 4)[0].tobytes()


@pytest.mark.parametrize("bad", [-1, 2**32, "x", 1.5])
def test_bad_seeds_are_config_errors(bad):
  with pytest.raises(ConfigError):
    stream.sample_batch((bad, 0), 2)
  with pytest.raises(ConfigError):
    seeds.heldout_rng(bad)


def test_bad_sizes_and_labels_are_config_errors():
  with pytest.raises(ConfigError):
    stream.sample_batch((0, 0), 0)
  with pytest.raises(ConfigError):
    stream.sample_batch((0, 0), 2, labels=np.array([0, cat.NUM_CLASSES]))
  with pytest.raises(ConfigError):
    stream.sample_batch(object(), 2)


# --------------------------------------------------------------------------
# Seeds: the training and held-out streams never meet.


def test_train_and_test_seed_streams_are_disjoint():
  train = {seeds.entropy(seeds.TRAIN_TAG, s, step)
           for s in range(4) for step in range(200)}
  test = {seeds.entropy(seeds.TEST_TAG, s, 0) for s in range(4)}
  assert not train & test
  # The generators' states differ too (a SeedSequence hash collision would
  # be needed otherwise), and so do the images.
  state = lambda g: g.bit_generator.state["state"]["state"]
  train_states = {state(seeds.train_rng(s, step))
                  for s in range(4) for step in range(200)}
  assert all(state(seeds.heldout_rng(s)) not in train_states for s in range(4))
  held_out, _, _, _ = split.sample_test_split(16, 0)
  train_images = rendering.to_uint8(stream.sample_batch((0, 0), 16)[0])
  assert not np.array_equal(held_out, train_images)


# --------------------------------------------------------------------------
# Rendering.


@pytest.mark.parametrize("sdf", shapes.SHAPE_SDFS, ids=cat.TOY_CLASSES)
def test_shape_distances_are_exact(sdf):
  # Anti-aliasing and outlines read the distance in pixels, so it must be the
  # true distance to the outline (a union's or a cut's min/max is not).
  g = np.linspace(-1.6, 1.6, 241, dtype=np.float32)
  x, y = np.meshgrid(g, g)
  for t in (0.0, 1.0):
    d = sdf(x, y, np.full((1, 1), t, np.float32))
    assert d.dtype == np.float32 and d.shape == x.shape
    inside = d < 0
    assert 0.05 < inside.mean() < 0.5
    assert not inside[np.hypot(x, y) > 1.3].any()
    edge = ((inside[:-1, :-1] != inside[1:, :-1])
            | (inside[:-1, :-1] != inside[:-1, 1:]))
    edge_points = np.stack([x[:-1, :-1][edge], y[:-1, :-1][edge]], 1)
    near = np.flatnonzero(np.abs(d) < 0.4)[::13]
    points = np.stack([x.ravel()[near], y.ravel()[near]], 1)
    brute = np.sqrt(((points[:, None] - edge_points[None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.abs(d.ravel()[near]), brute.min(axis=1),
                               atol=0.04)  # 3 grid steps


def test_render_is_antialiased_and_classes_differ():
  rng = seeds.other_rng(1)
  scenes = scenes_lib.sample_scenes(rng, 200)
  images = rendering.render(scenes, seeds.other_rng(2))
  swapped = rendering.render(
      scenes.replace(label=(scenes.label + 1) % cat.NUM_CLASSES),
      seeds.other_rng(2))
  # Only the shape changed, and it changes every image visibly.
  diff = np.abs(images - swapped).max(axis=-1)
  assert (diff.max(axis=(1, 2)) > 0.02).all()
  assert np.mean(diff > 0.05) > 0.03
  # A clean flat photo: soft edges give levels between ground and shape.
  clean = scenes.replace(
      style=np.full(200, cat.PHOTO), background=np.full(200, cat.PLAIN),
      noise_std=np.zeros(200, np.float32), shade=np.zeros(200, np.float32))
  one = rendering.render(clean, seeds.other_rng(3))[0, ..., 0]
  assert len(np.unique(np.round(one, 4))) > 3


def test_nearest_class_mean_in_pixel_space_is_far_from_perfect():
  # A featureless baseline must not solve the task; pixels are not enough.
  x, y = [], []
  for step in range(4):
    images, _, labels, _ = stream.sample_batch((11, step), 500)
    x.append(images.reshape(500, -1))
    y.append(labels)
  x, y = np.concatenate(x), np.concatenate(y)
  means = np.stack([x[y == k].mean(axis=0) for k in range(cat.NUM_CLASSES)])
  test_images, test_labels, _, _ = split.sample_test_split(500, 0)
  t = test_images.reshape(500, -1).astype(np.float32) / 255
  d2 = ((t[:, None, :] - means[None]) ** 2).sum(-1)
  accuracy = np.mean(d2.argmin(axis=1) == test_labels)
  assert accuracy < 0.5, accuracy


# --------------------------------------------------------------------------
# Captions, templates, vocabulary.

_STYLE_WORDS = {  # a phrase in a caption -> the styles it is true of
    "blurry": (cat.BLURRY,), "dark": (cat.DARK,),
    "black and white": (cat.BLACK_AND_WHITE,),
    "low contrast": (cat.LOW_CONTRAST,), "high contrast": (cat.HIGH_CONTRAST,),
    "pixelated": (cat.PIXELATED,), "noisy": (cat.NOISY,),
    "good": (cat.PHOTO,), "bad": cat.BAD_PHOTO_STYLES,
    "photo": cat.PHOTO_STYLES, "drawing": (cat.DRAWING, cat.SKETCH),
    "sketch": (cat.SKETCH,), "pencil": (cat.SKETCH,),
    "cartoon": (cat.CARTOON,),
}


def _captioned_attributes(n, seed):
  rng = seeds.other_rng(seed)
  scenes = scenes_lib.sample_scenes(rng, n)
  attrs = scenes.attributes()
  return scenes.label, attrs, captions.sample_captions(rng, scenes.label, attrs)


def test_every_caption_is_true_of_its_image():
  labels, attrs, texts = _captioned_attributes(4000, 5)
  for i, text in enumerate(texts):
    assert text.endswith(".") and text == text.lower()
    words = captions.words(text)
    named = [w for w in words if w in cat.TOY_CLASSES]
    assert named == [cat.TOY_CLASSES[labels[i]]], text
    style, colour = attrs["style"][i], attrs["colour"][i]
    for phrase, styles in _STYLE_WORDS.items():
      if f" {phrase} " in f" {text[:-1]} ":
        assert style in styles, (text, cat.STYLES[style])
    # Colours (ignoring the style phrase "black and white").
    rest = captions.words(text.replace("black and white", ""))
    colours = [w for w in rest if w in cat.COLOURS]
    expected = [] if colour == cat.NO_COLOUR else [cat.COLOURS[colour]]
    assert set(colours) <= set(expected), text
    sizes = [w for w in words if w in ("small", "big", "large")]
    if sizes:
      assert attrs["size"][i] == (cat.SMALL if sizes == ["small"]
                                  else cat.BIG), text
    backgrounds = [w for w in words if w in cat.BACKGROUNDS]
    assert backgrounds in ([], [cat.BACKGROUNDS[attrs["background"][i]]]), text


def test_templates():
  assert len(captions.TOY_TEMPLATES) == 18
  assert len(set(captions.TOY_TEMPLATES)) == 18
  for t in captions.TOY_TEMPLATES:
    assert t.count("{}") == 1 and t == t.lower() and t.endswith(".")
  prompts = pytest.importorskip("ovc_jax.prompts")
  shared = set(captions.TOY_TEMPLATES) & set(prompts.CIFAR10_TEMPLATES)
  assert len(shared) >= 10
  assert "a photo of a {}." in shared and "a drawing of a {}." in \
      captions.TOY_TEMPLATES


def test_templates_are_captions_of_the_images_they_match():
  labels, attrs, texts = _captioned_attributes(30000, 6)
  matches = captions.template_matches(attrs)
  assert matches.shape == (30000, len(captions.TOY_TEMPLATES))
  seen = np.zeros(len(captions.TOY_TEMPLATES), bool)
  lookup = {t: j for j, t in enumerate(captions.TOY_TEMPLATES)}
  for i, text in enumerate(texts):
    template = text.replace(cat.TOY_CLASSES[labels[i]], "{}", 1)
    if template in lookup:
      j = lookup[template]
      seen[j] = True
      assert matches[i, j], (text, cat.STYLES[attrs["style"][i]])
  missing = [t for t, s in zip(captions.TOY_TEMPLATES, seen) if not s]
  assert not missing, missing
  # Templates are true of different images: their supports differ.
  assert len({tuple(col) for col in matches.T[:, :200]}) >= 12


def test_vocabulary_covers_captions_and_templates():
  vocab = captions.vocabulary()
  assert vocab == sorted(set(vocab)) and "." in vocab
  assert all(w == w.lower() and " " not in w for w in vocab)
  _, _, texts = _captioned_attributes(5000, 7)
  used = {w for t in texts for w in captions.words(t)}
  used |= {w for t in captions.TOY_TEMPLATES for w in captions.words(t)}
  used |= set(cat.TOY_CLASSES)
  assert used <= set(vocab), used - set(vocab)


# --------------------------------------------------------------------------
# The held-out split in CIFAR-10's layout.


def _load(path):
  with open(path, "rb") as f:
    return pickle.load(f, encoding="bytes")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy")
  record = split.write_test_split(out, num_images=120, seed=4)
  return out, record


def test_test_split_is_balanced_and_deterministic():
  images, labels, scenes, texts = split.sample_test_split(205, 9)
  counts = np.bincount(labels, minlength=cat.NUM_CLASSES)
  assert counts.min() == 20 and counts.max() == 21
  again = split.sample_test_split(205, 9)
  assert images.tobytes() == again[0].tobytes() and texts == again[3]
  assert images.dtype == np.uint8 and images.shape == (205, 32, 32, 3)


def test_written_split_has_cifar10_structure(written):
  out, record = written
  folder = out / cifar.CIFAR10_DIRNAME
  batch = _load(folder / cifar.CIFAR10_TEST_BATCH)
  meta = _load(folder / cifar.CIFAR10_META)
  assert list(batch) == [b"batch_label", b"labels", b"data", b"filenames"]
  assert batch[b"data"].dtype == np.uint8
  assert batch[b"data"].shape == (120, 3072)
  assert all(type(k) is int for k in batch[b"labels"])
  assert all(isinstance(f, bytes) for f in batch[b"filenames"])
  assert isinstance(batch[b"batch_label"], bytes)
  assert meta[b"label_names"] == [c.encode() for c in cat.TOY_CLASSES]
  assert meta[b"num_cases_per_batch"] == 120 and meta[b"num_vis"] == 3072
  # Python 2 style, as CIFAR-10 was written: latin1 readers get str keys.
  with open(folder / cifar.CIFAR10_TEST_BATCH, "rb") as f:
    assert "data" in pickle.load(f, encoding="latin1")
  # Rows are channel-planar: R plane, then G, then B.
  images, labels, _, _ = split.sample_test_split(120, 4)
  np.testing.assert_array_equal(batch[b"labels"], labels)
  row = batch[b"data"][5]
  np.testing.assert_array_equal(row[:1024].reshape(32, 32), images[5, ..., 0])
  np.testing.assert_array_equal(row[2048:].reshape(32, 32), images[5, ..., 2])


@pytest.mark.skipif(
    not SHARED_CIFAR.is_dir(),
    reason=(f"needs real CIFAR-10 files to compare with: put test_batch and "
            f"batches.meta (the cifar-10-batches-py layout of "
            f"cifar-10-python.tar.gz) in {SHARED_CIFAR}"))
def test_written_split_matches_real_cifar_file(written):
  out, _ = written
  for name in (cifar.CIFAR10_TEST_BATCH, cifar.CIFAR10_META):
    ours = _load(out / cifar.CIFAR10_DIRNAME / name)
    real = _load(SHARED_CIFAR / name)
    assert set(real) <= set(ours), name
    for key, value in real.items():
      assert type(ours[key]) is type(value), key
      if isinstance(value, np.ndarray):
        assert ours[key].dtype == value.dtype and ours[key].ndim == value.ndim
        assert ours[key].shape[1:] == value.shape[1:]
      if isinstance(value, list) and value:
        assert type(ours[key][0]) is type(value[0]), key
    ours_proto = next(pickletools.genops(
        (out / cifar.CIFAR10_DIRNAME / name).read_bytes()))
    real_proto = next(pickletools.genops((SHARED_CIFAR / name).read_bytes()))
    assert ours_proto[1] == real_proto[1] == 2


def test_project_reader_loads_the_split(written):
  datasets = pytest.importorskip("ovc_jax.datasets")
  if not hasattr(datasets, "load_toy"):
    pytest.skip("ovc_jax.datasets has no load_toy")
  out, _ = written
  ds = datasets.load_toy(out)
  images, labels, _, _ = split.sample_test_split(120, 4)
  assert tuple(ds.class_names) == cat.TOY_CLASSES
  np.testing.assert_array_equal(ds.labels, labels)
  image, label = ds[7]
  np.testing.assert_allclose(image, images[7] / 255.0, atol=1e-6)
  assert label == labels[7]


def test_written_record_metadata_and_montage(written):
  out, record = written
  on_disk = json.loads((out / split.RECORD).read_text())
  assert on_disk == record
  assert record["generator_version"] == cat.GENERATOR_VERSION
  assert record["num_images"] == 120 and record["seed"] == 4
  assert sum(record["class_counts"].values()) == 120
  assert sum(record["style_counts"].values()) == 120
  for rel, digest in record["files"].items():
    assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
  with np.load(out / split.METADATA, allow_pickle=False) as meta:
    assert meta["label"].shape == (120,)
    assert meta["template_matches"].shape == (120, len(captions.TOY_TEMPLATES))
    assert list(meta["class_names"]) == list(cat.TOY_CLASSES)
    assert meta["caption"].shape == (120,)
  with Image.open(out / split.MONTAGE) as picture:
    assert picture.size[0] > 8 * 96 and picture.mode == "RGB"


def test_writer_is_byte_reproducible(written, tmp_path):
  out, record = written
  again = split.write_test_split(tmp_path, num_images=120, seed=4,
                                 write_montage=False)
  assert again["files"] == record["files"]


def test_entry_point(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.write_toy_split", "--out",
       str(tmp_path), "--num_images", "20", "--nomontage", "--seed", "2"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / cifar.CIFAR10_DIRNAME / cifar.CIFAR10_TEST_BATCH).is_file()
  assert not (tmp_path / split.MONTAGE).exists()


@pytest.mark.skipif(not (COMMITTED / split.RECORD).is_file(),
                    reason=("checkpoints/toy_world is missing: write it with "
                            "python -m experiments.write_toy_split "
                            "--export_to_checkpoints"))
def test_committed_split_matches_its_record_and_the_generator():
  record = json.loads((COMMITTED / split.RECORD).read_text())
  for rel, digest in record["files"].items():
    data = (COMMITTED / rel).read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest, rel
  if record["generator_version"] != cat.GENERATOR_VERSION:
    pytest.fail("checkpoints/toy_world is from an older generator: rerun "
                "python -m experiments.write_toy_split --export_to_checkpoints")
  batch = _load(COMMITTED / cifar.CIFAR10_DIRNAME / cifar.CIFAR10_TEST_BATCH)
  images, labels, _, _ = split.sample_test_split(record["num_images"],
                                                 record["seed"])
  np.testing.assert_array_equal(batch[b"labels"], labels)
  # Float32 sin/exp may differ in the last bit between CPUs (NumPy's SIMD
  # paths), which can move a rounded pixel by one level; nothing more.
  diff = np.abs(batch[b"data"].astype(int)
                - cifar.cifar_rows(images).astype(int))
  assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
