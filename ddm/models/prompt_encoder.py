"""A small learned prompt encoder for the demo vocabulary: no tokenizer, no download.

It stands where a UMT5 text encoder stands in a Wan pipeline: `encode(prompts) -> (B, L, D)` with a fixed L,
padding positions zeroed as Wan's pipeline does, so the transformer's `text_dim` is D. Words are whitespace
tokens of a fixed vocabulary kept in the config; the empty prompt "" maps to a learned null embedding, the
unconditional branch of classifier-free guidance (trained by prompt dropout). It lives in an expert's
`prompt_encoder/` subfolder (config.json + safetensors) and is trained jointly with the transformer.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ddm import UsageError

PAD = 0  # token id 0 pads; word ids start at 1


def tokenize(prompts: list[str], vocabulary: list[str], max_length: int) -> torch.Tensor:
    """(B, L) int64 word ids, 0-padded; raises UsageError for unknown words or prompts longer than L."""
    word_ids = {w: i + 1 for i, w in enumerate(vocabulary)}
    ids = torch.zeros(len(prompts), max_length, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        unknown = [w for w in words if w not in word_ids]
        if unknown:
            raise UsageError(
                f"prompt {prompt!r}: unknown word(s) {', '.join(map(repr, unknown))}; known words: {' '.join(vocabulary)}"
            )
        if len(words) > max_length:
            raise UsageError(f"prompt {prompt!r} has {len(words)} words; this encoder takes at most {max_length}")
        ids[row, : len(words)] = torch.tensor([word_ids[w] for w in words], dtype=torch.int64)
    return ids


class PromptEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, vocabulary: list[str], max_length: int = 8, dim: int = 32, num_layers: int = 1, num_heads: int = 2):
        super().__init__()
        if len(set(vocabulary)) != len(vocabulary) or "" in vocabulary:
            raise UsageError("prompt encoder vocabulary must be distinct non-empty words")
        self.token_embedding = nn.Embedding(len(vocabulary) + 1, dim, padding_idx=PAD)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.null_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False) if num_layers else None
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize(prompts, self.config.vocabulary, self.config.max_length)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D); a row of all padding is the empty prompt and gets the null embedding."""
        pad = input_ids == PAD
        x = self.token_embedding(input_ids) + self.position_embedding
        if self.layers is not None:
            # An all-padding row would make attention rows empty (NaN); its output is replaced below anyway.
            x = self.layers(x, src_key_padding_mask=pad & ~pad.all(1, keepdim=True))
        x = self.norm(x).masked_fill(pad.unsqueeze(-1), 0.0)
        empty = pad.all(1).view(-1, 1, 1)
        return torch.where(empty, self.null_embedding.to(x.dtype), x)

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> FloatTensor (B, L, D) on the encoder's device and dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self(self.tokenize(prompts).to(self.device))
