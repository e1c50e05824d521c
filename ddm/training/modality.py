"""What the island trainer knows about one kind of data, behind one small interface.

The trainer (ddm/training/train.py) owns everything generic: accelerate, the data order, flow matching, label dropout
timing, EMA, checkpoints, logging. A `Modality` owns the rest. `--modality NAME` picks one from `MODALITIES`
("module:Class" entries, imported when needed); a new modality is a module with a `Modality` subclass plus one
line in that dict.

Contract (all tensors on the trainer's device unless said otherwise):
- `add_arguments(parser)` (classmethod): the modality's own flags. Every registered modality's flags are on
  the `ddm train` parser, so a flag name may not clash with another modality's or the trainer's.
- `__init__(manifest, args)`: load the manifest's data set (checked against its fingerprint) and validate any
  modality flags, raising `UsageError` before heavy work.
- `config(preset)`: a JSON-able dict that identifies the network and its input (checked on resume, copied
  into expert.json). Must not depend on anything random.
- `build(preset)`: the trainable network, ONE `nn.Module` whose `forward(x_t, timestep, cond)` returns the
  velocity with the shape of x_t (so DDP, EMA and the optimizer see one module). Its `denoiser` attribute is
  the diffusers model written at the top of the expert directory; any other trainable submodule (e.g. a
  prompt encoder) is saved by `save_extras`. Built from the global torch RNG, which the trainer seeds.
- `dataset(indices)`: a torch Dataset over those sample indices (of the manifest's data set); the default
  collate of its items is what `training_pair` receives. A data set with `returns_batches = True` returns a
  whole batch from `__getitems__` (the trainer then collates nothing); any other is taken to decode per item and
  gets loader worker processes by default on a GPU.
- `training_pair(batch, device, sample_normal)`: (x0, cond) for one micro-batch; `cond` is a tensor with batch
  first, or a tuple of such tensors (the text modality's caption states and mask). `sample_normal(shape)` gives this micro-batch's rows of a standard normal draw for the whole global batch
  (seeded by the step, the same whatever the process count): for any sampling the modality does (e.g. a latent
  drawn from its stored mean and std).
- `drop_condition(cond, drop)`: `cond` with the samples where the bool mask `drop` is True replaced by the
  null condition that classifier-free guidance uses. The trainer draws `drop` from its own seeded generator;
  the network must not drop conditions by itself.
- `save_extras(network, directory)`: write the trainable modules
  beyond `network.denoiser` in subfolders of an expert directory (the EMA view at the top, the raw one in raw/).
- `expert_meta()`: extra keys for expert.json that samplers need (e.g. num_classes, image size).
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ddm import UsageError

MODALITIES = {"image": "ddm.training.modality:ImageModality", "video": "ddm.training.video_modality:VideoModality",
              "text": "ddm.training.text_modality:TextModality"}


def get_modality(name: str) -> type["Modality"]:
    if name not in MODALITIES:
        raise UsageError(f"unknown modality {name!r}: choose from {', '.join(MODALITIES)}")
    module, cls = MODALITIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Modality:
    name: str

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Modality flags (all modalities' flags are on the `ddm train` parser; each reads its own)."""

    def __init__(self, manifest, args: argparse.Namespace):
        raise NotImplementedError

    def config(self, preset: str) -> dict:
        raise NotImplementedError

    def build(self, preset: str) -> nn.Module:
        raise NotImplementedError

    def dataset(self, indices: torch.Tensor) -> Dataset:
        raise NotImplementedError

    def training_pair(self, batch, device, sample_normal) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save_extras(self, network: nn.Module, directory: Path) -> None:
        """Default: no trainable module beyond the denoiser."""

    def expert_meta(self) -> dict:
        return {}


class ClassConditionedDiT(nn.Module):
    """A DiT with class labels as its condition; label `num_classes` is the CFG null label."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, timestep=timestep, class_labels=cond).sample


class TensorSubset(Dataset):
    """Items of an in-memory data set (images and labels as tensors): a batch is one tensor gather, no decoding."""

    returns_batches = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.images[j], self.labels[j]

    def __getitems__(self, positions: list[int]):
        j = self.indices[positions]
        return self.images[j], self.labels[j]


class ImageModality(Modality):
    """Class-conditional images (digits, an image folder, or a latent cache of one) with a diffusers
    DiTTransformer2DModel. On a latent cache the samples are latents drawn from the stored mean and std."""

    name = "image"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--patch-size", type=int, default=None,
                            help="DiT patch size (the sample size must divide by it; default: the preset's, e.g. DiT-B/4: 4, else 2)")

    def __init__(self, manifest, args):
        from ddm.models.experts import preset_patch_size

        self.data = manifest.load_dataset()
        self.image_size = self.data.image_size  # of the model's samples: the latent size on a latent cache
        self.channels = self.data.channels
        self.vae = getattr(self.data, "vae", None)
        self.patch_size = preset_patch_size(args.preset, args.patch_size)
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            if self.vae is not None:
                raise UsageError(
                    f"latent size {self.image_size} (image size {self.data.pixel_size} / VAE downsampling {self.vae['downsample']}) "
                    f"is not divisible by the patch size {self.patch_size}"
                )
            raise UsageError(f"image size {self.image_size} is not divisible by the patch size {self.patch_size}")
        # Unlabelled folders train with one class that is always the same: the model is then unconditional
        # apart from the null label, and CFG degenerates gracefully.
        self.num_classes = max(self.data.num_classes, 1)

    def config(self, preset):
        return {
            "preset": preset,
            "image_size": self.image_size,
            "channels": self.channels,
            "patch_size": self.patch_size,
            "num_classes": self.num_classes,
            **({"vae_hash": self.vae["hash"]} if self.vae is not None else {}),
        }

    def build(self, preset):
        from ddm.models.experts import build_dit

        dit = build_dit(preset, self.image_size, self.channels, self.num_classes, self.patch_size)
        for module in dit.modules():  # the trainer drops labels itself, from its own seeded generator
            if hasattr(module, "token_drop"):
                module.dropout_prob = 0.0
        return ClassConditionedDiT(dit)

    def dataset(self, indices):
        if hasattr(self.data, "subset"):
            return self.data.subset(indices)
        if hasattr(self.data, "images"):
            return TensorSubset(self.data.images, self.data.labels, indices)
        return torch.utils.data.Subset(self.data, indices.tolist())

    def training_pair(self, batch, device, sample_normal):
        if self.vae is not None:  # (mean, std, labels): a fresh draw from the encoder's distribution
            mean, std, labels = batch
            mean, std = mean.to(device, non_blocking=True).float(), std.to(device, non_blocking=True).float()
            x0 = mean + std * sample_normal(mean.shape[1:])
        else:
            x0, labels = batch[0].to(device, non_blocking=True), batch[1]
        labels = torch.as_tensor(labels).to(device, non_blocking=True).clamp_min(0)  # unlabelled (-1) -> class 0
        return x0, labels

    def drop_condition(self, cond, drop):
        return torch.where(drop, self.num_classes, cond)

    def expert_meta(self):
        meta = {"num_classes": self.num_classes, "image_size": self.image_size, "channels": self.channels}
        if self.vae is not None:  # samplers decode with it; the path is the one given to `ddm encode`
            meta.update(vae=self.vae, pixel_size=self.data.pixel_size)
        return meta
