r"""Write the toy world's held-out test split (CIFAR-10 layout), its metadata
and an example montage.

  python -m experiments.write_toy_split                      # checkpoints/toy_world
  python -m experiments.write_toy_split --out=/tmp/toy --num_images=200 --no_montage

See `ovc_jax.toy_world.split.write_test_split` for what is written.
"""

from __future__ import annotations

from absl import app
from absl import flags

from experiments import common
from ovc_jax import datasets
from ovc_jax.toy_world import catalog as cat
from ovc_jax.toy_world import split

_OUT = flags.DEFINE_string("out", datasets.DEFAULT_ROOTS["toy"],
                           "Output folder.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 1000, "Images in the split, balanced over the classes.")
_SEED = flags.DEFINE_integer("seed", 0, "The split's seed.")
_NO_MONTAGE = flags.DEFINE_boolean("no_montage", False, "Skip examples.png.")


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  record = split.write_test_split(_OUT.value, _NUM_IMAGES.value, _SEED.value,
                                  write_montage=not _NO_MONTAGE.value)
  batch = f"{datasets.CIFAR10_DIRNAME}/{datasets.CIFAR10_TEST_BATCH}"
  print(f"wrote {record['num_images']} images ({cat.NUM_CLASSES} classes) to "
        f"{_OUT.value}; test_batch sha256 {record['files'][batch]}")


if __name__ == "__main__":
  app.run(main)
