"""The text-to-image modality of the island trainer: captioned images (or latents) and a PixArt expert.

`ddm train --modality text` trains diffusers' PixArtTransformer2DModel (ddm/models/experts.py) on the captions'
sequence embeddings from a frozen text encoder (ddm/data/text_encoder.py): read from a latent cache encoded with
`ddm encode --text-encoder`, or computed once at start-up for the digits (the embedded encoder by default) and
image folders (`--text-encoder DIR`). The condition is (hidden states, padding mask); the trainer's label dropout
replaces a sample's with the empty caption's, the unconditional branch of classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ddm.models.experts import NO_EXTRA_CONDITIONS
from ddm.training.modality import ImageModality


class TextConditionedPixArt(nn.Module):
    def __init__(self, denoiser: nn.Module, text_length: int):
        super().__init__()
        self.denoiser = denoiser
        self.text_length = text_length

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        hidden, mask = cond
        return self.denoiser(x_t, encoder_hidden_states=hidden.to(x_t.dtype), timestep=timestep, encoder_attention_mask=mask,
                             added_cond_kwargs=NO_EXTRA_CONDITIONS).sample


class CaptionedSubset(Dataset):
    """The image modality's batches of some samples, with the samples' caption states and masks appended."""

    returns_batches = True

    def __init__(self, base: Dataset, indices: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor):
        self.base, self.indices, self.hidden, self.mask = base, indices, hidden, mask

    def __len__(self):
        return len(self.indices)

    def __getitems__(self, positions: list[int]):
        if getattr(self.base, "returns_batches", False):
            batch = self.base.__getitems__(positions)
        else:
            batch = default_collate([self.base[p] for p in positions])
        j = self.indices[positions]
        return (*batch, self.hidden[j], self.mask[j])


class TextModality(ImageModality):
    name = "text"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--text-encoder", default=None,
                            help="local CLIP text / T5 encoder folder for the captions (default: the latent cache's; the embedded one for digits)")
        parser.add_argument("--allow-empty-captions", action="store_true",
                            help="images of a folder without a caption get the empty caption instead of an error")

    def __init__(self, manifest, args):
        from ddm.data.text_embeddings import caption_table

        super().__init__(manifest, args)
        self.table = caption_table(self.data, args.text_encoder, args.allow_empty_captions)
        self.text = self.table.record
        self.num_classes = 0  # conditioned on captions only

    def config(self, preset):
        return {**super().config(preset), "text_encoder_hash": self.text["hash"], "text_length": self.text["max_length"],
                "caption_channels": self.text["hidden_size"], "captions_hash": self.text["captions_hash"]}

    def build(self, preset):
        from ddm.models.experts import build_text_expert

        expert = build_text_expert(preset, self.image_size, self.channels, self.text["hidden_size"], self.patch_size)
        return TextConditionedPixArt(expert, self.text["max_length"])

    def dataset(self, indices):
        return CaptionedSubset(super().dataset(indices), indices, self.table.hidden, self.table.mask)

    def training_pair(self, batch, device, sample_normal):
        x0, _ = super().training_pair(batch[:-2], device, sample_normal)
        hidden, mask = batch[-2:]
        return x0, (hidden.to(device, non_blocking=True).float(), mask.to(device, non_blocking=True))

    def drop_condition(self, cond, drop):
        hidden, mask = cond
        empty_hidden = self.table.empty_hidden.to(hidden.device, hidden.dtype)
        empty_mask = self.table.empty_mask.to(mask.device)
        return torch.where(drop.view(-1, 1, 1), empty_hidden, hidden), torch.where(drop.view(-1, 1), empty_mask, mask)

    def expert_meta(self):
        return {**super().expert_meta(), "conditioning": "text", "text_encoder": self.text}
