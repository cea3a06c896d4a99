r"""List, compress and verify the caches of a certify workdir.

  python -m experiments.caches --workdir=DIR                     # list them
  python -m experiments.caches --workdir=DIR --action=convert --to=int8
  python -m experiments.caches --workdir=DIR --action=verify --samples=8

list: every cache (WORKDIR/caches, or the --config.cache_dir the run
recorded) with its kind, storage format, sigma, rows and bytes on disk, then
the totals per sigma, kind and format.
convert: every float32 embedding cache to int16 or int8 (each row quantised,
with a bound on its error; Cached-OVC's certificates stay exact), in place
and atomically: the new cache is written beside the old one, read back and
checked to decode within its bounds, and only then replaces it; a kill at any
moment leaves the old cache or the new one, whole.
verify: every cache's checksums, and --samples noise samples of every
embedding cache regenerated with the model the run's config.json names.
convert and verify hold the workdir's lock, as certify does. See
docs/CACHES.md.
"""

import os

from absl import app
from absl import flags

from experiments import common
from experiments.common import cache_admin
from ovc_jax import ovc

_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join("workdirs", "certify"),
    "The certify run whose caches to list, convert or verify.")
_ACTION = flags.DEFINE_enum("action", "list", cache_admin.ACTIONS,
                            "What to do with the caches.")
_TO = flags.DEFINE_enum("to", "int8", ("int16", "int8"),
                        "With --action=convert: the format to convert to.")
_SAMPLES = flags.DEFINE_integer(
    "samples", ovc.DEFAULT_VERIFY_SAMPLES,
    "With --action=verify: noise samples regenerated per embedding cache.",
    lower_bound=1)


@common.exit_on_user_error
def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ACTION.value == "convert":
    cache_admin.convert_caches(_WORKDIR.value, _TO.value)
  elif _ACTION.value == "verify":
    cache_admin.verify_caches(_WORKDIR.value, _SAMPLES.value)
  else:
    cache_admin.list_caches(_WORKDIR.value)


if __name__ == "__main__":
  common.run_app(main)
