"""Expert models and the expert directory format.

An expert directory is what one island writes (and nothing else writes there):
  config.json + diffusion_pytorch_model.safetensors   EMA weights: `from_pretrained(dir)` gives the sampling model
  raw/config.json + raw/diffusion_pytorch_model.safetensors   the raw (non-EMA) weights
  expert.json        what the router and samplers need: model class, island, manifest and data fingerprints,
                     flow (noise path) config, number of classes (0 for text experts), label dropout, the
                     conditioning ("class" or "text") and a text expert's text encoder record; `files`: the SHA-256 of
                     each file above, checked on every load
The training state (optimizer, step, RNG, data position) and logs live beside these; see ddm/training/train.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, WanTransformer3DModel

from ddm import UsageError

EXPERT_FORMAT = "ddm-expert/1"
# expert.json keys the loaders read, with their types (a hand-edited file gets a one-line error, not a traceback)
META_TYPES = {"model_class": str, "k": int, "num_classes": int, "flow": dict, "files": dict}
MODEL_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "WanTransformer3DModel": WanTransformer3DModel,
                 "PixArtTransformer2DModel": PixArtTransformer2DModel}

# DiT sizes. Parameter counts at 8x8x1 input, patch 2: tiny ~0.1M, small ~1.9M. The DiT paper's sizes (S, B, L, XL:
# layers x width 12x384, 12x768, 24x1024, 28x1152, 64-dim heads except XL's 72) come with their patch size in the name.
DIT_PRESETS = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16),
    "small": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32),
    "base": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
}
DIT_PAPER_SIZES = {
    "S": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "L": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),
    "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
}
DIT_PRESETS.update({f"DiT-{size}/{patch}": dict(dims, patch_size=patch) for size, dims in DIT_PAPER_SIZES.items() for patch in (2, 4, 8)})


def preset_patch_size(preset: str, patch_size: int | None) -> int:
    """The preset's own patch size (DiT-XL/2: 2), else `patch_size`, else 2; a contradiction is refused."""
    if preset not in DIT_PRESETS:
        raise UsageError(f"unknown model preset {preset!r}: choose from {', '.join(DIT_PRESETS)}")
    own = DIT_PRESETS[preset].get("patch_size")
    if own is not None and patch_size is not None and patch_size != own:
        raise UsageError(f"--patch-size {patch_size} contradicts the preset {preset} (patch size {own})")
    return own or patch_size or 2


def preset_dims(preset: str, sample_size: int, patch_size: int | None) -> tuple[dict, int]:
    """(layers/heads/head size of the preset, patch size), checked against the image size."""
    patch_size = preset_patch_size(preset, patch_size)
    if patch_size <= 0 or sample_size % patch_size:
        raise UsageError(f"image size {sample_size} is not divisible by the patch size {patch_size}")
    return {k: v for k, v in DIT_PRESETS[preset].items() if k != "patch_size"}, patch_size


def build_dit(preset: str, sample_size: int, in_channels: int, num_classes: int, patch_size: int | None = None) -> DiTTransformer2DModel:
    """A class-conditional DiT. Label `num_classes` is the "no class" label used for classifier-free guidance."""
    if num_classes < 1:
        raise UsageError(f"a class-conditional expert needs at least one class, got {num_classes}")
    dims, patch_size = preset_dims(preset, sample_size, patch_size)
    return DiTTransformer2DModel(
        **dims,
        in_channels=in_channels,
        out_channels=in_channels,  # plain velocity prediction, no learned variance
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )


# PixArt's timestep embedding also takes resolution and aspect ratio; text experts are built without them.
NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def build_text_expert(preset: str, sample_size: int, in_channels: int, caption_channels: int, patch_size: int | None = None) -> PixArtTransformer2DModel:
    """A text-conditional expert: diffusers' PixArtTransformer2DModel (cross-attention to the caption's hidden states,
    with its padding mask; adaLN-single timestep modulation), sized by the DiT presets: `DiT-XL/2` is PixArt-α's
    XL/2 (28 layers x 1152, 611M parameters with T5 captions). Why PixArt: docs/ddm.md."""
    dims, patch_size = preset_dims(preset, sample_size, patch_size)
    return PixArtTransformer2DModel(
        **dims,
        in_channels=in_channels,
        out_channels=in_channels,  # plain velocity prediction, no learned variance
        sample_size=sample_size,
        patch_size=patch_size,
        caption_channels=caption_channels,
        cross_attention_dim=dims["num_attention_heads"] * dims["attention_head_dim"],
        use_additional_conditions=False,  # no resolution / aspect-ratio embedding: one fixed size
    )


def dummy_condition(model, batch: int, device=None, text_length: int = 16) -> dict:
    """Keyword arguments of a placeholder condition for `model`'s forward (FLOP counts, benchmarks)."""
    if isinstance(model, PixArtTransformer2DModel):
        return {"encoder_hidden_states": torch.zeros(batch, text_length, model.config.caption_channels, device=device),
                "encoder_attention_mask": torch.ones(batch, text_length, device=device),
                "added_cond_kwargs": NO_EXTRA_CONDITIONS}
    return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}


def forward_flops(model: DiTTransformer2DModel, sample_shape: tuple[int, ...], text_length: int = 16) -> int:
    """FLOPs (2 per multiply-add; the DiT paper's "Gflops" count multiply-adds, half of this) of one sample's
    forward, counted by torch's FlopCounterMode on a meta-device twin, so no memory or time goes to real weights."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = type(model).from_config(model.config)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.zeros(1, *sample_shape, device="meta"), timestep=torch.zeros(1, device="meta"),
             **dummy_condition(meta, 1, "meta", text_length))
    return counter.get_total_flops()


def read_expert_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / "expert.json"
    if not meta_path.is_file():
        raise UsageError(f"not an expert directory (no expert.json): {path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"corrupt {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPERT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(f"{meta_path}: unknown format {found!r}, expected {EXPERT_FORMAT}")
    for key, kind in META_TYPES.items():
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise UsageError(f"{meta_path}: {key}={meta[key]!r} is not of type {kind.__name__}")
    if meta.get("island", "all") != "all" and (not isinstance(meta["island"], int) or isinstance(meta["island"], bool)):
        raise UsageError(f"{meta_path}: island={meta['island']!r} is not an index or 'all'")
    if "model_class" not in meta:
        raise UsageError(f"{meta_path}: no 'model_class'")
    return meta


def load_expert(path: str | Path, weights: str = "ema", device=None, dtype=None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, expert.json dict). `weights` is 'ema' (default, for sampling) or 'raw'.

    The files of those weights are checked against the SHA-256 in expert.json first; only safetensors are read."""
    from ddm.io import load_pretrained, verify_digests

    path = Path(path)
    meta = read_expert_meta(path)
    cls = MODEL_CLASSES.get(meta["model_class"])
    if cls is None:
        raise UsageError(f"{path}: unsupported model class {meta['model_class']!r}")
    if weights not in ("ema", "raw"):
        raise UsageError(f"weights must be 'ema' or 'raw', got {weights!r}")
    # the files of the weights asked for: an EMA view copied without raw/ still loads
    files = {rel: digest for rel, digest in meta.get("files", {}).items() if rel.startswith("raw/") == (weights == "raw")}
    verify_digests(path, files, "expert")
    # not subfolder="raw": diffusers then prefers the top-level (EMA) weights file when one exists
    model = load_pretrained(cls, path / "raw" if weights == "raw" else path, "expert weights", torch_dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval().requires_grad_(False), meta


def write_expert(out: str | Path, ema_model: torch.nn.Module, raw_model: torch.nn.Module, meta: dict) -> None:
    """Write the sampling view of an expert directory: EMA weights at the top, raw weights in raw/, expert.json.

    expert.json is removed first and written last, with the SHA-256 of every file of the view: a directory with
    an expert.json always has whole, matching weights. The training state is written separately (ddm/training).
    """
    from ddm.io import staging_dir, tree_digests

    out = Path(out)
    (out / "expert.json").unlink(missing_ok=True)
    staging = staging_dir(out / ".expert")  # inside `out`: an island writes nowhere else
    try:
        ema_model.save_pretrained(staging)
        raw_model.save_pretrained(staging / "raw")
        files = tree_digests(staging)
        (out / "raw").mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.rglob("*")):
            if f.is_file():
                f.replace(out / f.relative_to(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_expert_meta(out, meta, type(ema_model).__name__, files)


def write_expert_meta(out: Path, meta: dict, model_class: str, files: dict[str, str]) -> None:
    from ddm.io import atomic_write_json

    atomic_write_json(Path(out) / "expert.json", {**meta, "format": EXPERT_FORMAT, "model_class": model_class, "files": files})
