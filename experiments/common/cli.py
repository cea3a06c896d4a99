"""The command line: flags and configs in, one line `error: ...` out.

A mistake of the user's (`ovc_jax.errors.OVCError`), a file-system problem
and Ctrl-C end the program with one line on stderr and a non-zero exit
status, never a traceback:

  exit_on_user_error   decorator for absl mains (OVCError, OSError -> 1, Ctrl-C -> 130)
  run_app              app.run with flag errors, unknown config fields and
                       --help handled the same way (--help exits 0)
  define_config_flag   a --config flag whose help lists the variants and fields
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
from typing import Any, Callable

from experiments.common.files import os_error_message
from experiments.common.files import workdir_of
from ovc_jax.errors import OVCError

# JAX logs at INFO that it found no TPU on every start; not news to a user.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

# Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_STATUS = 130

_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull",
               "--helpxml", "-helpfull", "-helpshort")


def _interrupted_message(e: BaseException | None = None) -> str:
  workdir = workdir_of(e)
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
