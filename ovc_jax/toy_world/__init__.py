"""A procedurally generated world of small images and their captions.

Real CLIP weights cannot be downloaded where the tests and the default runs
happen, and a CLIP with random weights makes every certificate meaningless.
The project therefore trains a small CLIP on this world: 32x32 RGB images of
ten shapes (`TOY_CLASSES`) in varied colours, sizes, poses, backgrounds and
rendering styles (photos, degraded photos, drawings, sketches, cartoons), each
with a caption that describes it truthfully. Zero-shot classifiers built from
`TOY_TEMPLATES` then behave like CLIP's on CIFAR-10: templates mostly agree,
some suit some images better than others, and accuracy falls as noise grows.

Modules:
  catalog   classes, styles, colours, sizes, backgrounds (names and codes)
  seeds     the seed scheme: training and held-out streams never share a seed
  shapes    signed distance functions of the ten shapes
  scenes    `Scenes` and `sample_scenes`: every random choice of a batch
  rendering `render(scenes, rng)`: vectorised NumPy rasterisation
  captions  `TOY_TEMPLATES`, captions, `template_matches`, `vocabulary`
  stream    `sample_batch`: the infinite, seeded training stream
  split     `write_test_split`: the held-out test split in CIFAR-10's layout
            (not imported here: it builds on ovc_jax.datasets, which builds on
            this package; `from ovc_jax.toy_world import split`)

Example:
  images, captions, labels, attributes = sample_batch((seed, step), 256)
"""

from ovc_jax.toy_world.captions import TOY_TEMPLATES
from ovc_jax.toy_world.captions import template_matches
from ovc_jax.toy_world.captions import vocabulary
from ovc_jax.toy_world.captions import words
from ovc_jax.toy_world.catalog import BACKGROUNDS
from ovc_jax.toy_world.catalog import COLOURS
from ovc_jax.toy_world.catalog import GENERATOR_VERSION
from ovc_jax.toy_world.catalog import IMAGE_SIZE
from ovc_jax.toy_world.catalog import SIZES
from ovc_jax.toy_world.catalog import STYLES
from ovc_jax.toy_world.catalog import TOY_CLASSES
from ovc_jax.toy_world.rendering import render
from ovc_jax.toy_world.scenes import Scenes
from ovc_jax.toy_world.scenes import sample_scenes
from ovc_jax.toy_world.stream import sample_batch
from ovc_jax.toy_world.stream import train_batches

__all__ = [
    "BACKGROUNDS", "COLOURS", "GENERATOR_VERSION", "IMAGE_SIZE", "SIZES",
    "STYLES", "TOY_CLASSES", "TOY_TEMPLATES", "Scenes", "render",
    "sample_batch", "sample_scenes", "template_matches", "train_batches",
    "vocabulary", "words",
]

