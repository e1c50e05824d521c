"""The model-specific part of DualParal for diffusers' `WanTransformer3DModel`: embed / blocks / head.

The layer pipeline sees a model only through this adapter, and reaches inside a block only through the
feature cache's self-attention processor (feature_cache.py), which the adapter installs on a rank's layers.
Another video DiT needs another adapter like this one and its own cached attention processor.

Wan2.2 A14B has two transformers of one architecture ("experts"): `transformer` for high noise and
`transformer_2` for low noise, switched where the timestep drops below `boundary_timestep` (as diffusers'
WanPipeline does). The adapter holds both; each step's conditioning names its expert, and embed, blocks and
head run that expert's weights. A rank may hold only its own layers of each (`keep_layers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel

from ddm import UsageError
from parallel_infer.feature_cache import CachedSelfAttnProcessor, FeatureCache


@dataclass
class StepConditioning:
    """Timestep conditioning of one sampling step (every rank computes it; it is never sent)."""

    temb: torch.Tensor  # [B, dim], for the head
    timestep_proj: torch.Tensor  # [B, 6, dim], for every block
    text: torch.Tensor  # [B, L, dim], the prompt through this step's expert's text embedder (shared by steps)
    expert: int = 0  # which transformer runs this step (Wan2.2 A14B: 0 high noise, 1 low noise)


class WanAdapter:
    """Embed, run and un-embed windows of `window` latent frames of size `height` x `width`.

    The model input of every forward has `window` = block + cat frames (docs/design.md §3), so the rotary
    tables are computed once; the cached context frames sit at positions window .. window + cat - 1.
    """

    def __init__(self, model: WanTransformer3DModel, window: int, cat: int, height: int, width: int,
                 model_2: WanTransformer3DModel | None = None, boundary_timestep: float | None = None):
        config = model.config
        if model_2 is not None and (model_2.config.num_layers, model_2.config.patch_size) != (config.num_layers, config.patch_size):
            raise UsageError("transformer_2 must have the layers and patch size of transformer (Wan2.2 A14B experts)")
        p_t, p_h, p_w = config.patch_size
        if config.image_dim is not None or config.added_kv_proj_dim is not None:
            raise UsageError("image-to-video Wan models are not supported: use a text-to-video transformer")
        if p_t != 1:
            raise UsageError(f"temporal patch size {p_t} is not supported: DualParal splits latent frames, need patch 1")
        if height % p_h or width % p_w:
            raise UsageError(f"latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}")
        if window + cat > config.rope_max_seq_len:
            raise UsageError(f"block + 2*cat = {window + cat} frames exceeds the model's rotary range {config.rope_max_seq_len}")
        self.model = model
        self.experts = [model] if model_2 is None else [model, model_2]
        self.boundary_timestep = boundary_timestep if model_2 is not None else None
        self.num_layers = len(model.blocks)
        self.channels = config.in_channels
        self.latent_size = (height, width)
        self.grid = (height // p_h, width // p_w)
        self.tokens_per_frame = self.grid[0] * self.grid[1]
        self.window = window
        self.dim = config.num_attention_heads * config.attention_head_dim
        self.rotary = self.rotary_table(window, offset=0)
        self.cache = FeatureCache(
            store_tokens=slice(cat * self.tokens_per_frame, 2 * cat * self.tokens_per_frame),
            context_rotary=self.rotary_table(cat, offset=window),
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def rotary_table(self, frames: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """WanRotaryPosEmbed for frames offset .. offset + frames - 1 (diffusers' always starts at 0)."""
        rope = self.model.rope
        (h, w), sizes = self.grid, [rope.t_dim, rope.h_dim, rope.w_dim]
        tables = []
        for freqs in (rope.freqs_cos, rope.freqs_sin):
            f, fh, fw = freqs.split(sizes, dim=1)
            parts = (
                f[offset : offset + frames].view(frames, 1, 1, -1).expand(frames, h, w, -1),
                fh[:h].view(1, h, 1, -1).expand(frames, h, w, -1),
                fw[:w].view(1, 1, w, -1).expand(frames, h, w, -1),
            )
            tables.append(torch.cat(parts, dim=-1).reshape(1, frames * h * w, 1, -1))
        return tables[0], tables[1]

    def install_feature_cache(self, layers: range) -> None:
        """Route the self-attention of `layers` (this rank's) through the cached processor, in every expert."""
        for model in self.experts:
            for i in layers:
                model.blocks[i].attn1.set_processor(CachedSelfAttnProcessor(self.cache))

    def expert_of(self, timestep: torch.Tensor) -> int:
        """0 (`transformer`) at or above the boundary, 1 (`transformer_2`) below it, as WanPipeline switches."""
        return int(self.boundary_timestep is not None and float(timestep) < self.boundary_timestep)

    def encode_text(self, prompt_embeds: torch.Tensor, expert: int = 0) -> torch.Tensor:
        """[B, L, text_dim] -> [B, L, dim], once per video and expert (shared by every step)."""
        return self.experts[expert].condition_embedder.text_embedder(prompt_embeds.to(self.device, self.dtype))

    def step_conditioning(self, timestep: torch.Tensor, batch: int, text: torch.Tensor, expert: int = 0) -> StepConditioning:
        """As WanTimeTextImageEmbedding does it, for one scalar timestep repeated over the batch."""
        emb = self.experts[expert].condition_embedder
        t = emb.timesteps_proj(timestep.reshape(1).expand(batch).to(self.device))
        time_dtype = next(iter(emb.time_embedder.parameters())).dtype
        if t.dtype != time_dtype and time_dtype != torch.int8:
            t = t.to(time_dtype)
        temb = emb.time_embedder(t).type_as(self.experts[expert].proj_out.weight)
        return StepConditioning(temb=temb, timestep_proj=emb.time_proj(emb.act_fn(temb)).unflatten(1, (6, -1)),
                                text=text, expert=expert)

    def embed(self, latents: torch.Tensor, batch: int, expert: int = 0) -> torch.Tensor:
        """[1, C, window, H, W] latents -> [batch, tokens, dim] (the same latents for cond and uncond)."""
        x = latents.to(self.device, self.dtype).expand(batch, -1, -1, -1, -1)  # as diffusers batches it
        return self.experts[expert].patch_embedding(x).flatten(2).transpose(1, 2).contiguous()

    def run_block(self, index: int, hidden: torch.Tensor, cond: StepConditioning) -> torch.Tensor:
        return self.experts[cond.expert].blocks[index](hidden, cond.text, cond.timestep_proj, self.rotary)

    def head(self, hidden: torch.Tensor, cond: StepConditioning, frames: int) -> torch.Tensor:
        """The prediction for the last `frames` frames of the window: [B, C, frames, H, W]."""
        model = self.experts[cond.expert]
        hidden = hidden[:, -frames * self.tokens_per_frame :]
        shift, scale = (model.scale_shift_table + cond.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = model.proj_out(hidden)
        (h, w), (_, p_h, p_w) = self.grid, model.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], frames, h, w, 1, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class DroppedBlock(torch.nn.Module):
    """Stands in for a layer another rank runs, so this rank never holds its weights."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer belongs to another rank of the layer pipeline")


def keep_layers(model: WanTransformer3DModel, layers: range) -> WanTransformer3DModel:
    """Drop every transformer layer outside `layers` (embeddings, conditioning and head stay: they are small)."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = DroppedBlock()
    return model
