"""Frozen text encoders from a local folder through transformers: CLIP text models and T5 encoders, with their tokenizers.

`TextEncoder(path).encode(prompts)` gives, for a fixed token length L:
  hidden  (B, L, D)  the last hidden states, what a text-conditional expert cross-attends to
  mask    (B, L)     1 for real tokens, 0 for padding (the expert's encoder_attention_mask)
  pooled  (B, P)     one vector per prompt, what the router is conditioned on: CLIP's projected EOS feature
                     (`text_embeds`; `pooler_output` for a CLIP text model without projection), a T5 encoder's
                     mean over its real tokens (T5 has no pooled output)
L is the encoder's own maximum (CLIP: 77) capped at 120 tokens (PixArt-α's T5 length), or `max_length`. A longer
prompt is truncated, with one warning per encoder. An encoder is identified by a hash of its config, tokenizer and
weights, recorded by every cache and expert made with it, so samples are never encoded by another one.

The folder holds the model (config.json + safetensors) and its tokenizer; for a diffusers pipeline layout
(`text_encoder_2/` beside `tokenizer_2/`) the tokenizer is read from the sibling folder. This module sits in
`ddm.data`, like the VAE, because `ddm encode` and `ddm partition --features text` need it below the models layer.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from ddm import UsageError
from ddm.io import recorded_folder

DEFAULT_MAX_TOKENS = 120
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "spiece.model", "special_tokens_map.json")
# The embedded encoder of the digit captions (built by ddm/data/digit_encoder.py, shipped; see docs/ddm.md).
DIGIT_ENCODER = Path(__file__).resolve().parents[1] / "assets" / "text_encoder_digits"


def tokenizer_dir(path: Path) -> Path:
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return path
    sibling = path.parent / path.name.replace("text_encoder", "tokenizer")
    if sibling != path and sibling.is_dir():
        return sibling
    raise UsageError(f"text encoder folder {path} has no tokenizer (tokenizer.json, vocab.json + merges.txt or spiece.model), "
                     f"nor a sibling {sibling.name}/")


def encoder_hash(path: Path, tokenizer_path: Path) -> str:
    """Hash of the model config, the tokenizer files and the bytes of every safetensors file."""
    h = hashlib.sha256()
    for f in [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(tokenizer_path.glob("*"))]:
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".txt", ".model")):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def load_encoder_model(path: Path):
    """(model, kind) of a local CLIP text or T5 encoder folder; safetensors only, never downloaded."""
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # a bar per load would break the one-line error contract of the commands

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read a text encoder config from {path}: {str(e).splitlines()[0]}") from None
    model_type = config.model_type
    if model_type in ("clip", "clip_text_model"):
        has_projection = "WithProjection" in "".join(config.architectures or []) or model_type == "clip"
        cls, kind = (CLIPTextModelWithProjection if has_projection else CLIPTextModel), "clip"
    elif model_type in ("t5", "umt5", "mt5"):
        cls, kind = T5EncoderModel, "t5"
    else:
        raise UsageError(f"text encoder {path} is a {model_type!r} model; use a CLIP text model or a T5 encoder")
    if not list(path.glob("*.safetensors")):
        raise UsageError(f"text encoder folder {path} has no .safetensors weights")
    try:
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the text encoder in {path}: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), kind


def encoder_length(tokenizer, config, max_length: int | None) -> int:
    """Token length L: the tokenizer's and position table's maximum, capped at DEFAULT_MAX_TOKENS or `max_length`."""
    limit = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 10**9)
    wanted = DEFAULT_MAX_TOKENS if max_length is None else max_length
    if wanted < 1:
        raise UsageError(f"--text-length must be >= 1, got {wanted}")
    return int(min(limit, wanted))


def pooled_features(output, mask: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "clip":
        pooled = getattr(output, "text_embeds", None)
        return pooled if pooled is not None else output.pooler_output
    weights = mask.to(output.last_hidden_state.dtype).unsqueeze(-1)
    return (output.last_hidden_state * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.inference_mode()
def encode_with(model, tokenizer, kind: str, prompts: list[str], max_length: int, warned: list | None = None):
    """(hidden, mask, pooled) of prompts with a loaded model and tokenizer (the pipeline calls this too)."""
    if warned is not None and not warned:
        lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        long = [p for p, n in zip(prompts, lengths) if n > max_length]
        if long:
            warned.append(True)
            print(f"warning: prompt {long[0][:60]!r} is longer than the text encoder's {max_length} tokens; "
                  "it is truncated (and so is any later prompt that long)", file=sys.stderr)
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    output = model(input_ids=ids, attention_mask=mask)
    return output.last_hidden_state.float(), mask.bool(), pooled_features(output, mask, kind).float()


class TextEncoder:
    """A local CLIP text model or T5 encoder with its tokenizer; see the module docstring."""

    def __init__(self, path: str | Path, max_length: int | None = None, device=None):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UsageError(f"text encoder folder not found or without config.json: {path}")
        tok_path = tokenizer_dir(self.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load the tokenizer in {tok_path}: {str(e).splitlines()[0]}") from None
        self.model, self.kind = load_encoder_model(self.path)
        if device is not None:
            self.model.to(device)
        self.max_length = encoder_length(self.tokenizer, self.model.config, max_length)
        self.hash = encoder_hash(self.path, tok_path)
        self.warned: list = []

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model if self.kind == "t5" else self.model.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        return int(getattr(self.model.config, "projection_dim", None) or self.hidden_size) if self.kind == "clip" else self.hidden_size

    def encode(self, prompts: list[str] | str):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return encode_with(self.model, self.tokenizer, self.kind, prompts, self.max_length, self.warned)

    def record(self) -> dict:
        """What caches, experts and routers record about their text encoder."""
        return {"path": str(self.path), "abspath": str(self.path.resolve()), "hash": self.hash, "kind": self.kind,
                "hidden_size": self.hidden_size, "pooled_size": self.pooled_size, "max_length": self.max_length}


def load_recorded_encoder(record: dict, device=None, path: str | Path | None = None) -> TextEncoder:
    """The encoder a record names (or `path`), refused if its hash or sizes are not the recorded ones."""
    if path is None:
        path = recorded_folder(record)
    encoder = TextEncoder(path, record["max_length"], device)
    if encoder.hidden_size != record["hidden_size"]:
        raise UsageError(f"text encoder {path} has hidden size {encoder.hidden_size}, the experts take {record['hidden_size']}")
    if encoder.hash != record["hash"]:
        raise UsageError(f"text encoder {path} has hash {encoder.hash}, but the experts were trained with encoder {record['hash']} ({record['path']})")
    return encoder


def word_tokenizer(vocabulary: list[str], max_length: int, bos: bool):
    """A word-level fast tokenizer (lower-cased, whitespace split) built offline: [PAD]=0, [UNK]=1, <s>=2, </s>=3."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(vocabulary) - set(specials)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def build_clip_encoder(out: str | Path, vocabulary: list[str], hidden_size: int = 32, layers: int = 2, heads: int = 2,
                       projection_dim: int = 32, max_length: int = 16, seed: int = 0) -> Path:
    """A small randomly initialised CLIPTextModelWithProjection + word tokenizer, saved as a transformers folder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = word_tokenizer(vocabulary, max_length, bos=True)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            projection_dim=projection_dim, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    return save_encoder(out, CLIPTextModelWithProjection(config), tokenizer)


def build_t5_encoder(out: str | Path, vocabulary: list[str], d_model: int = 32, layers: int = 2, heads: int = 2,
                     max_length: int = 16, seed: int = 0) -> Path:
    """A small randomly initialised T5EncoderModel + word tokenizer, saved as a transformers folder."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = word_tokenizer(vocabulary, max_length, bos=False)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=layers,
                      num_heads=heads, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return save_encoder(out, T5EncoderModel(config), tokenizer)


def save_encoder(out: str | Path, model, tokenizer) -> Path:
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
