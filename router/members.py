"""What an ensemble is made of, checked before it is built: the router folder `ddm train-router` wrote, and a set
of experts that are interchangeable on one sample (one partition, one noise path, one conditioning, one shape).
The router trainer checks its experts with the same rules, so this sits below both."""
from __future__ import annotations

import json
from pathlib import Path

from ddm import UsageError
from ddm.io import load_pretrained, replaced_dir, verify_owned
from router.model import RouterModel

# Expert config keys that must agree for the experts to be interchangeable on one sample.
SHAPE_KEYS = ("sample_size", "in_channels", "out_channels", "patch_size", "num_embeds_ada_norm")


def load_router(path: str | Path, device=None, dtype=None) -> RouterModel:
    """The router of a folder `ddm train-router` wrote: files checked against their SHA-256, safetensors only."""
    path = replaced_dir(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"not a router directory (no config.json): {path}")
    verify_owned(path, "router")
    check_router_config(path)
    router = load_pretrained(RouterModel, path, "router", torch_dtype=dtype)
    return router.to(device).eval().requires_grad_(False)


def check_router_config(path: Path) -> None:
    """The keys that size the router must be positive integers (a hand-edited config gets one line)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot load router from {path}: config.json: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"cannot load router from {path}: config.json is not an object")
    for key in ("num_experts", "sample_size", "in_channels", "patch_size", "hidden_dim", "num_layers", "num_heads"):
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"cannot load router from {path}: config.json has {key}={value!r}, not a positive integer")


def check_experts(metas: list[dict], configs: list[dict], paths: list) -> None:
    """Experts must come from one partition, one noise path and one sample shape (UsageError naming the odd one)."""
    from ddm.data.vae import check_same_vae

    for meta, path in zip(metas, paths):
        missing = [key for key in ("island", "k", "manifest_fingerprint", "flow", "num_classes") if key not in meta]
        if missing:
            raise UsageError(f"expert {path}: expert.json has no {', '.join(map(repr, missing))} (an image expert needs them)")
    first, first_cfg = metas[0], configs[0]
    for meta, path in zip(metas, paths):
        if conditioning(meta) != conditioning(first):
            raise UsageError(f"experts of mixed conditioning: {path} is {conditioning(meta)}-conditional, "
                             f"{paths[0]} is {conditioning(first)}-conditional; one ensemble takes one kind")
        theirs, ours = (meta.get("text_encoder") or {}).get("hash"), (first.get("text_encoder") or {}).get("hash")
        if theirs != ours:
            raise UsageError(f"expert {path} was trained with text encoder {theirs}, {paths[0]} with {ours}")
    seen = set()
    for meta, cfg, path in zip(metas, configs, paths):
        check_same_vae(meta.get("vae"), f"expert {path}", first.get("vae"), f"expert {paths[0]}")
        for key in ("k", "manifest_fingerprint", "flow", "num_classes"):
            if meta.get(key) != first.get(key):
                raise UsageError(f"expert {path} has {key}={meta.get(key)!r} but {paths[0]} has {first.get(key)!r}")
        for key in SHAPE_KEYS:
            if cfg.get(key) != first_cfg.get(key):
                raise UsageError(f"expert {path} has {key}={cfg.get(key)!r} but {paths[0]} has {first_cfg.get(key)!r}")
        island = meta.get("island")
        if not isinstance(island, int) or not 0 <= island < first["k"]:
            raise UsageError(f"expert {path}: island {island!r} is outside 0..{first['k'] - 1}")
        if island in seen:
            raise UsageError(f"expert {path}: island {island} is given twice")
        seen.add(island)


def conditioning(meta: dict) -> str:
    """"class" or "text" (experts written before text experts existed are class-conditional)."""
    return meta.get("conditioning", "class")
