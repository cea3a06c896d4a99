"""Per-dataset defaults: class names, templates, Cohen's skip, novel prompts.

`SETTINGS` is the one table; `prompts.templates_for`, `prompts.class_names_for`,
`DEFAULT_SKIP` and `NUM_NOVEL` read from it.
"""

from __future__ import annotations

import dataclasses

from ovc_jax import clip_lists
from ovc_jax.toy_world.captions import TOY_TEMPLATES


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
  """The built-in defaults of one dataset.

  Attributes:
    class_names: class names in label order; None where the data names its
      classes (the toy world's batches.meta).
    templates: the zero-shot prompt templates.
    skip: certify every `skip`-th test image (Cohen et al.'s `--skip`).
    num_novel: templates held out as novel prompts by Modified-IRS's split.
  """

  class_names: tuple[str, ...] | None
  templates: tuple[str, ...]
  skip: int
  num_novel: int


# Skips: Cohen et al.'s, 500 images of each full test set; 20 of the toy
# world's 1,000. Novel prompts: the paper splits ImageNet's 80 templates 70
# known / 10 novel; for CIFAR-10 (its numbers were lost) this project holds out
# 3 of the 18, a share close to ImageNet's (1/6 against 1/8); the toy world
# (18 templates, the first ten CIFAR-10's) does as CIFAR-10.
SETTINGS = {
    "cifar10": DatasetSettings(clip_lists.CIFAR10_CLASSES,
                               clip_lists.CIFAR10_TEMPLATES,
                               skip=20, num_novel=3),
    "imagenet": DatasetSettings(clip_lists.IMAGENET_CLASSES,
                                clip_lists.IMAGENET_TEMPLATES,
                                skip=100, num_novel=10),
    "toy": DatasetSettings(None, TOY_TEMPLATES, skip=50, num_novel=3),
}

DEFAULT_SKIP = {name: s.skip for name, s in SETTINGS.items()}
NUM_NOVEL = {name: s.num_novel for name, s in SETTINGS.items()}
