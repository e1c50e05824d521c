"""The caption embeddings of a data set: one row per sample, plus the empty caption's row (the CFG null condition).

A latent cache encoded with `ddm encode --text-encoder` holds them on disk (text-NNNNN.safetensors beside each
latent shard, text-empty.safetensors); any other captioned data set (the digits, an image folder) is encoded in
memory when a command needs it, with the encoder given (the digits default to the embedded one).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ddm import UsageError

EMPTY = "text-empty.safetensors"


def text_shard_name(i: int) -> str:
    return f"text-{i:05d}.safetensors"


def captions_hash(captions: list[str]) -> str:
    return hashlib.sha256("\0".join(captions).encode()).hexdigest()[:16]


@dataclass
class TextTable:
    hidden: torch.Tensor  # (N, L, D) storage dtype
    mask: torch.Tensor  # (N, L) bool
    pooled: torch.Tensor  # (N, P) float32
    empty_hidden: torch.Tensor  # (1, L, D)
    empty_mask: torch.Tensor  # (1, L)
    empty_pooled: torch.Tensor  # (1, P)
    record: dict  # the encoder's record (ddm.data.text_encoder.TextEncoder.record) + "captions_hash"

    def __len__(self):
        return len(self.pooled)


def encode_captions(encoder, captions: list[str], batch_size: int = 256, dtype=torch.float16) -> tuple[torch.Tensor, ...]:
    """(hidden, mask, pooled) of all captions, batch by batch."""
    parts = [encoder.encode(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
    hidden, mask, pooled = (torch.cat(t) for t in zip(*parts))
    return hidden.to(dtype).cpu(), mask.cpu(), pooled.cpu()


def dataset_captions(dataset, allow_empty: bool = False) -> list[str]:
    if not hasattr(dataset, "captions"):
        raise UsageError(f"{getattr(dataset, 'name', 'this data set')} has no captions (use the digits, a captioned image "
                         "folder or a latent cache encoded with --text-encoder)")
    return dataset.captions(allow_empty)


def caption_table(dataset, text_encoder=None, allow_empty: bool = False) -> TextTable:
    """The caption embeddings of `dataset`: read from its latent cache, else encoded now with `text_encoder` (a
    folder; the digits default to the embedded encoder). A folder that disagrees with the cache's is refused."""
    from ddm.data.text_encoder import DIGIT_ENCODER, TextEncoder

    if hasattr(dataset, "text_table"):
        table = dataset.text_table()
        if text_encoder is not None and TextEncoder(text_encoder).hash != table.record["hash"]:
            raise UsageError(f"--text-encoder {text_encoder} is not the encoder the cache {dataset.root} was encoded with "
                             f"({table.record['path']}, {table.record['hash']})")
        return table
    if text_encoder is None:
        if getattr(dataset, "name", None) != "digits":
            raise UsageError(f"{getattr(dataset, 'name', 'this data set')}: give --text-encoder (a local CLIP or T5 folder) "
                             "to embed its captions")
        text_encoder = DIGIT_ENCODER
    captions = dataset_captions(dataset, allow_empty)
    encoder = TextEncoder(text_encoder)
    hidden, mask, pooled = encode_captions(encoder, captions)
    empty = encode_captions(encoder, [""])
    return TextTable(hidden, mask, pooled, *empty, {**encoder.record(), "captions_hash": captions_hash(captions)})
