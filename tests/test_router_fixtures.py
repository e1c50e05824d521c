"""Builders shared by the router/ensemble/pipeline tests: tiny experts and routers written to temp dirs.

Experts are built directly with `build_dit` + `write_expert` (no training): the tests check routing,
plumbing and exactness, not image quality.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ddm.models.experts import build_dit, write_expert
from ddm.flow import FlowConfig
from ddm.partition.manifest import Manifest
from router.model import RouterModel

FLOW = FlowConfig(shift=1.0, sigma_sampling="logit_normal").to_dict()


def digits_manifest(k: int, assignments: torch.Tensor | None = None) -> Manifest:
    from ddm.data.images import DigitsDataset

    ds = DigitsDataset()
    if assignments is None:
        assignments = ds.labels % k  # islands of whole digit classes: learnable from the image
    return Manifest(
        k=k, data="digits", data_fingerprint=ds.fingerprint, method="test", extractor="labels", seed=0,
        assignments=assignments, centroids=torch.zeros(k, 1),
    )


def make_expert(path: Path, island: int, k: int, fingerprint: str, *, seed: int = 0, sample_size: int = 8,
                in_channels: int = 1, num_classes: int = 10, flow: dict = FLOW) -> Path:
    torch.manual_seed(seed + island)
    model = build_dit("tiny", sample_size, in_channels, num_classes)
    with torch.no_grad():  # DiT zero-inits its output layer; randomize it so experts differ visibly
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = dict(island=island, k=k, manifest_fingerprint=fingerprint, flow=flow, num_classes=num_classes)
    write_expert(path, model, model, meta)
    return path


def make_router(path: Path, k: int, fingerprint: str, *, seed: int = 0, sample_size: int = 8, in_channels: int = 1,
                num_classes: int | None = None, flow: dict = FLOW, scale: float = 1.0) -> Path:
    torch.manual_seed(100 + seed)
    router = RouterModel(num_experts=k, sample_size=sample_size, in_channels=in_channels, hidden_dim=16, num_layers=1,
                         num_heads=2, num_classes=num_classes, flow=flow, manifest_fingerprint=fingerprint)
    with torch.no_grad():  # spread the random logits so that routing varies across samples
        router.head.weight.mul_(scale)
    router.save_pretrained(path)
    return path


def make_ensemble_dirs(root: Path, k: int = 4, fingerprint: str = "f" * 16, **router_kwargs) -> tuple[Path, list[Path]]:
    root = Path(root)
    experts = [make_expert(root / f"island_{i}", i, k, fingerprint) for i in range(k)]
    return make_router(root / "router", k, fingerprint, **router_kwargs), experts
