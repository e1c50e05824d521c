"""The DualParal feature cache (docs/design.md §3): block b also sees the start of block b+1.

Within one iteration a rank runs its layers on the queued blocks newest first, so block b+1 runs just
before block b on the same rank. Each self-attention layer keeps the keys/values of the first `cat` frames
of block b+1 (the frames that follow block b's window in the video), rotated at the frame positions that
continue after block b's window, and block b attends to them besides its own. Nothing is recomputed or
sent between ranks: every rank caches for its own layers.

`FeatureCache` holds the flags every processor of one rank reads; `CachedSelfAttnProcessor` is Wan's
self-attention (text-to-video) with the cache; `FeatureCache.prepare` sets the flags for one work item.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

if TYPE_CHECKING:
    from parallel_infer.queue import WorkItem


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, as in diffusers' WanAttnProcessor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class FeatureCache:
    """What every cached self-attention processor on one rank reads before each block forward.

    `use`: attend to the keys/values stored by the previous forward (block b+1, same iteration).
    `store`: keep this forward's keys/values of `store_tokens` for the next forward (block b-1).
    """

    def __init__(self, store_tokens: slice, context_rotary: tuple[torch.Tensor, torch.Tensor]):
        self.store_tokens = store_tokens
        self.context_rotary = context_rotary
        self.use = False
        self.store = False

    def prepare(self, item: WorkItem, enabled: bool = True) -> None:
        """Flags for `item`'s forward. The newest block of an iteration has no block b+1 run before it to
        attend to, and the oldest has no block b-1 after it to store for; `enabled=False` is the ablation."""
        self.use = enabled and not item.first_in_iteration
        self.store = enabled and not item.last_in_iteration


class CachedSelfAttnProcessor:
    """Wan self-attention (text-to-video, no image branch) with the DualParal feature cache.

    With both flags off it computes what diffusers' WanAttnProcessor computes."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.key = self.value = None  # block b+1's context keys (already rotated) and values

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cache = self.cache
        if cache.store:  # clone: keep only `cat` frames alive, not the whole block's keys
            stored_key = apply_rotary(key[:, cache.store_tokens], *cache.context_rotary)
            stored_value = value[:, cache.store_tokens].clone()
        query = apply_rotary(query, *rotary_emb)
        key = apply_rotary(key, *rotary_emb)
        if cache.use:
            key = torch.cat([key, self.key], dim=1)
            value = torch.cat([value, self.value], dim=1)
        if cache.store:
            self.key, self.value = stored_key, stored_value
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
