"""User-facing errors.

Every bad input (a flag, a file, a cache, an array) raises one of these with a
message that names the problem. The experiments catch `OVCError`, print the
message on one line and exit non-zero, so a user never reads a JAX traceback
for a mistake of theirs.
"""


class OVCError(Exception):
  """Base class: a problem the user can fix, described in one message."""


class ConfigError(OVCError, ValueError):
  """A flag, config value or function argument is out of range or inconsistent."""


class InputError(OVCError, ValueError):
  """An input array (image, embedding matrix, ...) has a bad shape or values."""


class CheckpointError(OVCError):
  """A model checkpoint is missing, unreadable or does not match its config."""


class DataError(OVCError):
  """A dataset file or folder is missing or is not what it claims to be."""


class CacheError(OVCError):
  """A certification cache is missing, corrupted or was made from something else."""


def check_bundle(value, cls: type, name: str) -> None:
  """Raises ConfigError unless `value` is the parameter bundle `cls`."""
  if not isinstance(value, cls):
    name_ = cls.__name__
    # "an MVNParams", "an IRSParams", "a SmoothingParams": by the sound.
    acronym = name_[:2].isupper() and name_[0] in "FHLMNRSX"
    article = "an" if name_[0] in "AEIOU" or acronym else "a"
    raise ConfigError(f"{name} must be {article} {name_}; got "
                      f"{type(value).__name__}")
