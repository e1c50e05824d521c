"""The autoencoder behind a latent data set: a diffusers `AutoencoderKL` (SD, SDXL, FLUX VAEs) from a local folder.

Model-space latents are z = (x - shift_factor) * scaling_factor, x the VAE's own latent, with both factors read from
the VAE's config (SD and SDXL have no shift). A VAE is identified by a hash of its config and weights: two folders
with the same config but other weights (e.g. SD's ft-EMA and ft-MSE VAEs) are different VAEs.

This module sits in `ddm.data` because the latent cache needs it to encode and to record which VAE made it; the
router, evaluation and the app import it from here to decode.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ddm import UsageError
from ddm.io import recorded_folder


def check_vae_dir(path: str | Path) -> Path:
    """The folder, if it holds a config.json and safetensors weights; a one-line UsageError otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"VAE folder not found: {path}")
    if not (folder / "config.json").is_file():
        raise UsageError(f"VAE folder {path} has no config.json")
    if not weight_files(folder):
        raise UsageError(f"VAE folder {path} has no .safetensors weights")
    return folder


def weight_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.safetensors") if f.is_file())


def vae_hash(path: str | Path) -> str:
    """Hash of the config (keys starting with '_' other than '_class_name' left out: they name a version or a
    path, not the model) and the bytes of every weights file."""
    folder = check_vae_dir(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"VAE folder {path}: config.json is not JSON ({e})") from None
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for f in weight_files(folder):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_vae(path: str | Path, device=None, expected_hash: str | None = None):
    """The AutoencoderKL in eval mode (float32), its hash checked against `expected_hash` when given."""
    from diffusers import AutoencoderKL

    folder = check_vae_dir(path)
    digest = vae_hash(folder)
    if expected_hash is not None and digest != expected_hash:
        raise UsageError(f"VAE {path} has hash {digest}, but the latents were made by VAE {expected_hash}")
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load an AutoencoderKL from {path}: {str(e).splitlines()[0]}") from None
    vae.hash = digest
    return vae.to(device).eval().requires_grad_(False)


def downsample_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def factors(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config; a missing shift is 0."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


def vae_record(path: str | Path, vae) -> dict:
    """What a latent cache and an expert record about their VAE."""
    scaling, shift = factors(vae)
    return {
        "path": str(path),
        "abspath": str(Path(path).resolve()),
        "hash": vae.hash,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "latent_channels": int(vae.config.latent_channels),
        "downsample": downsample_factor(vae),
    }


def load_recorded_vae(record: dict, device=None):
    """The VAE a record names (its path as given, else its absolute path), refused if its hash changed."""
    return load_vae(recorded_folder(record), device, expected_hash=record["hash"])


@torch.inference_mode()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the model-space latent distribution of images in [-1, 1]."""
    scaling, shift = factors(vae)
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return (dist.mean.float() - shift) * scaling, dist.std.float() * scaling


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from model-space latents."""
    scaling, shift = factors(vae)
    return vae.decode(latents.to(vae.device, vae.dtype) / scaling + shift).sample.float()


def describe_vae(record: dict | None) -> str:
    return f"VAE {record['path']} ({record['hash']})" if record else "no VAE (pixel space)"


def check_same_vae(first: dict | None, first_name: str, second: dict | None, second_name: str) -> None:
    """Refuse to mix samples of two latent spaces (or latents with pixels), naming both sides' VAEs."""
    if (first or {}).get("hash") != (second or {}).get("hash"):
        raise UsageError(f"VAE mismatch: {first_name}: {describe_vae(first)}; {second_name}: {describe_vae(second)}")


def expert_vae(meta: dict, device=None):
    """The VAE an expert.json names, loaded and checked, or None for a pixel-space expert."""
    return load_recorded_vae(meta["vae"], device) if meta.get("vae") else None
