"""The DualParal feature cache (docs/design.md §3): block b also sees the start of block b+1.

Within one iteration a rank runs its layers on the queued blocks newest first, so block b+1 runs just
before block b on the same rank. Each self-attention layer keeps the keys/values of the first `cat` frames
of block b+1 (the frames that follow block b's window in the video), rotated at the frame positions that
continue after block b's window, and block b attends to them besides its own. Nothing is recomputed or
sent between ranks: every rank caches for its own layers.

`FeatureCache` holds the flags every processor of one rank reads; `CachedSelfAttnProcessor` is Wan's
self-attention (text-to-video) with the cache; `FeatureCache.prepare` sets the flags for one work item.

Two transformers (Wan2.2 A14B): a block attends to block b+1's keys/values only when both ran on the same
expert; where they straddle the switch the block runs without the look-ahead for that one step (keys of one
expert's layer mean nothing to the other's; docs/dualparal.md). Slots: the CFG-parallel reference runs the
conditional and the unconditional branch one after the other in one process, each with its own stored keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

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
        self.slot = 0  # whose keys/values: the branch of the CFG-parallel reference, else always 0

    def prepare(self, item: WorkItem, enabled: bool = True, experts: Sequence[int] | None = None, slot: int = 0) -> None:
        """Flags for `item`'s forward. The newest block of an iteration has no block b+1 run before it to
        attend to, and the oldest has no block b-1 after it to store for; `enabled=False` is the ablation.
        `experts[s]` is the transformer of step s: block b+1 is one step behind b, block b-1 one ahead."""
        s = item.step
        same_as_newer = experts is None or s == 0 or experts[s - 1] == experts[s]
        same_as_older = experts is None or s + 1 >= len(experts) or experts[s + 1] == experts[s]
        self.use = enabled and not item.first_in_iteration and same_as_newer
        self.store = enabled and not item.last_in_iteration and same_as_older
        self.slot = slot


class CachedSelfAttnProcessor:
    """Wan self-attention (text-to-video, no image branch) with the DualParal feature cache.

    With both flags off it computes what diffusers' WanAttnProcessor computes."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> block b+1's context keys (rotated), values

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
            cached_key, cached_value = self.stored[cache.slot]
            key = torch.cat([key, cached_key], dim=1)
            value = torch.cat([value, cached_value], dim=1)
        if cache.store:
            self.stored[cache.slot] = stored_key, stored_value
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
