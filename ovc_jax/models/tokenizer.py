"""Text -> token ids `[B, context_length]` int32, as CLIP's `tokenize` makes them.

`ClipTokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the fast Rust
tokenizer that transformers uses): CLIP's byte-level BPE, or any tokenizer.json
such as the toy model's word-level one. It adds what CLIP's own
`tokenize(texts, truncate=True)` does around the BPE:

  - every row ends its text with the end-of-text (EOT) token, where the text
    tower pools; a sequence longer than the context is cut and its last token
    replaced by EOT, so the EOT token survives truncation;
  - rows are padded to the context length (with 0 for argmax pooling, as
    OpenAI does; with the tokenizer's pad token otherwise).

Sources: a directory with tokenizer.json (or vocab.json + merges.txt), or
OpenAI's `bpe_simple_vocab_16e6.txt.gz`, which the openai-clip and open_clip
packages ship.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from typing import Any, Sequence

import numpy as np

from ovc_jax.errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation regex (OpenAI's SimpleTokenizer, as transformers
# writes it into tokenizer.json).
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
               r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


class ClipTokenizer:
  """A callable `list[str] -> np.int32 [B, context_length]`.

  Attributes:
    backend: the `tokenizers.Tokenizer` (adds start/end tokens itself if its
      post-processor says so).
    context_length: row length.
    eos_token_id: the EOT id the text tower pools at; appended to a text whose
      encoding lacks it.
    pad_token_id: fill value after the EOT.
  """

  def __init__(self, backend: Any, *, context_length: int, eos_token_id: int,
               pad_token_id: int = 0, source: str = ""):
    self.backend = backend
    self.backend.no_padding()
    self.backend.no_truncation()
    self.context_length = int(context_length)
    self.eos_token_id = int(eos_token_id)
    self.pad_token_id = int(pad_token_id)
    self.source = source

  def __repr__(self) -> str:
    return (f"ClipTokenizer(source={self.source!r}, context_length="
            f"{self.context_length}, eos={self.eos_token_id}, "
            f"pad={self.pad_token_id})")

  def encode(self, text: str) -> list[int]:
    """One text's ids, with EOT kept within the context length."""
    ids = list(self.backend.encode(text).ids)
    if self.eos_token_id not in ids:
      ids.append(self.eos_token_id)
    if len(ids) > self.context_length:
      # As CLIP's tokenize(truncate=True): cut, then the last token is EOT.
      ids = ids[:self.context_length]
      ids[-1] = self.eos_token_id
    return ids

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """`[B, context_length]` int32 token ids of B texts."""
    if isinstance(texts, str):
      texts = [texts]
    if not all(isinstance(t, str) for t in texts):
      raise ConfigError("the tokenizer takes a list of strings")
    out = np.full((len(texts), self.context_length), self.pad_token_id, np.int32)
    for i, text in enumerate(texts):
      ids = self.encode(text)
      out[i, :len(ids)] = ids
    return out

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json and a tokenizer_config.json naming the EOT/pad tokens.

    The directory then loads with transformers' PreTrainedTokenizerFast and
    with `load_tokenizer`.
    """
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
           "model_max_length": self.context_length}
    eos = self.backend.id_to_token(self.eos_token_id)
    pad = self.backend.id_to_token(self.pad_token_id)
    if eos is not None:
      cfg["eos_token"] = eos
    if pad is not None:
      cfg["pad_token"] = pad
    if self.backend.token_to_id(SOT) is not None:
      cfg["bos_token"] = SOT
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(cfg, f, indent=2)


def has_tokenizer_files(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "tokenizer.json")) or (
      os.path.isfile(os.path.join(directory, "vocab.json"))
      and os.path.isfile(os.path.join(directory, "merges.txt")))


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def clip_bpe_backend(vocab: dict[str, int], merges: list[str]) -> Any:
  """CLIP's byte-level BPE pipeline (the one transformers' tokenizer.json holds)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  spec = {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": [
          {"id": vocab[SOT], "content": SOT, "single_word": False,
           "lstrip": False, "rstrip": False, "normalized": True, "special": True},
          {"id": vocab[EOT], "content": EOT, "single_word": False,
           "lstrip": False, "rstrip": False, "normalized": False, "special": True},
      ],
      "normalizer": {"type": "Sequence", "normalizers": [
          {"type": "NFC"},
          {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
          {"type": "Lowercase"}]},
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": _CLIP_SPLIT},
           "behavior": "Removed", "invert": True},
          {"type": "ByteLevel", "add_prefix_space": False,
           "trim_offsets": True}]},
      "post_processor": {"type": "RobertaProcessing", "sep": [EOT, vocab[EOT]],
                         "cls": [SOT, vocab[SOT]], "trim_offsets": False,
                         "add_prefix_space": False},
      "decoder": {"type": "BPEDecoder", "suffix": "</w>"},
      "model": {"type": "BPE", "dropout": None, "unk_token": EOT,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": False, "vocab": vocab, "merges": merges},
  }
  return Tokenizer.from_str(json.dumps(spec))


def backend_from_openai_bpe(path: str) -> Any:
  """The BPE of OpenAI's `bpe_simple_vocab_16e6.txt.gz` (as SimpleTokenizer builds it)."""
  try:
    with gzip.open(path) as f:
      lines = f.read().decode("utf-8").split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"cannot read CLIP BPE vocabulary {path}: {e}") from e
  merges = lines[1:49152 - 256 - 2 + 1]
  byte_chars = list(_bytes_to_unicode().values())
  tokens = byte_chars + [c + "</w>" for c in byte_chars]
  tokens += ["".join(m.split()) for m in merges] + [SOT, EOT]
  return clip_bpe_backend({t: i for i, t in enumerate(tokens)}, merges)


def _special_token(directory: str, name: str) -> str | None:
  """`name` ('eos_token', 'pad_token') from tokenizer_config / special_tokens_map."""
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, fname)
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        value = json.load(f).get(name)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot read {path}: {e}") from e
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      return value
  return None


def load_tokenizer(directory: str, *, context_length: int, eos_token_id: int,
                   pooling: str) -> ClipTokenizer:
  """A tokenizer from a directory with tokenizer.json or vocab.json + merges.txt.

  Args:
    directory: the tokenizer files' folder.
    context_length: the text tower's context length.
    eos_token_id: the id the text tower pools at (from the model config);
      with 'argmax' pooling the tokenizer's own end-of-text token, if it
      names one, takes precedence.
    pooling: the text tower's pooling, 'argmax' or 'eos' (decides the padding).

  Raises:
    CheckpointError: no tokenizer files, unreadable files, or a tokenizer whose
      end-of-text token disagrees with the model.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok_json = os.path.join(directory, "tokenizer.json")
  try:
    if os.path.isfile(tok_json):
      backend = Tokenizer.from_file(tok_json)
    elif has_tokenizer_files(directory):
      with open(os.path.join(directory, "vocab.json")) as f:
        vocab = json.load(f)
      with open(os.path.join(directory, "merges.txt")) as f:
        lines = f.read().split("\n")
      merges = [m for m in lines if m and not m.startswith("#version")]
      backend = clip_bpe_backend(vocab, merges)
    else:
      raise CheckpointError(
          f"no tokenizer in {directory}: expected tokenizer.json, or vocab.json "
          "and merges.txt")
  except CheckpointError:
    raise
  except Exception as e:  # tokenizers raises bare Exceptions for bad files.
    raise CheckpointError(f"cannot read the tokenizer in {directory}: {e}") from e

  eos_name = _special_token(directory, "eos_token")
  declared = backend.token_to_id(eos_name) if eos_name is not None else None
  if pooling == "eos":
    if declared is not None and declared != eos_token_id:
      raise CheckpointError(
          f"the tokenizer in {directory} ends texts with {eos_name!r} (id "
          f"{declared}) but the model pools at token id {eos_token_id}")
  elif declared is not None:
    # argmax pooling does not use the config's id: keep the tokenizer's EOT.
    eos_token_id = declared
  elif backend.token_to_id(EOT) is not None:
    eos_token_id = backend.token_to_id(EOT)
  pad = 0
  if pooling == "eos":
    pad_name = _special_token(directory, "pad_token")
    if pad_name is not None and backend.token_to_id(pad_name) is not None:
      pad = backend.token_to_id(pad_name)
  return ClipTokenizer(backend, context_length=context_length,
                       eos_token_id=eos_token_id, pad_token_id=pad,
                       source=directory)


def packaged_bpe_path() -> str | None:
  """OpenAI's BPE vocabulary shipped by the openai-clip or open_clip package.

  Found without importing the packages (openai-clip's __init__ imports
  torchvision).
  """
  for package in ("clip", "open_clip"):
    try:
      spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
      continue
    for location in (spec.submodule_search_locations or []) if spec else []:
      path = os.path.join(location, BPE_FILENAME)
      if os.path.isfile(path):
        return path
  return None
