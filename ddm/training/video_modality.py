"""The video modality of the island trainer: prompted moving-digit clips, a pixel-space WanTransformer3DModel.

`ddm train --modality video` trains the transformer and the small prompt encoder (ddm/models/prompt_encoder.py)
jointly, through the same trainer as images (see ddm/training/modality.py for the contract). The condition is the
prompt's word ids (B, L); the trainer's label dropout blanks them to all padding, the empty prompt, which the
encoder maps to its learned null embedding: the unconditional branch of classifier-free guidance.

Expert directory: the Wan transformer at the top (EMA) and in raw/, the prompt encoder in prompt_encoder/
(and raw/prompt_encoder/); expert.json carries the clip shape and the vocabulary.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ddm import UsageError
from ddm.training.modality import Modality

PATCH_SIZE = (1, 2, 2)
PROMPT_LENGTH = 8  # words; the longest generated prompt ("7 and 1 moving right") has 5
# Pixel-space Wan sizes, kept small enough to train on a shared 2-core CPU. Parameters: tiny ~25k (tests),
# small ~0.15M (the first quick model), base ~0.3M (the shipped quick model, ddm/assets/video/quick).
VIDEO_PRESETS = {
    "tiny": dict(
        transformer=dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=48, freq_dim=32),
        text=dict(dim=16, num_layers=1, num_heads=2),
    ),
    "small": dict(
        transformer=dict(num_layers=3, num_attention_heads=3, attention_head_dim=16, ffn_dim=192, freq_dim=32),
        text=dict(dim=32, num_layers=1, num_heads=2),
    ),
    # Wan's rotary table gives each spatial axis 2 * (head_dim // 6) channels: at head_dim 16 that is two
    # frequencies, 1 and 0.01 rad per patch, so patches 6 apart look alike (6 rad ~ 2 pi). head_dim 32 adds
    # 0.16 rad per patch, which tells every place on a 16x16 canvas (8 patches) from every other.
    "base": dict(
        transformer=dict(num_layers=4, num_attention_heads=2, attention_head_dim=32, ffn_dim=256, freq_dim=32),
        text=dict(dim=32, num_layers=1, num_heads=2),
    ),
}


def check_preset(preset: str) -> dict:
    if preset not in VIDEO_PRESETS:
        raise UsageError(f"unknown video preset {preset!r}: choose from {', '.join(VIDEO_PRESETS)}")
    return VIDEO_PRESETS[preset]


def build_wan(preset: str, channels: int = 1):
    from diffusers import WanTransformer3DModel

    p = check_preset(preset)
    return WanTransformer3DModel(
        **p["transformer"], patch_size=PATCH_SIZE, in_channels=channels, out_channels=channels, text_dim=p["text"]["dim"]
    )


def build_prompt_encoder(preset: str, vocabulary: list[str]):
    from ddm.models.prompt_encoder import PromptEncoder

    return PromptEncoder(vocabulary=list(vocabulary), max_length=PROMPT_LENGTH, **check_preset(preset)["text"])


class PromptConditionedWan(nn.Module):
    """Wan transformer + prompt encoder as one trainable module: forward(x_t, timestep, word ids) -> velocity."""

    def __init__(self, denoiser: nn.Module, prompt_encoder: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.prompt_encoder = prompt_encoder

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        text = self.prompt_encoder(cond).to(x_t.dtype)
        return self.denoiser(x_t, timestep=timestep, encoder_hidden_states=text).sample


class PromptIds(Dataset):
    """Clips of some indices with their prompts as word ids, so the default collate gives tensors."""

    def __init__(self, data, indices: torch.Tensor, vocabulary: list[str]):
        self.data, self.indices, self.vocabulary = data, indices.tolist(), vocabulary

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from ddm.models.prompt_encoder import tokenize

        clip, prompt, labels, _ = self.data[self.indices[i]]
        return clip, tokenize([prompt], self.vocabulary, PROMPT_LENGTH)[0], labels


class VideoModality(Modality):
    name = "video"

    def __init__(self, manifest, args):
        from ddm.data.moving_digits import VOCABULARY, load_video_dataset

        self.data = load_video_dataset(manifest.data)
        manifest.check_data(self.data)
        self.frames, self.size, self.channels = self.data.frames, self.data.size, self.data.channels
        if self.size % PATCH_SIZE[1]:
            raise UsageError(f"canvas size {self.size} is not divisible by the patch size {PATCH_SIZE[1]}")
        self.vocabulary = list(VOCABULARY)
        check_preset(args.preset)

    def config(self, preset):
        return {
            "preset": preset,
            "data_spec": self.data.config.spec(),
            "frames": self.frames,
            "size": self.size,
            "channels": self.channels,
            "patch_size": list(PATCH_SIZE),
            "vocabulary": self.vocabulary,
            "prompt_length": PROMPT_LENGTH,
        }

    def build(self, preset):
        return PromptConditionedWan(build_wan(preset, self.channels), build_prompt_encoder(preset, self.vocabulary))

    def dataset(self, indices):
        return PromptIds(self.data, indices, self.vocabulary)

    def training_pair(self, batch, device, sample_normal):
        clips, ids = batch[0], batch[1]
        return clips.to(device, non_blocking=True), ids.to(device, non_blocking=True)

    def drop_condition(self, cond, drop):
        from ddm.models.prompt_encoder import PAD

        return cond.masked_fill(drop.view(-1, 1), PAD)

    def save_extras(self, network, directory):
        from ddm.io import replacing_dir

        # a sub-folder of the expert folder the trainer claimed; marked with its files' SHA-256
        with replacing_dir(Path(directory) / "prompt_encoder", "prompt-encoder", check_owner=False) as staging:
            network.prompt_encoder.save_pretrained(staging)

    def expert_meta(self):
        return {
            "channels": self.channels,
            "frames": self.frames,
            "size": self.size,
            "vocabulary": self.vocabulary,
            "prompt_encoder": "prompt_encoder",
        }
