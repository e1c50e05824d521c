"""What a Wan2.2 diffusers folder adds to Wan2.1's, read from JSON alone (loader.py uses it).

A14B (T2V): model_index.json names `transformer` (high noise) and `transformer_2` (low noise) and a
`boundary_ratio`; as in diffusers' WanPipeline, a step whose timestep t >= boundary_ratio * num_train_timesteps
runs `transformer`, a lower one `transformer_2`. Both have the same architecture, so one layer split serves both
and each rank holds its slice of each.
TI2V-5B: one transformer (48 channels) and a VAE with patch size 2, 48 latent channels and spatial factor 16;
its resolution is 704x1280. Text-to-video only: its `expand_timesteps` gives every token the step's timestep
when no image conditions the first frame, which is the scalar timestep our adapter uses.
"""
from __future__ import annotations

import json
from pathlib import Path

from ddm import UsageError

WAN21_SIZE = (480, 832)  # Wan2.1 T2V (and Wan2.2 A14B at 480p), pixels
TI2V_SIZE = (704, 1280)  # Wan2.2 TI2V-5B
TI2V_LATENT_CHANNELS = 48


def _names_component(entry) -> bool:
    """model_index.json lists an absent optional component as [null, null]."""
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def read_experts(path: Path, transformer_config: dict) -> float | None:
    """The boundary ratio of a two-transformer (A14B) folder, None for one transformer; UsageError for a folder
    whose model_index.json names transformer_2 that is missing, unlike `transformer`, or without a boundary."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {index_file}: {e}") from None
    if not _names_component(index.get("transformer_2")):
        return None
    config_file = path / "transformer_2" / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path}: model_index.json names transformer_2 but there is no {config_file.relative_to(path)}")
    ratio = index.get("boundary_ratio")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UsageError(f"{index_file}: transformer_2 needs a boundary_ratio between 0 and 1, got {ratio!r}")
    second = json.loads(config_file.read_text())
    for key in ("num_layers", "in_channels", "patch_size", "num_attention_heads", "attention_head_dim"):
        if second.get(key) != transformer_config.get(key):
            raise UsageError(f"{path}: transformer_2 has {key}={second.get(key)}, transformer has {transformer_config.get(key)}")
    return float(ratio)


def default_size(vae_config: dict | None) -> tuple[int, int]:
    """The model's own resolution: TI2V-5B's (its VAE has 48 latent channels), else Wan2.1's."""
    if vae_config is not None and vae_config.get("z_dim") == TI2V_LATENT_CHANNELS:
        return TI2V_SIZE
    return WAN21_SIZE


def boundary_timestep(ratio: float | None, scheduler_config: dict | None) -> float | None:
    """Where the experts switch, on the scheduler's timestep scale (as WanPipeline computes it)."""
    if ratio is None:
        return None
    return ratio * (scheduler_config or {}).get("num_train_timesteps", 1000)
