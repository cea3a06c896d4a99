"""CLIP in Flax: configs, the model, checkpoint loading and export.

  loaded = load_clip("openai/clip-vit-base-patch32")   # or 'toy', a folder,
                                                       # 'openclip:RN50:FILE'
  z = jax.jit(loaded.model.embed_images)(loaded.params, images)   # [B, d]
  ids = loaded.tokenizer(["a photo of a cat."])                    # [1, 77]
  t = jax.jit(loaded.model.embed_texts)(loaded.params, ids)        # [1, d]
"""

from ovc_jax.models.clip import ClipModel
from ovc_jax.models.config import CLIPConfig
from ovc_jax.models.config import PRESETS
from ovc_jax.models.config import TextConfig
from ovc_jax.models.config import VisionConfig
from ovc_jax.models.config import named_config
from ovc_jax.models.export import save_hf_checkpoint
from ovc_jax.models.loading import LoadedClip
from ovc_jax.models.loading import load_clip
from ovc_jax.models.tokenizer import ClipTokenizer

__all__ = [
    "CLIPConfig", "ClipModel", "ClipTokenizer", "LoadedClip", "PRESETS",
    "TextConfig", "VisionConfig", "load_clip", "named_config",
    "save_hf_checkpoint",
]
