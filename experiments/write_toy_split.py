r"""Write the toy world's held-out test split (CIFAR-10 layout), its metadata
and an example montage.

  python -m experiments.write_toy_split                      # workdirs/toy_world
  python -m experiments.write_toy_split --workdir=/tmp/toy --num_images=200 --nomontage
  python -m experiments.write_toy_split --export_to_checkpoints   # replaces checkpoints/toy_world

The shipped split in checkpoints/toy_world/ is replaced only with
--export_to_checkpoints. See `ovc_jax.toy_world.split.write_test_split` for
what is written; `--config.data_dir=WORKDIR` points an experiment at a split
written elsewhere.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from experiments import common
from experiments.common import shipped
from ovc_jax import datasets
from ovc_jax.toy_world import catalog as cat
from ovc_jax.toy_world import split

_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdirs", "toy_world"),
    "Output folder (the shipped checkpoints/toy_world/ only with "
    "--export_to_checkpoints).")
flags.DEFINE_alias("out", "workdir")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 1000, "Images in the split, balanced over the classes.")
_SEED = flags.DEFINE_integer("seed", 0, "The split's seed.")
_MONTAGE = flags.DEFINE_boolean(
    "montage", True, "Also write examples.png, a montage of example images.")
_EXPORT = flags.DEFINE_boolean(
    "export_to_checkpoints", False,
    "Write the shipped split in checkpoints/toy_world/ (replacing it) instead "
    "of --workdir.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = shipped.output_folder(
      _WORKDIR.value, "--workdir", shipped.TOY_WORLD,
      export_to_checkpoints=_EXPORT.value,
      path_given=flags.FLAGS["workdir"].present)
  common.check_workdir_path(out)
  record = split.write_test_split(out, _NUM_IMAGES.value, _SEED.value,
                                  write_montage=_MONTAGE.value)
  batch = f"{datasets.CIFAR10_DIRNAME}/{datasets.CIFAR10_TEST_BATCH}"
  print(f"wrote {record['num_images']} images ({cat.NUM_CLASSES} classes) to "
        f"{out}; test_batch sha256 {record['files'][batch]}")


if __name__ == "__main__":
  common.run_app(main)
