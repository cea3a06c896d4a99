"""What the repository ships under checkpoints/, kept from being overwritten.

`train_toy_clip` and `write_toy_split` remake the embedded default (the toy
CLIP in checkpoints/toy_clip/ and its test split in checkpoints/toy_world/).
They write under their workdir unless `--export_to_checkpoints` is given, and
refuse any other path into a shipped folder, so that reproducing the model
never replaces the committed one by accident.
"""

from __future__ import annotations

import os

from experiments.common import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
CHECKPOINTS = os.path.join(REPO, "checkpoints")
TOY_CLIP = os.path.join(CHECKPOINTS, "toy_clip")
TOY_WORLD = os.path.join(CHECKPOINTS, "toy_world")
SHIPPED = (TOY_CLIP, TOY_WORLD)
EXPORT_FLAG = "--export_to_checkpoints"
EXPORT_SUBDIR = "export"  # train_toy_clip's export, under its workdir


def shipped_folder(path: str) -> str | None:
  """The shipped folder that `path` is, or lies inside; None if neither."""
  real = os.path.realpath(path)
  for folder in SHIPPED:
    shipped = os.path.realpath(folder)
    if real == shipped or real.startswith(shipped + os.sep):
      return folder
  return None


def output_folder(path: str, flag: str, shipped: str, *,
                  export_to_checkpoints: bool, path_given: bool) -> str:
  """Where an entry point that remakes `shipped` writes.

  Args:
    path: the value of `flag` (its default when not given).
    flag: the flag naming the output, for messages (`--workdir`).
    shipped: the shipped folder this entry point remakes (one of SHIPPED).
    export_to_checkpoints: the user asked to replace `shipped`.
    path_given: `flag` was given on the command line.

  Returns:
    `shipped` with `export_to_checkpoints`, else `path`.

  Raises:
    WorkdirError: `path` is (or lies in) a shipped folder without
      `export_to_checkpoints`, or both that and `flag` were given.
  """
  if export_to_checkpoints:
    if path_given and os.path.realpath(path) != os.path.realpath(shipped):
      raise WorkdirError(
          f"{EXPORT_FLAG} writes {os.path.relpath(shipped, REPO)}; drop "
          f"{flag}={path} or {EXPORT_FLAG}")
    return shipped
  folder = shipped_folder(path)
  if folder is not None:
    raise WorkdirError(
        f"{flag}={path} would overwrite the shipped "
        f"{os.path.relpath(folder, REPO)}; pass {EXPORT_FLAG} to replace it, "
        f"or another {flag}")
  return path


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError when `workdir` lies in a shipped folder."""
  folder = shipped_folder(workdir)
  if folder is not None:
    raise WorkdirError(f"--workdir={workdir} lies in the shipped "
                       f"{os.path.relpath(folder, REPO)}; pass another "
                       "--workdir")


def toy_clip_export_dir(workdir: str, export_dir: str | None, *,
                        export_to_checkpoints: bool) -> str:
  """Where train_toy_clip exports: --export_dir if given, else
  WORKDIR/export; the shipped checkpoints/toy_clip only when asked."""
  check_workdir(workdir)
  return output_folder(
      export_dir if export_dir is not None else os.path.join(
          workdir, EXPORT_SUBDIR),
      "--export_dir", TOY_CLIP, export_to_checkpoints=export_to_checkpoints,
      path_given=export_dir is not None)
