"""Datasets: restricted CIFAR reader, safe download, folders, subsampling."""

import hashlib
import io
import os
import pathlib
import pickle
import shlex
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from ovc_jax import datasets
from ovc_jax import prompts
from ovc_jax.errors import ConfigError, DataError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_FIRST100 = SHARED_DATA / "cifar10-first100"
needs_cifar = pytest.mark.skipif(
    not (CIFAR_FIRST100 / "test_batch").is_file(),
    reason=(f"needs CIFAR-10's first 100 test images: put a test_batch holding "
            f"them and batches.meta (the cifar-10-batches-py layout of "
            f"cifar-10-python.tar.gz) in {CIFAR_FIRST100}"))


# --------------------------------------------------------------------------
# Helpers that write CIFAR-layout files.


def _random_batch(n=12, side=32, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, size=(n, 3 * side * side), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
  return data, labels


def _write_pickle(path, obj, protocol=4):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)


def _write_cifar_folder(folder, data, labels, names=prompts.CIFAR10_CLASSES,
                        protocol=4, train=False):
  _write_pickle(folder / "test_batch",
                {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                 b"data": data}, protocol)
  _write_pickle(folder / "batches.meta",
                {b"num_cases_per_batch": len(labels),
                 b"label_names": [n.encode() for n in names],
                 b"num_vis": data.shape[1]}, protocol)
  if train:
    for k in range(1, 6):
      _write_pickle(folder / f"data_batch_{k}",
                    {b"labels": labels, b"data": data}, protocol)


def _py2_batch_bytes(data, labels):
  """A batch as Python 2's cPickle wrote the official files.

  Protocol 2, str objects as (SHORT_)BINSTRING, the array through
  numpy.core.multiarray._reconstruct + BUILD with a BINSTRING of raw bytes.
  """

  def binstring(b):
    if len(b) < 256:
      return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b

  n, d = data.shape
  out = b"\x80\x02}(" + binstring(b"data")
  out += (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
          + binstring(b"b") + b"\x87R")
  out += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d)
  out += b"\x86cnumpy\ndtype\n" + binstring(b"u1") + b"K\x00K\x01\x87R"
  out += (b"(K\x03" + binstring(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff"
          b"\xffK\x00tb")
  out += b"\x89" + binstring(data.tobytes()) + b"tb"
  out += binstring(b"labels") + b"](" + b"".join(
      b"K" + bytes([v]) for v in labels) + b"e"
  return out + b"u."


class _SystemPayload:
  """Unpickling this runs a shell command that creates `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {shlex.quote(self.marker)}",))


# --------------------------------------------------------------------------
# CIFAR-10 through the restricted unpickler.


@needs_cifar
def test_real_first100_batch_loads():
  ds = datasets.load_dataset("cifar10", str(CIFAR_FIRST100))
  assert isinstance(ds, datasets.Dataset)
  assert ds.name == "cifar10" and len(ds) == 100
  assert ds.images.shape == (100, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int64
  assert ds.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  assert ds.class_names == prompts.CIFAR10_CLASSES
  image, label = ds[0]
  assert image.shape == (32, 32, 3) and image.dtype == np.float32
  assert label == 3 and 0.0 <= image.min() and image.max() <= 1.0
  # Same pixels as an unrestricted read of this trusted file, made channels
  # last from the planar rows (R plane, G plane, B plane).
  with open(CIFAR_FIRST100 / "test_batch", "rb") as f:
    ref = pickle.load(f, encoding="bytes")
  planar = ref[b"data"].reshape(100, 3, 32, 32)
  np.testing.assert_array_equal(ds.images, planar.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(ds.images[5, 7, 9], planar[5, :, 7, 9])
  np.testing.assert_array_equal(image, ds.images[0] / np.float32(255))


def test_python2_format_batch_loads(tmp_path):
  # The official files were written by Python 2: numpy.core globals, bytes.
  data, labels = _random_batch(n=5)
  raw = _py2_batch_bytes(data, labels)
  assert pickle.loads(raw, encoding="bytes")[b"data"].shape == (5, 3072)
  (tmp_path / "test_batch").write_bytes(raw)
  images, got = datasets.read_cifar_batch(tmp_path / "test_batch")
  np.testing.assert_array_equal(
      images, data.reshape(5, 3, 32, 32).transpose(0, 2, 3, 1))
  assert got.tolist() == labels


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_loads(tmp_path, protocol):
  data, labels = _random_batch()
  _write_cifar_folder(tmp_path / "cifar-10-batches-py", data, labels,
                      protocol=protocol)
  ds = datasets.load_dataset("cifar10", tmp_path)
  np.testing.assert_array_equal(
      ds.images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  assert ds.labels.tolist() == labels


def test_labels_as_int_array_and_fortran_data(tmp_path):
  data, labels = _random_batch()
  batch = {"data": np.asfortranarray(data),
           "labels": np.asarray(labels, dtype=">i8")}
  for protocol in (2, 5):
    path = tmp_path / f"batch{protocol}"
    _write_pickle(path, batch, protocol)
    images, got = datasets.read_cifar_batch(path)
    np.testing.assert_array_equal(
        images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert got.tolist() == labels


def test_train_split_concatenates_five_batches(tmp_path):
  data, labels = _random_batch(n=4)
  _write_cifar_folder(tmp_path, data, labels, train=True)
  ds = datasets.load_dataset("cifar10", tmp_path, split="train")
  assert len(ds) == 20 and ds.labels.tolist() == labels * 5


def test_malicious_pickle_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"
  control = tmp_path / "control"
  payload = {b"data": _SystemPayload(marker), b"labels": [0]}
  # The payload is live: a plain pickle.loads runs it.
  pickle.loads(pickle.dumps({b"x": _SystemPayload(control)}))
  assert control.exists()
  for protocol in (0, 2, 4, 5):
    path = tmp_path / f"test_batch{protocol}"
    _write_pickle(path, payload, protocol)
    with pytest.raises(DataError, match=r"refusing to load .* refers to "
                       r"(posix|os)\.system"):
      datasets.read_cifar_batch(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("numpy", "load"),
    ("numpy", "frombuffer"), ("numpy._core.multiarray", "scalar"),
    ("subprocess", "Popen"), ("copyreg", "_reconstructor"),
])
def test_only_array_globals_resolve(tmp_path, module, name):
  path = tmp_path / "batch"
  path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b").")
  with pytest.raises(DataError, match=f"refers to {module}.{name}"):
    datasets.restricted_unpickle(path)


def test_array_stand_ins_refuse_abuse(tmp_path):
  path = tmp_path / "batch"
  # numpy.dtype('O'): object arrays would unpickle arbitrary objects.
  path.write_bytes(b"\x80\x02cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R.")
  with pytest.raises(DataError, match="plain numeric dtypes only"):
    datasets.restricted_unpickle(path)
  # _reconstruct of something other than ndarray.
  path.write_bytes(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n"
                   b"cnumpy\ndtype\nK\x00\x85U\x01b\x87R.")
  with pytest.raises(DataError, match="only build numpy.ndarray"):
    datasets.restricted_unpickle(path)
  # BUILD on an allowed global, to change its attributes.
  path.write_bytes(b"\x80\x02cnumpy\ndtype\n}U\x03_fnNsb.")
  with pytest.raises(DataError, match="unexpected BUILD"):
    datasets.restricted_unpickle(path)
  # A structured dtype state.
  path.write_bytes(b"\x80\x02cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
                   b"(K\x03U\x01|NU\x01a\x85NJ\xff\xff\xff\xffJ\xff\xff\xff"
                   b"\xffK\x00tb.")
  with pytest.raises(DataError, match="structured"):
    datasets.restricted_unpickle(path)


def test_restricted_unpickle_returns_plain_objects(tmp_path):
  path = tmp_path / "obj"
  shared = np.arange(3, dtype=np.int16)
  _write_pickle(path, {"a": [shared, (shared, None)], "b": 1.5, "c": b"x"})
  obj = datasets.restricted_unpickle(path)
  # Python 3 str stays str; bytes stay bytes.
  assert obj["a"][1][1] is None and obj["b"] == 1.5 and obj["c"] == b"x"
  np.testing.assert_array_equal(obj["a"][0], shared)
  assert obj["a"][0].dtype == np.int16 and obj["a"][0].flags.writeable
  assert obj["a"][0] is obj["a"][1][0]  # shared in the file, shared here


def test_shared_cyclic_and_malformed_structures(tmp_path):
  path = tmp_path / "obj"
  # 2^30 paths through 30 shared levels: converted once per object.
  x = [np.zeros(1, np.uint8)]
  for _ in range(30):
    x = [x, x]
  _write_pickle(path, x)
  assert len(datasets.restricted_unpickle(path)) == 2
  _write_pickle(path, [[x]])
  with pytest.raises(DataError, match="nested more than 32 deep"):
    datasets.restricted_unpickle(path)
  cycle = []
  cycle.append(cycle)
  _write_pickle(path, cycle)
  with pytest.raises(DataError, match="or a cycle"):
    datasets.restricted_unpickle(path)
  # A 2 x 3 uint8 array with 5 bytes of data.
  path.write_bytes(b"\x80\x02cnumpy._core.numeric\n_frombuffer\n(C\x05abcde"
                   b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87RK\x02K\x03\x86"
                   b"U\x01CtR.")
  with pytest.raises(DataError, match="holds 5 bytes, not 6"):
    datasets.restricted_unpickle(path)


@pytest.mark.parametrize("obj, match", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({b"foo": 1}, r"no 'data' or 'labels' entry"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
     "'data' must be uint8"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
     "rows hold 100 values, not 3 x 32 x 32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
     "1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
     "labels must lie in 0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "a"]},
     "other than integers"),
    ({b"data": [1, 2], b"labels": [0, 1]}, "'data' must be uint8"),
    ({b"data": "pixels", b"labels": [0, 1]}, "expected an array"),
])
def test_non_cifar_pickles_are_refused(tmp_path, obj, match):
  path = tmp_path / "test_batch"
  _write_pickle(path, obj)
  with pytest.raises(DataError, match=rf"test_batch is not a CIFAR-10 batch: "
                     rf".*{match}"):
    datasets.read_cifar_batch(path)


def test_truncated_and_garbage_files_are_refused(tmp_path):
  data, labels = _random_batch()
  full = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
  for name, content in [("truncated", full[:len(full) // 2]),
                        ("short", full[:40]), ("empty", b""),
                        ("garbage", b"\x00\xffnot a pickle at all")]:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{name}"):
      datasets.read_cifar_batch(path)


@needs_cifar
def test_truncated_real_batch_is_refused(tmp_path):
  path = tmp_path / "test_batch"
  path.write_bytes((CIFAR_FIRST100 / "test_batch").read_bytes()[:200_000])
  with pytest.raises(DataError, match="not a readable pickle"):
    datasets.read_cifar_batch(path)


def test_missing_cifar_data_says_where_to_put_it(tmp_path):
  with pytest.raises(DataError, match=r"does not exist: expected .*"
                     r"cifar-10-batches-py/ holding test_batch"):
    datasets.load_dataset("cifar10", tmp_path / "nowhere")
  (tmp_path / "cifar-10-batches-py").mkdir()
  with pytest.raises(DataError, match=r"batches.meta is missing"):
    datasets.load_dataset("cifar10", tmp_path)
  data, labels = _random_batch()
  _write_cifar_folder(tmp_path / "cifar-10-batches-py", data, labels)
  with pytest.raises(DataError, match="data_batch_1 is missing"):
    datasets.load_dataset("cifar10", tmp_path, split="train")


def test_cifar10_needs_ten_classes(tmp_path):
  data, labels = _random_batch(num_classes=4)
  _write_cifar_folder(tmp_path, data, labels, names=["a", "b", "c", "d"])
  with pytest.raises(DataError, match="lists 4 classes, not 10"):
    datasets.load_dataset("cifar10", tmp_path)


def test_toy_split_takes_classes_and_size_from_its_files(tmp_path):
  root = tmp_path / "checkpoints" / "toy_world"
  data, labels = _random_batch(n=30, side=16, num_classes=4)
  _write_cifar_folder(root / "cifar-10-batches-py", data, labels,
                      names=["red", "green", "blue", "grey"])
  ds = datasets.load_dataset("toy", root)
  assert ds.name == "toy" and len(ds) == 30
  assert ds.class_names == ("red", "green", "blue", "grey")
  assert ds.images.shape == (30, 16, 16, 3)
  assert ds[29][1] == labels[29]
  # Labels beyond the listed classes are refused.
  _write_cifar_folder(root / "cifar-10-batches-py", data, labels,
                      names=["red", "green"])
  with pytest.raises(DataError, match="labels must lie in 0..1"):
    datasets.load_dataset("toy", root)


def test_toy_default_root_is_the_committed_split_from_any_cwd(tmp_path,
                                                             monkeypatch):
  monkeypatch.chdir(tmp_path)
  toy = datasets.load_dataset("toy")
  assert len(toy) == 1000 and len(toy.class_names) == 10
  with pytest.raises(DataError, match="no toy-world data"):
    datasets.load_dataset("toy", str(tmp_path / "elsewhere"))


def test_array_dataset_indexing():
  images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
  ds = datasets.ArrayDataset("toy", images, np.arange(4), ("a",) * 4)
  np.testing.assert_array_equal(ds[-1][0], images[3] / np.float32(255))
  assert ds[np.int64(2)][1] == 2
  with pytest.raises(IndexError):
    ds[4]
  assert [label for _, label in ds] == [0, 1, 2, 3]


# --------------------------------------------------------------------------
# Download and safe extraction (file:// URLs only; no network).


def _cifar_tar(tmp_path, name="good.tar.gz", extra=()):
  src = tmp_path / "src" / "cifar-10-batches-py"
  if not src.exists():
    data, labels = _random_batch(n=6)
    _write_cifar_folder(src, data, labels)
  archive = tmp_path / name
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(src, arcname="cifar-10-batches-py")
    for info, content in extra:
      tar.addfile(info, io.BytesIO(content) if content is not None else None)
  return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path):
  archive, md5 = _cifar_tar(tmp_path)
  root = tmp_path / "data"
  sha = hashlib.sha256(archive.read_bytes()).hexdigest()
  folder = datasets.download_cifar10(root, url=archive.as_uri(), md5=md5,
                                     sha256=sha)
  assert folder == root / "cifar-10-batches-py"
  assert sorted(p.name for p in root.iterdir()) == [
      "cifar-10-batches-py", "cifar-10-python.tar.gz"]
  assert len(datasets.load_dataset("cifar10", root)) == 6
  # Present now: no second download, even with the source gone.
  archive.unlink()
  again = datasets.download_cifar10(root, url=archive.as_uri(), md5=md5)
  assert again == folder


def test_load_dataset_download_flag(tmp_path):
  archive, md5 = _cifar_tar(tmp_path)
  ds = datasets.load_dataset("cifar10", tmp_path / "data", download=True,
                             url=archive.as_uri(), md5=md5, sha256=None)
  assert len(ds) == 6


def test_existing_archive_is_verified_not_downloaded(tmp_path):
  archive, md5 = _cifar_tar(tmp_path)
  root = tmp_path / "data"
  root.mkdir()
  (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
  datasets.download_cifar10(root, url="file:///nonexistent", md5=md5,
                            sha256=None)
  assert (root / "cifar-10-batches-py" / "test_batch").is_file()
  bad_root = tmp_path / "bad"
  bad_root.mkdir()
  (bad_root / "cifar-10-python.tar.gz").write_bytes(b"junk")
  with pytest.raises(DataError, match="has MD5 .* delete it"):
    datasets.download_cifar10(bad_root, url=archive.as_uri(), md5=md5)


def test_corrupted_download_leaves_nothing(tmp_path):
  archive, md5 = _cifar_tar(tmp_path)
  content = bytearray(archive.read_bytes())
  content[len(content) // 2] ^= 0xFF
  corrupted = tmp_path / "corrupted.tar.gz"
  corrupted.write_bytes(bytes(content))
  root = tmp_path / "data"
  with pytest.raises(DataError, match=f"has MD5 [0-9a-f]+, expected {md5}"):
    datasets.download_cifar10(root, url=corrupted.as_uri(), md5=md5,
                              sha256=None)
  assert list(root.iterdir()) == []
  sha = hashlib.sha256(archive.read_bytes()).hexdigest()
  with pytest.raises(DataError, match=f"SHA-256 [0-9a-f]+, expected {sha}"):
    datasets.download_cifar10(root, url=corrupted.as_uri(), md5=None,
                              sha256=sha)
  assert list(root.iterdir()) == []


def test_download_failures_are_data_errors(tmp_path):
  with pytest.raises(DataError, match="cannot download file:.*put it at"):
    datasets.download_cifar10(tmp_path / "d", url=(tmp_path / "no").as_uri())
  assert list((tmp_path / "d").iterdir()) == []
  with pytest.raises(ConfigError, match="https:// or file://"):
    datasets.download_cifar10(tmp_path, url="http://example.com/c.tar.gz")
  with pytest.raises(ConfigError, match="without an MD5 or SHA-256"):
    datasets.download_cifar10(tmp_path, md5=None, sha256=None)


def _info(name, type_=tarfile.REGTYPE, size=0, linkname=""):
  info = tarfile.TarInfo(name)
  info.type, info.size, info.linkname = type_, size, linkname
  return info


@pytest.mark.parametrize("member, match", [
    ((_info("../evil.txt", size=4), b"evil"), "absolute path or '..'"),
    ((_info("cifar-10-batches-py/../../evil.txt", size=4), b"evil"),
     "absolute path or '..'"),
    ((_info("/tmp/ovc_jax_test_evil.txt", size=4), b"evil"),
     "absolute path or '..'"),
    ((_info("cifar-10-batches-py/link", tarfile.SYMTYPE,
            linkname="../../evil.txt"), None), "is a symbolic link"),
    ((_info("cifar-10-batches-py/hard", tarfile.LNKTYPE,
            linkname="cifar-10-batches-py/test_batch"), None),
     "is a hard link"),
    ((_info("cifar-10-batches-py/dev", tarfile.CHRTYPE), None),
     "is a device"),
    ((_info("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), None),
     "is a device or FIFO"),
])
def test_unsafe_archives_are_refused(tmp_path, member, match):
  archive, md5 = _cifar_tar(tmp_path, "evil.tar.gz", extra=[member])
  root = tmp_path / "a" / "b" / "data"
  with pytest.raises(DataError, match=f"refusing to extract .*{match}"):
    datasets.download_cifar10(root, url=archive.as_uri(), md5=md5,
                              sha256=None)
  # Nothing extracted, inside or out; the (checksum-verified) archive stays.
  assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]
  for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
    assert not (d / "evil.txt").exists()
  assert not pathlib.Path("/tmp/ovc_jax_test_evil.txt").exists()


def test_tar_bomb_and_duplicates_are_refused(tmp_path):
  archive, _ = _cifar_tar(tmp_path)
  with pytest.raises(DataError, match="unpacks to more than 1000 bytes"):
    datasets.safe_extract_tar(archive, tmp_path / "out", max_bytes=1000)
  dup, _ = _cifar_tar(tmp_path, "dup.tar.gz", extra=[
      (_info("cifar-10-batches-py/test_batch", size=1), b"x")])
  with pytest.raises(DataError, match="appears twice"):
    datasets.safe_extract_tar(dup, tmp_path / "out2")
  not_tar = tmp_path / "not.tar.gz"
  not_tar.write_bytes(b"plain text")
  with pytest.raises(DataError, match="cannot extract"):
    datasets.safe_extract_tar(not_tar, tmp_path / "out3")


# --------------------------------------------------------------------------
# Image files: ImageNet layout and image folders.


def _png_bytes(w, h, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(
      buf, "PNG")
  return buf.getvalue(), arr


def _imagenet_tree(root, extra=None):
  """1000 wnid folders, one tiny image each, plus `extra` files per class."""
  tiny, _ = _png_bytes(4, 3)
  for c in range(1000):
    d = root / f"n{c:08d}"
    d.mkdir(parents=True)
    (d / "img_0.png").write_bytes(tiny)
    for name, content in (extra or {}).get(c, []):
      (d / name).parent.mkdir(parents=True, exist_ok=True)
      (d / name).write_bytes(content)


def test_imagenet_layout(tmp_path):
  big, _ = _png_bytes(300, 400, seed=1)
  jpeg = io.BytesIO()
  Image.new("RGB", (500, 375), (200, 30, 90)).save(jpeg, "JPEG", quality=95)
  _imagenet_tree(tmp_path / "val", extra={
      0: [("b.png", big)], 7: [("sub/c.JPEG", jpeg.getvalue())],
      999: [("notes.txt", b"not an image")]})
  ds = datasets.load_dataset("imagenet", tmp_path)  # finds val/
  assert isinstance(ds, datasets.Dataset)
  assert ds.name == "imagenet" and len(ds) == 1002
  assert ds.class_names == prompts.IMAGENET_CLASSES
  # ImageFolder order: classes sorted, files sorted inside each class.
  assert ds.labels[:3].tolist() == [0, 0, 1]
  assert pathlib.Path(ds.paths[0]).name == "b.png"
  assert ds.labels.tolist() == sorted(ds.labels.tolist())
  assert pathlib.Path(ds.paths[9]).relative_to(tmp_path / "val").as_posix() \
      == "n00000007/sub/c.JPEG"
  for i in (0, 1, 9, 1001):
    image, label = ds[i]
    assert image.shape == (224, 224, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
  assert ds[9][1] == 7 and ds[1001][1] == 999
  np.testing.assert_allclose(ds[9][0], np.broadcast_to(
      np.array([200, 30, 90]) / 255, (224, 224, 3)), atol=6 / 255)
  # The val folder itself works too.
  assert len(datasets.load_dataset("imagenet", tmp_path / "val")) == 1002


def test_imagenet_layout_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist: expected the ImageNet "
                     "val images sorted into 1000 folders"):
    datasets.load_dataset("imagenet", tmp_path / "missing")
  flat = tmp_path / "flat"
  flat.mkdir()
  (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
  with pytest.raises(DataError, match="found 0 wnid folders.*valprep"):
    datasets.load_dataset("imagenet", flat)
  for c in range(999):
    (tmp_path / "few" / f"n{c:08d}").mkdir(parents=True)
  with pytest.raises(DataError, match="found 999 wnid folders"):
    datasets.load_dataset("imagenet", tmp_path / "few")
  (tmp_path / "few" / "n00000999").mkdir()
  with pytest.raises(DataError, match="1000 class folder.* hold no images"):
    datasets.load_dataset("imagenet", tmp_path / "few")
  with pytest.raises(ConfigError, match="needs a root"):
    datasets.load_dataset("imagenet")


def test_resize_and_centre_crop_follow_torchvision(tmp_path):
  # 300 x 256 (w x h): shorter side already 256, so a pure crop at
  # top = 16, left = round(76 / 2) = 38.
  content, arr = _png_bytes(300, 256, seed=2)
  path = tmp_path / "a.png"
  path.write_bytes(content)
  image = datasets.load_image(path, image_size=224, resize_size=256)
  np.testing.assert_array_equal(image, arr[16:240, 38:262] / np.float32(255))
  # 300 x 400: resized to 256 x int(256 * 400 / 300) = 256 x 341 (bilinear),
  # then crop top = round(117 / 2) = 58 (round half to even), left = 16.
  content, arr = _png_bytes(300, 400, seed=3)
  path.write_bytes(content)
  resized = np.asarray(Image.fromarray(arr).resize(
      (256, 341), Image.Resampling.BILINEAR))
  image = datasets.load_image(path, image_size=224, resize_size=256)
  np.testing.assert_array_equal(image,
                                resized[58:282, 16:240] / np.float32(255))
  bicubic = datasets.load_image(path, image_size=224, resize_size=256,
                                interpolation="bicubic")
  assert bicubic.shape == (224, 224, 3) and not np.array_equal(bicubic, image)
  # No sizes: the image as stored.
  np.testing.assert_array_equal(datasets.load_image(path),
                                arr / np.float32(255))


def test_image_modes_become_rgb(tmp_path):
  for mode in ("L", "RGBA"):
    content, _ = _png_bytes(5, 6, mode=mode)
    path = tmp_path / f"{mode}.png"
    path.write_bytes(content)
    assert datasets.load_image(path).shape == (6, 5, 3)


def test_image_folder_with_class_subfolders(tmp_path):
  for cls, n in (("dog", 2), ("cat", 3)):
    for i in range(n):
      content, _ = _png_bytes(40, 30, seed=i)
      (tmp_path / cls).mkdir(exist_ok=True)
      (tmp_path / cls / f"{i}.png").write_bytes(content)
  ds = datasets.load_dataset("folder", tmp_path, image_size=16)
  assert ds.class_names == ("cat", "dog")
  assert ds.labels.tolist() == [0, 0, 0, 1, 1]
  image, label = ds[4]
  assert image.shape == (16, 16, 3) and label == 1
  named = datasets.load_dataset("folder", tmp_path,
                                class_names=["a cat", "a dog"])
  assert named.class_names == ("a cat", "a dog")
  assert named[0][0].shape == (30, 40, 3)  # no size: kept as stored
  with pytest.raises(ConfigError, match="3 class names given for the 2"):
    datasets.load_dataset("folder", tmp_path, class_names=["a", "b", "c"])


def test_flat_image_folder(tmp_path):
  for i in range(3):
    content, _ = _png_bytes(20, 10, seed=i)
    (tmp_path / f"{i}.PNG").write_bytes(content)
  (tmp_path / "readme.md").write_text("ignored")
  ds = datasets.load_dataset("folder", tmp_path, image_size=8,
                             resize_size=12)
  assert len(ds) == 3 and ds.class_names == ()
  assert ds.labels.tolist() == [-1, -1, -1]
  image, label = ds[0]
  assert image.shape == (8, 8, 3) and label == -1


def test_image_folder_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist: expected images"):
    datasets.load_dataset("folder", tmp_path / "missing")
  with pytest.raises(DataError, match="is empty"):
    datasets.load_dataset("folder", tmp_path)
  content, _ = _png_bytes(4, 4)
  (tmp_path / "a.png").write_bytes(content)
  (tmp_path / "sub").mkdir()
  with pytest.raises(DataError, match="both image files and subfolders"):
    datasets.load_dataset("folder", tmp_path)
  (tmp_path / "sub").rmdir()
  (tmp_path / "b.png").write_bytes(b"this is not a PNG")
  ds = datasets.load_dataset("folder", tmp_path)
  assert ds[0][0].shape == (4, 4, 3)
  with pytest.raises(DataError, match=r"cannot decode image file .*b\.png"):
    ds[1]
  content, _ = _png_bytes(64, 64)
  (tmp_path / "b.png").write_bytes(content[:100])  # truncated
  with pytest.raises(DataError, match=r"cannot decode image file .*b\.png"):
    ds[1]
  (tmp_path / "b.png").unlink()
  with pytest.raises(DataError, match=r"b\.png does not exist"):
    ds[1]
  with pytest.raises(ConfigError, match="resize_size 8 is smaller"):
    datasets.load_dataset("folder", tmp_path, image_size=16, resize_size=8)
  with pytest.raises(ConfigError, match="interpolation"):
    datasets.load_image(tmp_path / "a.png", interpolation="nearest")
  with pytest.raises(ConfigError, match="needs a root"):
    datasets.load_dataset("folder")


def test_load_dataset_rejects_unknown_names_and_options(tmp_path):
  with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
    datasets.load_dataset("mnist", tmp_path)
  with pytest.raises(ConfigError, match=r"takes no option\(s\) \['image_size'"):
    datasets.load_dataset("cifar10", tmp_path, image_size=3)
  with pytest.raises(ConfigError, match="split must be"):
    datasets.load_dataset("cifar10", tmp_path, split="validation")
  with pytest.raises(ConfigError, match="only apply with download=True"):
    datasets.load_dataset("cifar10", tmp_path, md5="0")


# --------------------------------------------------------------------------
# Cohen et al.'s subsampling.


def _cohen_loop(num_items, skip, max_index):
  """certify.py's loop, verbatim but for the body."""
  picked = []
  for i in range(num_items):
    if i % skip != 0:
      continue
    if i == max_index:
      break
    picked.append(i)
  return picked


@pytest.mark.parametrize("num_items", [0, 1, 7, 100, 10_000])
@pytest.mark.parametrize("skip", [1, 3, 20, 100])
@pytest.mark.parametrize("max_index", [-1, -5, 0, 1, 20, 30, 60, 99, 100, 300])
def test_subsample_matches_cohens_loop(num_items, skip, max_index):
  assert datasets.subsample_indices(num_items, skip, max_index) == _cohen_loop(
      num_items, skip, max_index)


def test_subsample_paper_defaults():
  cifar = datasets.subsample_indices(10_000, datasets.DEFAULT_SKIP["cifar10"])
  imagenet = datasets.subsample_indices(50_000,
                                        datasets.DEFAULT_SKIP["imagenet"])
  assert len(cifar) == 500 and cifar[:3] == [0, 20, 40] and cifar[-1] == 9980
  assert len(imagenet) == 500 and imagenet[-1] == 49_900
  # The quirk: a bound that is not a multiple of skip is never met.
  assert len(datasets.subsample_indices(10_000, 20, 30)) == 500
  assert datasets.subsample_indices(10_000, 20, 60) == [0, 20, 40]


@pytest.mark.parametrize("skip", [0, -1, 1.5, True])
def test_subsample_rejects_bad_skip(skip):
  with pytest.raises(ConfigError, match="skip"):
    datasets.subsample_indices(100, skip)
