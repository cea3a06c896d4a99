"""What every experiment entry point shares: error handling, progress, resumable output.

Library code takes plain arguments; this module is where flags and configs meet
it. A mistake of the user's (`ovc_jax.errors.OVCError`), a file-system problem
(a full disk, a read-only or missing folder) and Ctrl-C end the program with
one line `error: ...` on stderr and a non-zero exit status, never a traceback:

  exit_on_user_error   decorator for absl mains (OVCError, OSError -> 1, Ctrl-C -> 130)
  run_app              app.run with flag errors, unknown config fields and
                       --help handled the same way (--help exits 0)
  define_config_flag   a --config flag whose help lists the variants and fields
  workdir_lock         one run per workdir (fcntl.flock on WORKDIR/.lock)
  ResumableRun         exactly-once TSV rows across kills and restarts
  atomic_write_text, write_json, save_figure   whole files or none
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import functools
import json
import logging
import math
import numbers
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

from ovc_jax.errors import ConfigError, OVCError

# JAX logs at INFO that it found no TPU on every start; not news to a user.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_STATUS = 130

# config.json's key for the weights' content hashes (not a config field).
WEIGHTS_KEY = "model_weights"


class WorkdirError(OVCError):
  """A workdir cannot be used: a file, not writable, full, damaged or in use."""


# ---------------------------------------------------------------------------
# Errors as one line


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull",
               "--helpxml", "-helpfull", "-helpshort")


def _workdir_of(e: BaseException | None) -> str | None:
  """The workdir a run was writing when `e` ended it: the outermost
  `workdir_lock` it passed through, else the last workdir this process used."""
  workdir = getattr(e, "_ovc_workdir", None)
  if workdir is None and _USED_WORKDIRS:
    workdir = _USED_WORKDIRS[-1]
  return workdir


def os_error_message(e: OSError, path: str | None = None) -> str:
  """One line for an OSError: what went wrong where, and what to do."""
  where = path or e.filename
  if where is None:
    workdir = _workdir_of(e)
    where = f"under {workdir}" if workdir else None
  at = f" ({where})" if where else ""
  # NumPy reports a short write (a full disk) without errno.
  short_write = e.errno is None and re.search(r"\d+ requested and \d+ written",
                                              str(e))
  if e.errno in (errno.ENOSPC, errno.EDQUOT) or short_write:
    return (f"the disk is full: no space left on device{at}; free some space "
            "there (or use another --workdir) and run the same command again: "
            "finished work is kept")
  if e.errno == errno.EROFS:
    return f"read-only file system{at}: use a --workdir on a writable disk"
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"permission denied{at}: use a --workdir you can write to"
  reason = " ".join((e.strerror or str(e)).split())
  return f"{reason}{at}"


def disk_error(e: OSError, path: str) -> WorkdirError:
  """The WorkdirError of an OSError raised while writing `path`."""
  error = WorkdirError(os_error_message(e, path))
  error.errno = e.errno
  return error


def _interrupted_message(e: BaseException | None = None) -> str:
  workdir = _workdir_of(e)
  if workdir:
    return (f"interrupted (Ctrl-C); finished work in {workdir} is kept: run "
            "the same command again to resume")
  return "interrupted (Ctrl-C)"


def _fail(message: str, status: int = 1) -> None:
  message = " ".join(line.strip() for line in str(message).splitlines())
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorator for absl mains: one line `error: ...` instead of a traceback.

  OVCError and OSError (a full disk, a read-only folder, ...) exit with
  status 1, Ctrl-C with 130, absl's UsageError with its exit code.
  """

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    from absl import app  # pylint: disable=g-import-not-at-top
    try:
      return main(*args, **kwargs)
    except OVCError as e:
      _fail(str(e))
    except OSError as e:
      _fail(os_error_message(e))
    except KeyboardInterrupt as e:
      _fail(_interrupted_message(e), INTERRUPTED_EXIT_STATUS)
    except app.UsageError as e:
      _fail(f"{e} (see --help)", e.exitcode)

  return wrapped


# ---------------------------------------------------------------------------
# Flags and configs


def config_fields(config, prefix: str = "") -> dict[str, Any]:
  """{dotted field path: value} of a ConfigDict, nested fields flattened."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      out.update(config_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_help(module, default_arg: str | None = None) -> str:
  """The --config flag's help: the variants and the fields with defaults.

  `module` is a config module: get_config(arg) and a VARIANTS string.
  """
  config = module.get_config(default_arg)
  fields = "; ".join(f"{k}={v!r}" for k, v in config_fields(config).items())
  variants = " ".join(getattr(module, "VARIANTS", "").split())
  path = os.path.relpath(module.__file__)
  return (f"Config file, optionally with :VARIANTS (comma-separated), e.g. "
          f"--config={path}:{getattr(module, 'EXAMPLE_VARIANTS', 'VARIANT')}. "
          f"Variants: {variants or '(none)'}. "
          f"Fields (set any with --config.FIELD=VALUE, nested ones as "
          f"--config.PART.FIELD=VALUE, lists as --config.FIELD=a,b; "
          f"defaults shown): {fields}.")


def _override_paths(argv: list[str], name: str) -> list[tuple[str, str]]:
  """[(field path, the argument)] of --NAME.FIELD=... overrides in argv."""
  out = []
  for arg in argv:
    m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      out.append((m.group(1), arg))
  return out


def _has_path(config, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def _load_config_for_message(argv, name: str, module):
  """The config the command line names (for messages), or None."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  for arg in argv:
    m = re.match(rf"^--?{re.escape(name)}=(.*)$", arg)
    if m:
      try:
        return config_flags.ConfigFileFlagParser(name).parse(m.group(1))
      except BaseException:  # pylint: disable=broad-except
        return None
  try:
    return module.get_config() if module is not None else None
  except BaseException:  # pylint: disable=broad-except
    return None


def _config_error_message(e: BaseException, argv, name: str = "config",
                          module=None) -> str:
  """One line for an error ml_collections raised while reading --config."""
  config = _load_config_for_message(argv, name, module)
  if config is not None:
    fields = config_fields(config)
    for path, arg in _override_paths(argv, name):
      if not _has_path(config, path):
        close = difflib.get_close_matches(path, list(fields), n=1)
        hint = f" (did you mean --{name}.{close[0]}?)" if close else ""
        return (f"unknown config field {path!r} in {arg}{hint}; the fields "
                f"are: {', '.join(fields)}")
  text = str(e).strip()
  if "Error whilst parsing config file" in text:
    text = text.strip().splitlines()[-1]  # the original exception's line
  text = " ".join(text.replace("\\n", " ").split())
  return f"bad --{name}: {text}"


def define_config_flag(module, help_string: str | None = None,
                       name: str = "config", default_arg: str | None = None):
  """config_flags.DEFINE_config_file for `module`, errors as one line.

  ml_collections applies --config.FIELD overrides while the flag is defined
  (at import) or parsed; an unknown field or a bad value there ends the
  program with one line naming it and the fields that exist.
  """
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  default = module.__file__ + (f":{default_arg}" if default_arg else "")
  help_string = help_string or config_help(module, default_arg)
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string,
                                             lock_config=True)
  except (SystemExit, KeyboardInterrupt):
    raise
  except Exception as e:  # pylint: disable=broad-except
    _fail(_config_error_message(e, sys.argv, name, module))
  _CONFIG_MODULES[name] = module
  # Listed by --help among the calling (main) module's flags.
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    from absl.flags import _helpers  # pylint: disable=g-import-not-at-top
    caller = _helpers.get_module_object_and_name(sys._getframe(1).f_globals)  # pylint: disable=protected-access
    if caller is not None:
      flags.FLAGS.register_key_flag_for_module(caller.module_name,
                                               flags.FLAGS[name])
  except Exception:  # pylint: disable=broad-except
    pass  # --helpfull still lists it
  return holder


_CONFIG_MODULES: dict[str, Any] = {}


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors and --help exiting 0."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  help_asked = any(a.split("=", 1)[0] in _HELP_FLAGS for a in argv[1:])
  try:
    rest = flags.FLAGS(argv)
    for name in _CONFIG_MODULES:
      value = flags.FLAGS[name].value
      if type(value).__name__ == "_ErrorConfig":  # a file it could not load
        given = next((a.split("=", 1)[1] for a in argv
                      if re.match(rf"^--?{re.escape(name)}=", a)), "")
        path = given.split(":", 1)[0]
        reason = ("no such file" if not os.path.exists(path) else
                  "it cannot be read as a config module")
        _fail(f"--{name}={given}: cannot load the config file {path}: "
              f"{reason}")
    return rest
  except SystemExit as e:
    if help_asked:
      sys.exit(0)
    raise
  except flags.Error as e:
    _fail(f"{' '.join(str(e).split())} (see --help)")
  except (KeyboardInterrupt,):
    raise
  except Exception as e:  # pylint: disable=broad-except
    name = next(iter(_CONFIG_MODULES), "config")
    _fail(_config_error_message(e, argv, name, _CONFIG_MODULES.get(name)))
  return []  # not reached


def run_app(main: Callable[..., Any]) -> None:
  """absl's app.run(main) with `parse_flags`; Ctrl-C anywhere in it (flag
  parsing included) ends in one line and exit status 130."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt as e:
    _fail(_interrupted_message(e), INTERRUPTED_EXIT_STATUS)


def check_number_list(values: Any, field: str, *, minimum: float = 0.0,
                      allow_minimum: bool = False, integer: bool = False,
                      allow_empty: bool = False) -> tuple:
  """A config list of numbers: each finite and above `minimum`, none twice.

  Args:
    values: the field's value (ml_collections turns an unparseable
      `--config.FIELD=...` into a tuple holding the text).
    field: the field's path, for the message (`--config.FIELD`).
    minimum: the bound every number must exceed (or reach, with
      `allow_minimum`).
    integer: whole numbers only.
    allow_empty: an empty list is fine.

  Returns:
    The values as a tuple.

  Raises:
    ConfigError: naming the flag and the bad entry.
  """
  flag = f"--config.{field}"
  example = f"{flag}=1,2" if integer else f"{flag}=0.25,0.5"
  if isinstance(values, (str, numbers.Number)):
    values = (values,)
  values = tuple(values)
  if all(isinstance(v, str) and not v.strip(" ,") for v in values):
    values = ()  # "--config.FIELD=" or "--config.FIELD=,"
  if not values and not allow_empty:
    raise ConfigError(f"{flag} is empty; give one or more numbers separated by "
                      f"commas, e.g. {example}")
  bound = ">=" if allow_minimum else ">"
  for v in values:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      raise ConfigError(
          f"{flag} holds {v!r}, which is not a number; give "
          f"{'whole ' if integer else ''}numbers {bound} {minimum:g} "
          f"separated by commas, e.g. {example}")
    if integer and float(v) != int(v):
      raise ConfigError(f"{flag} holds {v!r}, which is not a whole number")
    if not math.isfinite(float(v)) or (v < minimum if allow_minimum
                                       else v <= minimum):
      raise ConfigError(f"{flag} holds {v!r}; each entry must be a finite "
                        f"number {bound} {minimum:g}")
  seen = set()
  for v in values:
    if float(v) in seen:
      raise ConfigError(
          f"{flag} lists {v!r} twice; each value is computed once, so give it "
          "once")
    seen.add(float(v))
  return values


def check_name_list(values: Any, field: str, choices: Iterable[str] | None = None
                    ) -> tuple:
  """A config list of names: non-empty strings (of `choices`), none twice."""
  flag = f"--config.{field}"
  if isinstance(values, str):
    values = (values,)
  values = tuple(values)
  if len(values) == 1 and isinstance(values[0], str) and "," in values[0]:
    # --config.FIELD=a,b arrives as the one string 'a,b'.
    values = tuple(v.strip() for v in values[0].split(",") if v.strip())
  if not values:
    raise ConfigError(f"{flag} is empty")
  choices = tuple(choices) if choices is not None else None
  for v in values:
    if not isinstance(v, str) or not v.strip():
      raise ConfigError(f"{flag} holds {v!r}, which is not a name")
    if choices is not None and v not in choices:
      raise ConfigError(f"{flag} holds {v!r}; choose from {', '.join(choices)}")
  if len(set(values)) != len(values):
    twice = next(v for v in values if values.count(v) > 1)
    raise ConfigError(f"{flag} lists {twice!r} twice; give it once")
  return values


# ---------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0.0)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Prints items done, items left, the rate and an ETA, one line per update.

  The rate is an exponential moving average of the seconds per item of the
  recent updates (weight `smoothing` on the newest), so that the ETA follows
  a run whose items get slower or faster; `per` says what one item counts
  (e.g. "all prompts and methods of one input").
  """

  def __init__(self, total: int, what: str = "inputs", stream=None,
               already_done: int = 0, per: str = "", smoothing: float = 0.3):
    self.total = total
    self.what = what
    self.done = already_done
    self.stream = stream or sys.stderr
    self.per = per
    self.smoothing = smoothing
    self._last = time.perf_counter()
    self._counted = 0  # items timed in this process (resumed ones are not)
    self.rate: float | None = None  # smoothed seconds per item

  def update(self, count: int = 1, note: str = "") -> None:
    now = time.perf_counter()
    self.done += count
    self._counted += count
    if count > 0:
      recent = (now - self._last) / count
      self.rate = (recent if self.rate is None else
                   self.smoothing * recent + (1 - self.smoothing) * self.rate)
    self._last = now
    rate = self.rate or 0.0
    left = max(self.total - self.done, 0)
    unit = self.what[:-1] if self.what.endswith("s") else self.what
    per = f" ({self.per})" if self.per else ""
    line = (f"[{self.done}/{self.total} {self.what} done, {left} left] "
            f"{rate:.2f} s/{unit}{per}, ETA {format_duration(rate * left)}")
    if note:
      line += f"  {note}"
    self.stream.write(line + "\n")
    self.stream.flush()


# ---------------------------------------------------------------------------
# Files


def _file_mode() -> int:
  """0o666 less the umask: the mode open() gives a new file."""
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


def atomic_write_text(path: str, text: str) -> None:
  """Writes a file via a temporary file and a rename: whole or not at all.

  The file gets the mode a plain open() would give it (0o644 under umask
  022). Raises WorkdirError (one line: a full disk, a read-only folder, ...)
  when it cannot be written; nothing is left half-written.
  """
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.fchmod(fd, _file_mode())
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise disk_error(e, path) from e
    raise


def write_json(path: str, value: Any) -> None:
  atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure to `path` through a temporary file (a killed
  run leaves no half-written PNG) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp.png"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(tmp)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise disk_error(e, path) from e
    raise
  finally:
    plt.close(fig)


def remove_empty_dirs(path: str, stop: str) -> None:
  """Removes `path` and its parents while empty, up to and including `stop`."""
  path, stop = os.path.abspath(path), os.path.abspath(stop)
  while path.startswith(stop):
    try:
      os.rmdir(path)
    except OSError:
      return
    if path == stop:
      return
    path = os.path.dirname(path)


def discard_dir(path: str, stop: str) -> None:
  """Removes an incomplete folder and the empty folders above it up to `stop`."""
  shutil.rmtree(path, ignore_errors=True)
  remove_empty_dirs(os.path.dirname(os.path.abspath(path)), stop)


# ---------------------------------------------------------------------------
# One run per workdir


class _Lock:
  """An flock held on WORKDIR/.lock by this process (counted: re-entrant)."""

  def __init__(self, workdir: str, fd: int):
    self.workdir = workdir
    self.fd = fd
    self.count = 0


_LOCKS: dict[str, _Lock] = {}
_USED_WORKDIRS: list[str] = []  # for messages after a lock is released
LOCK_NAME = ".lock"


def check_workdir_path(workdir: str, flag: str = "--workdir") -> None:
  """Raises WorkdirError when `workdir` cannot be a folder: it is a file, or
  a file stands where one of its parents should be. Creates nothing."""
  if not workdir:
    raise WorkdirError(f"{flag} is empty")
  what = "workdir" if flag == "--workdir" else flag
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{what} {workdir} is a file, not a folder; pass "
                       f"another {flag}")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"{what} {workdir} cannot be created: {parent} is a "
                       f"file, not a folder; pass another {flag}")


def _holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
  except OSError:
    text = ""
  return " ".join(text.split()) or "a process that has not written its pid yet"


def acquire_workdir(workdir: str, flag: str = "--workdir") -> _Lock:
  """Takes this process's exclusive lock on `workdir` (created if missing).

  Raises:
    WorkdirError: the workdir is a file or cannot be created or written, or
      another process holds it (the message names its pid and host).
  """
  check_workdir_path(workdir, flag)
  what = "workdir" if flag == "--workdir" else flag
  key = os.path.realpath(workdir)
  lock = _LOCKS.get(key)
  if lock is None:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"{what} {workdir} cannot be created: "
                         f"{os_error_message(e, workdir)}") from e
    path = os.path.join(workdir, LOCK_NAME)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"{what} {workdir} cannot be written: "
                         f"{os_error_message(e, path)}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _holder(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"{what} {workdir} is in use by another run ({holder}); wait for "
            f"it to finish or stop it, or pass another {flag}") from e
      raise WorkdirError(f"{what} {workdir} cannot be locked: "
                         f"{os_error_message(e, path)}") from e
    try:
      record = (f"pid {os.getpid()} on host {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}")
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (record[:1000] + "\n").encode())
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f"{what} {workdir} cannot be written: "
                         f"{os_error_message(e, path)}") from e
    lock = _LOCKS[key] = _Lock(workdir, fd)
    if workdir not in _USED_WORKDIRS:
      _USED_WORKDIRS.append(workdir)
  lock.count += 1
  return lock


def release_workdir(lock: _Lock) -> None:
  lock.count -= 1
  if lock.count > 0:
    return
  for key, held in list(_LOCKS.items()):
    if held is lock:
      del _LOCKS[key]
  try:
    os.ftruncate(lock.fd, 0)  # nobody holds it now
  except OSError:
    pass
  os.close(lock.fd)  # releases the flock


@contextlib.contextmanager
def workdir_lock(workdir: str, flag: str = "--workdir"):
  """Holds an exclusive lock on `workdir` (WORKDIR/.lock) for the block.

  One process at a time writes a workdir: a second run of any experiment on
  it stops with one line naming the workdir and the pid and host holding it.
  The lock is the kernel's (fcntl.flock), so a run that was killed, even with
  kill -9, holds nothing: resuming its workdir just works. Re-entrant within
  a process.
  """
  lock = acquire_workdir(workdir, flag)
  try:
    yield lock
  except (KeyboardInterrupt, OSError) as e:
    e._ovc_workdir = workdir  # for the message; the outermost lock's wins
    raise
  finally:
    release_workdir(lock)


# ---------------------------------------------------------------------------
# The workdir's record of its configuration


def first_difference(a: Any, b: Any,
                     sides: tuple[str, str] = ("in the workdir", "now"),
                     path: str = "") -> str | None:
  """The first field where two JSON configs differ, as "field: A SIDE_A, B
  SIDE_B", or None."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    for k in sorted(set(a) | set(b)):
      diff = first_difference(a.get(k), b.get(k), sides,
                              f"{path}.{k}" if path else k)
      if diff:
        return diff
    return None
  return None if a == b else f"{path}: {a!r} {sides[0]}, {b!r} {sides[1]}"


def check_workdir_config(workdir: str, config: Mapping[str, Any],
                         what: str, *,
                         weights: Mapping[str, str] | None = None) -> None:
  """Records `config` in a new workdir's config.json; refuses another one.

  Args:
    workdir: the run's directory (created if missing).
    config: the run's configuration as JSON values.
    what: what the workdir holds, for the message ("results", "a training
      run").
    weights: content hashes of the model's weights ({"sha256": ...,
      "fingerprint": ...}); recorded beside the config, and a workdir
      recorded with other weights is refused (the hashes both sides know are
      compared). None: not checked.

  Raises:
    ConfigError: config.json is corrupted or records a different
      configuration (the message names the first differing field).
    WorkdirError: the workdir was started with other weights, or config.json
      cannot be written.
  """
  path = os.path.join(workdir, "config.json")
  config = json.loads(json.dumps(config, sort_keys=True))
  config.pop(WEIGHTS_KEY, None)
  weights = dict(weights or {})
  if not os.path.exists(path):
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise disk_error(e, workdir) from e
    write_json(path, {**config, WEIGHTS_KEY: weights} if weights else config)
    return
  try:
    with open(path) as f:
      previous = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is corrupted ({e}); use another --workdir") from e
  except OSError as e:
    raise WorkdirError(f"cannot read {path}: {os_error_message(e)}") from e
  if not isinstance(previous, dict):
    raise ConfigError(f"{path} is corrupted (not a JSON object); use another "
                      "--workdir")
  recorded = previous.pop(WEIGHTS_KEY, None) or {}
  diff = first_difference(previous, config)
  if diff:
    raise ConfigError(
        f"workdir {workdir} holds {what} of a different configuration "
        f"({diff}); use another --workdir or the same flags")
  if weights:
    for kind in ("sha256", "fingerprint"):
      if kind in recorded and kind in weights and recorded[kind] != weights[kind]:
        raise WorkdirError(
            f"workdir {workdir} was started with other model weights (weights "
            f"{kind} {recorded[kind]} in the workdir, {weights[kind]} now): "
            "resuming would mix two models' rows; restore those weights or "
            "pass another --workdir")
    if any(k not in recorded for k in weights):
      # A workdir of an older version, or a hash this version adds: record it.
      write_json(path, {**previous, WEIGHTS_KEY: {**weights, **recorded}})


class ResumableRun:
  """Exactly-once result rows in several TSV files, across kills and restarts.

  A workdir records the configuration it was started with (`config.json`)
  and, in `done.txt`, each input whose rows are all written. An input's rows
  are appended (flushed and fsync'ed) to every TSV first and its index is
  appended to `done.txt` last. On a restart, each TSV is cut back to the rows
  of inputs listed in `done.txt`, so rows of an input that was interrupted
  anywhere, half-written rows included, are dropped and computed again.

  A workdir started with a different configuration (or other model weights)
  is refused: resuming never mixes two configurations in one file. The run
  holds the workdir's lock (`workdir_lock`) from construction until `close()`
  (or until it is garbage collected): a second process cannot write it.
  """

  def __init__(self, workdir: str, config: Mapping[str, Any], *,
               weights: Mapping[str, str] | None = None):
    self.workdir = workdir
    self._done_path = os.path.join(workdir, "done.txt")
    self._lock = acquire_workdir(workdir)
    try:
      check_workdir_config(workdir, config, "results", weights=weights)
      self.done = self._read_done()
    except BaseException:
      self.close()
      raise
    self._cleaned: set[str] = set()

  def close(self) -> None:
    lock, self._lock = getattr(self, "_lock", None), None
    if lock is not None:
      release_workdir(lock)

  def __enter__(self) -> "ResumableRun":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def _read_done(self) -> list[int]:
    if not os.path.exists(self._done_path):
      return []
    try:
      with open(self._done_path) as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise WorkdirError(f"cannot read {self._done_path}: {e}") from e
    lines = text.split("\n")
    done = []
    for number, line in enumerate(lines[:-1], 1):
      if not line.strip():
        continue
      if not line.strip().isdigit():
        raise WorkdirError(
            f"{self._done_path} line {number} is {line[:40]!r}, not an input "
            "index: the file is damaged; delete that line (its input is "
            "computed again) or pass another --workdir")
      done.append(int(line))
    if lines[-1]:
      # A line without its newline is an interrupted append: not done. It is
      # cut off now, or the next append would run on from it.
      atomic_write_text(self._done_path, "".join(f"{i}\n" for i in done))
    return done

  def prepare(self, tables: Mapping[str, str]) -> None:
    """Cleans every TSV this run writes ({path: header line}) before it starts."""
    for path, header in tables.items():
      self._prepare(path, header)

  def _prepare(self, path: str, header: str) -> None:
    """Cuts an existing TSV back to the rows of done inputs (once per run)."""
    if path in self._cleaned:
      return
    self._cleaned.add(path)
    done = set(self.done)
    kept = [header]
    if os.path.exists(path):
      with open(path) as f:
        lines = f.read().split("\n")
      for line in lines[1:-1]:  # the last element is '' or a partial row
        idx = line.split("\t", 1)[0]
        if idx.isdigit() and int(idx) in done:
          kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))

  def _append(self, path: str, text: str) -> None:
    try:
      with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
      raise disk_error(e, path) from e

  def commit(self, idx: int, rows: Mapping[str, tuple[str, str]]) -> None:
    """Writes input `idx`'s rows: {tsv path: (header line, row line)}."""
    for path, (header, row) in rows.items():
      self._prepare(path, header)
      self._append(path, row)
    self._append(self._done_path, f"{idx}\n")
    self.done.append(idx)

  def remaining(self, indices: Iterable[int]) -> list[int]:
    done = set(self.done)
    return [i for i in indices if i not in done]
