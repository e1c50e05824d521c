"""Data sets: the embedded 8x8 digits, image folders, latent caches of image folders, and generated moving-digit
clips; the seeded stream sampler."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ddm import UsageError
from ddm.data.images import DigitsDataset, ImageFolderDataset
from ddm.data.latents import LatentDataset, is_latent_dir
from ddm.data.moving_digits import load_video_dataset


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """`digits` for the embedded set, a latent directory (`ddm encode`), otherwise a path to an image folder
    (needs `image_size`)."""
    if spec == "digits":
        return DigitsDataset()
    if spec.partition(":")[0] == "moving-digits":  # the generated video clips (ddm/data/moving_digits.py)
        return load_video_dataset(spec)
    if not Path(spec).exists():
        raise UsageError(f"data path not found: {spec} (use 'digits', a latent directory or an image folder)")
    if is_latent_dir(spec):
        return LatentDataset(spec)
    if image_size is None:
        raise UsageError(f"--image-size is required for an image folder: {spec}")
    return ImageFolderDataset(spec, image_size)
