"""The router r(x_t, t[, class | pooled text]) -> K logits: a narrow DiT-style encoder with a pooled head.

It predicts which island a noisy sample came from, p(k | x_t), on the experts' own noise path
(docs/design.md §2). `logit_correction` = log(pi_k / pi_k^train) is added to the logits when router
training rebalanced the clusters, so the softmax is the posterior under the true cluster prior.
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddm import UsageError


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the timestep (1000 sigma), as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RouterModel(ModelMixin, ConfigMixin):
    """Patchify -> [CLS | patches] + (timestep [+ class] embedding) -> pre-norm transformer layers -> CLS -> K logits.

    With `num_classes` set, class label `num_classes` means "no class" (the CFG null label), as for experts. With
    `text_dim` set it is conditioned on the prompt's pooled text embedding (p(k | x_t, t, text)); `text_encoder_hash`
    names the encoder that made it.
    `flow`, `manifest_fingerprint` and `vae_hash` (latent-space data) record what the router was trained for; the
    ensemble checks them.
    """

    @register_to_config
    def __init__(
        self,
        num_experts: int,
        sample_size: int,
        in_channels: int,
        patch_size: int = 2,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        num_classes: int | None = None,
        logit_correction: list[float] | None = None,
        flow: dict | None = None,
        manifest_fingerprint: str | None = None,
        vae_hash: str | None = None,
        text_dim: int | None = None,
        text_encoder_hash: str | None = None,
    ):
        super().__init__()
        num_patches = (sample_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))  # the pooled read-out attends to every patch
        self.time_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.class_embed = nn.Embedding(num_classes + 1, hidden_dim) if num_classes else None
        self.text_embed = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)) if text_dim else None
        layer = nn.TransformerEncoderLayer(
            hidden_dim, num_heads, 4 * hidden_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, num_experts)
        correction = torch.tensor(logit_correction or [0.0] * num_experts, dtype=torch.float32)
        self.register_buffer("prior_correction", correction, persistent=False)  # lives in config.json
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                pooled_text: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2) + self.pos_embed
        cond = self.time_embed(timestep_embedding(timestep, x.shape[-1]).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full_like(timestep, self.config.num_classes, dtype=torch.long)
            cond = cond + self.class_embed(class_labels)
        if self.text_embed is not None:
            if pooled_text is None:
                raise UsageError("this router is conditioned on text: pass the prompts' pooled embeddings (pooled_projections)")
            cond = cond + self.text_embed(pooled_text.to(x.dtype))
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + cond[:, None]
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0])) + self.prior_correction


def measured_flops(model: nn.Module, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of one forward call, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.train()  # eval mode may take fused kernels the counter cannot see; nothing here is stochastic
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    model.train(was_training)
    return counter.get_total_flops()
