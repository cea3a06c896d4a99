"""Configs of the Fourier heat map experiment (Yin et al. 2019's map of errors).

  python -m experiments.fourier_heatmap                          # embedded default: toy CLIP, toy test split, zero-shot
  python -m experiments.fourier_heatmap --config=experiments/configs/fourier_heatmap.py:smoothed
  python -m experiments.fourier_heatmap --config=experiments/configs/fourier_heatmap.py:cifar10,vit_b32,clipure --workdir=DIR

The argument after ':' is a comma-separated list of variants, applied in order:
  datasets    toy | cifar10 | imagenet (sets v: 4.0 for 32x32 images, 15.7
              for ImageNet's 224x224, Yin et al.'s norms)
  backbones   toy | vit_b32 | vit_b16 | vit_l14 | rn50 | rn101 | openclip_vit_b32
              (as experiments/configs/certify.py; real weights run unchanged
              once present, see checkpoints/README.md)
  classifier  zeroshot | clipure (CLIPure-Cos) | smoothed (Cohen's PREDICT)
  blank       single_blank (CLIPure's blank is "a photo of a ."; default: the
              mean over the dataset's templates)
  scale       quick (CI-sized: 20 images, |frequency| <= 2)
Any field can then be set with --config.FIELD=VALUE.

Perturbations are added in [0, 1] pixel space before CLIP's preprocessing;
the smoothed classifier's sigma is in that space too.

Budget on the embedded default (toy CLIP, toy test split, 32x32 images: 496
frequencies, a 31 x 31 map). Wall times measured on the 2 CPU cores while
they were shared (load average 5-7):
  zeroshot  1000 images per frequency (the whole toy test split)   85 s
  clipure   1000 images per frequency (10 purification steps)      71 s
  smoothed    80 images per frequency, PREDICT with n = 32 draws  341 s
together 8.3 minutes, under the 15-minute budget. (The smoothed map's cost
is n x images forward passes plus the keyed noise of the sampler.)
num_images = -1 picks these per-classifier defaults (DEFAULT_NUM_IMAGES);
the real-weight variants use them too (on ImageNet: 2016 frequencies, the
63 x 63 crop).
"""

from ml_collections import config_dict

from experiments.configs.certify import BACKBONES

CLASSIFIERS = ("zeroshot", "clipure", "smoothed")
# Images per frequency when num_images = -1.
DEFAULT_NUM_IMAGES = {"zeroshot": 1000, "clipure": 1000, "smoothed": 80}
# Images per compiled chunk when batch_size = -1 (smoothed: each image brings
# min(n, smoothing.batch_size) noise draws into the chunk).
DEFAULT_BATCH_SIZE = {"zeroshot": 500, "clipure": 500, "smoothed": 40}
# Yin et al.'s perturbation norms.
DATASET_V = {"toy": 4.0, "cifar10": 4.0, "imagenet": 15.7}

# What --help says about the variants (experiments.common.config_help).
VARIANTS = (
    f"datasets {' | '.join(DATASET_V)} (set v: 4.0 for 32x32 images, 15.7 "
    f"for ImageNet); backbones {' | '.join(BACKBONES)}; classifier "
    f"zeroshot | clipure (CLIPure-Cos) | smoothed (Cohen's PREDICT); blank "
    f"single_blank (CLIPure's blank is \"a photo of a .\"; default: the mean "
    f"over the dataset's templates); scale quick (CI-sized: 20 images, "
    f"|frequency| <= 2)")
EXAMPLE_VARIANTS = "cifar10,vit_b32,clipure"


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # What is mapped.
  c.dataset = "toy"
  c.data_dir = ""             # empty: the dataset's default location
  c.backbone = "toy"
  c.tokenizer = ""            # empty: the backbone's own tokenizer files
  c.dtype = "float32"
  c.classes = ""              # empty: the dataset's class names; or a file / comma list
  c.prompt = "a photo of a {}."  # the zero-shot prompt (one class matrix)
  c.classifier = "zeroshot"   # zeroshot | clipure | smoothed
  # The perturbation X + r v U_kl (r = +-1 per image and channel), clipped.
  c.v = DATASET_V["toy"]
  c.max_frequency = -1        # K, the map is (2K+1)^2; -1: min(31, (side-1)//2)
  c.num_images = -1           # per frequency, evenly spaced over the split; -1: DEFAULT_NUM_IMAGES
  c.batch_size = -1           # images per compiled chunk; -1: DEFAULT_BATCH_SIZE
  c.seed = 0                  # signs and noise: fold_in(key(seed), frequency, image)
  # The smoothed classifier: Cohen et al.'s PREDICT per perturbed image.
  c.smoothing = config_dict.ConfigDict()
  c.smoothing.sigma = 0.12    # in [0, 1] pixel space
  c.smoothing.n = 32          # noise draws per PREDICT
  c.smoothing.alpha = 0.001   # PREDICT's test level (abstains above it)
  c.smoothing.batch_size = 32  # noise draws evaluated at once per image
  # CLIPure-Cos (the official defaults).
  c.clipure = config_dict.ConfigDict()
  c.clipure.steps = 10
  c.clipure.step_size = 30.0
  c.clipure.blank = "templates"  # "templates": mean over blank_templates; "single": "a photo of a ."
  c.blank_templates = ""      # empty: the dataset's templates; or a file / ';' list

  for variant in filter(None, (arg or "").split(",")):
    _apply(c, variant.strip())
  return c


def _apply(c: config_dict.ConfigDict, variant: str) -> None:
  if variant in DATASET_V:
    c.dataset = variant
    c.v = DATASET_V[variant]
  elif variant in BACKBONES:
    c.backbone = BACKBONES[variant]
  elif variant in CLASSIFIERS:
    c.classifier = variant
  elif variant == "single_blank":
    c.clipure.blank = "single"
  elif variant == "quick":
    c.num_images, c.max_frequency = 20, 2
  else:
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown fourier_heatmap config variant "
                     f"{variant!r}; see experiments/configs/fourier_heatmap.py")
