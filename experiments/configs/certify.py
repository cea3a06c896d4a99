"""Configs of the certify experiment.

  python -m experiments.certify                       # embedded default: toy CLIP, toy split, OVC mode
  python -m experiments.certify --config=experiments/configs/certify.py:cifar10,vit_b32,paper --workdir=DIR
  python -m experiments.certify --config=experiments/configs/certify.py:single,standard --config.sigmas=0.5,

The argument after ':' is a comma-separated list of variants, applied in order:
  datasets   toy | cifar10 | imagenet
  backbones  toy | vit_b32 | vit_b16 | vit_l14 | rn50 | rn101 | openclip_vit_b32
  scale      quick (CI-sized) | paper (n = 100,000, Cohen's subsampling, four sigmas)
  sequential sequential CERTIFY of the known prompts (one pass until all stop),
             novel prompts from its draws (Cached-OVC extending them, MVN-OVC),
             beside fixed-n CERTIFY at n = 100,000 on the same keys
  mode       ovc (known then novel prompts, all four methods) | single (one prompt, one method)
  method     standard | cached | mvn (single mode; irs needs ovc mode's known prompts)
  noise      pixel (noise in native [0, 1] pixel space; default: normalised space)
  classifier clipure (CLIPure-Cos latent purification, certified beside plain CLIP
             with the same inputs and keys; --config.clipure.* sets its steps)
Any field can then be set with --config.FIELD=VALUE (`--help` lists them all).
"""

from ml_collections import config_dict

from ovc_jax.dataset_settings import DEFAULT_SKIP

# Hugging Face ids and OpenCLIP checkpoints of the real backbones. A hub id is
# downloaded only when named and online; OpenCLIP files must be placed locally
# (see checkpoints/README.md).
BACKBONES = {
    "toy": "toy",
    "vit_b32": "openai/clip-vit-base-patch32",
    "vit_b16": "openai/clip-vit-base-patch16",
    "vit_l14": "openai/clip-vit-large-patch14",
    "rn50": "openclip:RN50:checkpoints/downloads/RN50-openai/open_clip_model.safetensors",
    "rn101": "openclip:RN101:checkpoints/downloads/RN101-openai/open_clip_model.safetensors",
    "openclip_vit_b32": ("openclip:ViT-B-32:checkpoints/downloads/"
                         "ViT-B-32-laion2b_s34b_b79k/open_clip_model.safetensors"),
}

# What --help says about the variants (experiments.common.config_help).
VARIANTS = """datasets toy | cifar10 | imagenet;
backbones toy | vit_b32 | vit_b16 | vit_l14 | rn50 | rn101 | openclip_vit_b32;
scale quick (CI-sized) | paper (n = 100,000, Cohen's subsampling, four sigmas);
mode ovc (known then novel prompts, all four methods) | single (one prompt, one
method); method standard | cached | mvn (single mode; irs needs the known
prompts of ovc mode); noise pixel (noise in native [0, 1] pixel space; default:
normalised space); classifier clipure (CLIPure-Cos certified beside plain
CLIP); sequential (sequential CERTIFY until the answer is known, beside fixed-n
at n = 100,000)"""
EXAMPLE_VARIANTS = "cifar10,vit_b32,paper"

# Fields that do not change any result: a workdir may be resumed with other
# values of these (they are not compared with its config.json).
NON_RESULT_FIELDS = ("download", "verify_cache_samples")
# Recorded only with cached_ambiguous = "conservative", whose certificates
# depend on the cache format; "regenerate" gives standard RS's certificates
# whatever the format, so such a run may be resumed with another one.
CONSERVATIVE_ONLY_FIELDS = ("cache_format", "cached_ambiguous")


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # What is certified.
  c.dataset = "toy"
  c.data_dir = ""             # empty: the dataset's default location
  c.download = False          # cifar10: fetch the verified archive into data_dir first
  c.backbone = "toy"
  c.tokenizer = ""            # empty: the backbone's own tokenizer files
  c.dtype = "float32"         # or "bfloat16" (accelerators)
  c.noise_space = "normalized"  # or "pixel"
  c.classes = ""              # empty: the dataset's class names; or a file / comma list
  c.templates = ""            # empty: the dataset's templates; or a file / ';' list
  # Randomized smoothing.
  c.sigmas = (0.25,)
  c.n0 = 100
  c.n = 10_000
  c.alpha = 0.001
  c.batch_size = 1000
  c.skip = DEFAULT_SKIP["toy"]  # per dataset: ovc_jax/dataset_settings.py
  c.max = -1                  # Cohen's --max: stop at this dataset index (-1: none)
  c.seed = 0                  # noise keys: fold_in(key(seed), dataset index)
  # single: one prompt, one method; ovc: known then novel prompts, every method.
  c.mode = "ovc"
  c.method = "standard"       # single mode: standard | irs | cached | mvn
  c.prompt = "a photo of a {}."  # single mode
  c.num_novel = 3             # ovc mode: templates held out as novel prompts
  c.split_seed = 0            # ovc mode: seed of the known/novel split
  c.cache_dir = ""            # empty: WORKDIR/caches
  c.write_caches = True       # single standard runs leave caches for later prompts
  c.irs = config_dict.ConfigDict()
  c.irs.n_p = 2000            # probe draws (IRS: 10% of n at n = 100,000)
  c.irs.gamma = 0.01          # reuse a known certificate when zeta <= gamma
  c.irs.alpha_zeta = 0.001    # confidence parameter of zeta
  c.mvn = config_dict.ConfigDict()
  c.mvn.delta = 0.025         # margin; calibrated, see README "MVN-OVC's margin"
  c.mvn.batch_size = 10_000
  c.cached_batch_size = 10_000
  # How the embedding caches are stored: float32 (exact rows) | int16 | int8
  # (each row quantised with a bound on its error: 0.50x and 0.25x the bytes
  # at d = 512; docs/CACHES.md). And how Cached-OVC treats the samples of a
  # compressed cache whose class the bound leaves in doubt: regenerate
  # (recompute them with the encoder: certificates identical to standard RS)
  # | conservative (count them as misses: sound, no encoder pass).
  c.cache_format = "float32"
  c.cached_ambiguous = "regenerate"
  # Reading caches of an earlier run (single mode): regenerate this many of
  # their noise samples with the encoder and compare (0: skip the check).
  c.verify_cache_samples = 4
  # Base classifier: "" (plain zero-shot CLIP) or "clipure_cos" (CLIPure-Cos
  # latent purification, certified beside plain CLIP on the same inputs and
  # keys; its TSVs and caches go under tsv/clipure_cos/ and caches/clipure_cos/).
  c.purify = ""
  c.clipure = config_dict.ConfigDict()
  c.clipure.steps = 10        # the official defaults
  c.clipure.step_size = 30.0
  c.clipure.blank = "templates"  # the dataset's templates, blank; or "single": "a photo of a ."
  # Sequential mode (variant `sequential`): anytime-valid CERTIFY that stops
  # once the answer is known (docs/SEQUENTIAL.md).
  c.sequential = config_dict.ConfigDict()
  c.sequential.max_radius_sigmas = 2.0  # stop once the radius reaches this x sigma
  c.sequential.n_max = 100_000        # the most estimation draws
  c.sequential.first_block = 500      # the first checkpoint (a multiple of batch_size wastes nothing)
  c.sequential.growth = 1.5           # geometric checkpoints: 500, 1000, 1500, 2500, 4000, ...
  c.sequential.schedule = ()          # or explicit checkpoints, strictly increasing, ending at n_max
  c.sequential.alpha_split = "uniform"  # or "basel"
  c.sequential.precision_sigmas = 0.12  # stop once more draws add <= this x sigma of radius; 0: off
  c.sequential.compare_fixed = True   # also fixed-n CERTIFY at n = --config.n on the same keys
  # Other rules replayed exactly on the fixed-n pass's draws (no encoder pass;
  # needs compare_fixed and n >= n_max): these precisions (x sigma, 0: off) on
  # the schedule above, and "old": first block 1000, growth 2, no precision.
  c.sequential.replay_precision_sigmas = ()

  for variant in filter(None, (arg or "").split(",")):
    _apply(c, variant.strip())
  return c


def _apply(c: config_dict.ConfigDict, variant: str) -> None:
  if variant in DEFAULT_SKIP:
    c.dataset = variant
    c.skip = DEFAULT_SKIP[variant]
  elif variant in BACKBONES:
    c.backbone = BACKBONES[variant]
  elif variant == "quick":
    c.sigmas = (0.25,)
    c.n0, c.n, c.irs.n_p = 50, 1000, 500
    c.skip = 200
  elif variant == "paper":
    c.sigmas = (0.12, 0.25, 0.5, 1.0)
    c.n0, c.n, c.irs.n_p = 100, 100_000, 10_000
  elif variant in ("ovc", "single"):
    c.mode = variant
  elif variant == "sequential":
    c.mode = "sequential"
    c.n = c.sequential.n_max = 100_000  # fixed-n beside it at the same n
    c.batch_size = 500                  # checkpoints are multiples of it
    c.sequential.replay_precision_sigmas = (0.0, 0.04, 0.08, 0.16, 0.24)
  elif variant in ("standard", "irs", "cached", "mvn"):
    c.mode = "single"
    c.method = variant
  elif variant == "pixel":
    c.noise_space = "pixel"
  elif variant == "clipure":
    c.purify = "clipure_cos"
  else:
    # SystemExit, not ValueError: ml_collections would print a traceback.
    raise SystemExit(f"error: unknown certify config variant {variant!r}; "
                     "the variants are: " + " ".join(VARIANTS.split()))
