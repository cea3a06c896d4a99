"""Downloading the CIFAR-10 archive, verified; extracting tar files safely."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from ovc_jax.datasets.cifar import (CIFAR10_ARCHIVE_NAME, CIFAR10_DIRNAME,
                                    CIFAR10_MD5, CIFAR10_SHA256,
                                    CIFAR10_TEST_BATCH, CIFAR10_URL)
from ovc_jax.errors import ConfigError, DataError


def _hashes(path: str | os.PathLike) -> tuple[str, str]:
  # MD5 only checks integrity here (FIPS builds need the flag to allow it).
  md5 = hashlib.md5(usedforsecurity=False)
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      md5.update(chunk)
      sha.update(chunk)
  return md5.hexdigest(), sha.hexdigest()


def _checksum_problem(got: tuple[str, str], md5: str | None,
                      sha256: str | None) -> str | None:
  if md5 is not None and got[0] != md5.lower():
    return f"MD5 {got[0]}, expected {md5}"
  if sha256 is not None and got[1] != sha256.lower():
    return f"SHA-256 {got[1]}, expected {sha256}"
  return None


def _fetch(url: str, dest: pathlib.Path,
           timeout: float) -> tuple[str, tuple[str, str]]:
  """Streams `url` into a temporary file next to `dest`.

  Returns the temporary file's path and its (MD5, SHA-256) hex digests.

  The temporary file is renamed to `dest` by the caller once verified; on any
  error it is removed, so `dest` is never half-written.
  """
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                             dir=dest.parent)
  # MD5 only checks integrity here (FIPS builds need the flag to allow it).
  md5 = hashlib.md5(usedforsecurity=False)
  sha = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
        url, timeout=timeout) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        md5.update(chunk)
        sha.update(chunk)
        out.write(chunk)
  except BaseException:
    os.unlink(tmp)
    raise
  return tmp, (md5.hexdigest(), sha.hexdigest())


def download_cifar10(root: str | os.PathLike, *, url: str = CIFAR10_URL,
                     md5: str | None = CIFAR10_MD5,
                     sha256: str | None = CIFAR10_SHA256,
                     timeout: float = 60.0,
                     max_extracted_bytes: int = 1 << 30) -> pathlib.Path:
  """Downloads, verifies and safely extracts the CIFAR-10 archive into `root`.

  Does nothing when `root/cifar-10-batches-py/` already exists. Otherwise the
  archive is streamed to a temporary file, checked against `md5` and `sha256`
  and only then renamed to `root/cifar-10-python.tar.gz` (an archive already
  there is checked, not downloaded again). It is extracted into a temporary
  folder by `safe_extract_tar`, and the `cifar-10-batches-py` folder is renamed
  into place only when the whole archive is out.

  Args:
    root: folder to put the archive and `cifar-10-batches-py/` in.
    url: where to download from ('https' or 'file' URL; tests use file://).
    md5, sha256: expected hex digests; at least one must be given.
    timeout: socket timeout in seconds.
    max_extracted_bytes: refuse archives that unpack to more (tar bombs).

  Returns:
    The `cifar-10-batches-py` folder.

  Raises:
    ConfigError: a URL of another scheme, or no checksum.
    DataError: download failed, checksum mismatch, or an unsafe archive.
  """
  root = pathlib.Path(root)
  target = root / CIFAR10_DIRNAME
  if target.is_dir():
    return target
  scheme = urllib.parse.urlsplit(url).scheme
  if scheme not in ("https", "file"):
    raise ConfigError(f"CIFAR-10 URL must be https:// or file://; got {url}")
  if md5 is None and sha256 is None:
    raise ConfigError("refusing to download without an MD5 or SHA-256")
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create {root}: {e.strerror or e}") from e

  archive = root / CIFAR10_ARCHIVE_NAME
  if archive.is_file():
    problem = _checksum_problem(_hashes(archive), md5, sha256)
    if problem:
      raise DataError(f"{archive} has {problem}: delete it so that it can be "
                      "downloaded again")
  else:
    try:
      tmp, got = _fetch(url, archive, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
      reason = getattr(e, "reason", None) or e
      raise DataError(
          f"cannot download {url}: {reason}. Without network, fetch it "
          f"elsewhere and put it at {archive} (or extract it to {target})"
      ) from e
    problem = _checksum_problem(got, md5, sha256)
    if problem:
      os.unlink(tmp)
      raise DataError(f"the download of {url} has {problem}: it is corrupted "
                      "or not the official archive; nothing was kept")
    os.replace(tmp, archive)

  staging = pathlib.Path(tempfile.mkdtemp(prefix=".cifar-10-extract.",
                                          dir=root))
  try:
    safe_extract_tar(archive, staging, max_bytes=max_extracted_bytes)
    extracted = staging / CIFAR10_DIRNAME
    if not (extracted / CIFAR10_TEST_BATCH).is_file():
      raise DataError(f"{archive} has no {CIFAR10_DIRNAME}/"
                      f"{CIFAR10_TEST_BATCH}: it is not the CIFAR-10 archive")
    try:
      os.replace(extracted, target)
    except OSError as e:
      raise DataError(f"cannot move the extracted data to {target}: "
                      f"{e.strerror or e}") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _member_kind(m: tarfile.TarInfo) -> str:
  if m.issym():
    return "a symbolic link"
  if m.islnk():
    return "a hard link"
  if m.isdev():
    return "a device or FIFO"
  return "not a regular file or folder"


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike, *,
                     max_bytes: int = 1 << 30) -> None:
  """Extracts regular files and folders of a tar archive into `dest`.

  Every member is checked before anything is written, and the whole archive
  is refused if one member has an absolute path, a '..' component, a path
  that resolves outside `dest`, or is a link, device or FIFO, or if the files
  add up to more than `max_bytes`. Files are written by copying their bytes
  (never with tarfile's own extraction), without their modes or owners.

  Raises:
    DataError: naming the archive and the offending member.
  """
  archive = os.fspath(archive)
  dest = pathlib.Path(dest).resolve()
  try:
    with tarfile.open(archive, "r:*") as tar:
      members = tar.getmembers()
      total = 0
      for m in members:
        name = m.name
        if not (m.isfile() or m.isdir()):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          f"is {_member_kind(m)}")
        parts = pathlib.PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name)
            or ".." in parts or "\\" in name):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          "has an absolute path or '..'")
        out = (dest / name).resolve()
        if dest not in out.parents and not (m.isdir() and out == dest):
          raise DataError(f"refusing to extract {archive}: member {name!r} "
                          f"would land outside {dest}")
        total += max(m.size, 0)
        if total > max_bytes:
          raise DataError(f"refusing to extract {archive}: it unpacks to "
                          f"more than {max_bytes} bytes")
      for m in members:
        out = dest / m.name
        if m.isdir():
          out.mkdir(parents=True, exist_ok=True)
          continue
        out.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        # 'xb': a repeated member name is an error, not an overwrite.
        with src, open(out, "xb") as f:
          shutil.copyfileobj(src, f)
  except DataError:
    raise
  except FileExistsError as e:
    raise DataError(f"refusing to extract {archive}: member "
                    f"{e.filename} appears twice") from e
  except (tarfile.TarError, OSError, EOFError, ValueError) as e:
    raise DataError(f"cannot extract {archive} (truncated or not a tar "
                    f"archive?): {e}") from e
