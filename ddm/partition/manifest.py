"""The partition manifest: the only thing islands share (read-only).

Layout of a manifest directory:
  manifest.json            K, sizes, method, extractor id, data spec + fingerprint, seed
  partition.safetensors    `assignments` (N,) int64 cluster index per sample, `centroids` (K, D) float32
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import json
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddm import UsageError
from ddm.io import atomic_save_tensors, atomic_write_json, replaced_dir, verify_owned

FORMAT = "ddm-manifest/1"


@dataclass
class Manifest:
    k: int
    data: str  # "digits" or the image folder path
    data_fingerprint: str
    method: str  # "kmeans" | "balanced-kmeans" | "random"
    extractor: str
    seed: int
    assignments: torch.Tensor = field(repr=False)  # (N,) int64
    centroids: torch.Tensor = field(repr=False)  # (K, D) float32
    image_size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        return torch.bincount(self.assignments, minlength=self.k).tolist()

    @property
    def fingerprint(self) -> str:
        """Identifies this exact partition (experts and router record it to refuse mixing partitions)."""
        h = hashlib.sha256(self.data_fingerprint.encode())
        h.update(self.assignments.numpy().tobytes())
        return h.hexdigest()[:16]

    def island_indices(self, island: int | str) -> torch.Tensor:
        """Sample indices of one island, or of the whole data set for 'all' (the monolith)."""
        if island == "all":
            return torch.arange(len(self.assignments))
        if not isinstance(island, int) or not 0 <= island < self.k:
            raise UsageError(f"island {island!r} is outside 0..{self.k - 1} or 'all'")
        return torch.nonzero(self.assignments == island).flatten()

    def check_data(self, dataset) -> None:
        if dataset.fingerprint != self.data_fingerprint or len(dataset) != len(self.assignments):
            raise UsageError(
                f"manifest fingerprint {self.data_fingerprint} ({len(self.assignments)} samples) does not match "
                f"the data {getattr(dataset, 'name', '?')} (fingerprint {dataset.fingerprint}, {len(dataset)} samples)"
            )

    def save(self, out: str | Path) -> None:
        out = Path(out)
        atomic_save_tensors(out / "partition.safetensors", {"assignments": self.assignments, "centroids": self.centroids})
        meta = {k: v for k, v in asdict(self).items() if k not in ("assignments", "centroids")}
        meta.update(format=FORMAT, sizes=self.sizes, num_samples=len(self.assignments), fingerprint=self.fingerprint)
        atomic_write_json(out / "manifest.json", meta)  # written last: its presence marks a complete manifest

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = replaced_dir(path)
        meta_path, tensors_path = path / "manifest.json", path / "partition.safetensors"
        if not meta_path.is_file():
            raise UsageError(f"manifest not found: {meta_path}")
        verify_owned(path, "manifest")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(tensors_path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
            raise UsageError(f"corrupt manifest {path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UsageError(f"{meta_path} is not a {FORMAT} manifest (format={meta.get('format') if isinstance(meta, dict) else None!r})")
        return cls(**check_fields(meta, tensors, path))

    def load_dataset(self):
        """The data set this manifest was made from, checked against its fingerprint."""
        from ddm.data import load_dataset

        ds = load_dataset(self.data, self.image_size)
        self.check_data(ds)
        return ds


FIELD_TYPES = {"k": int, "data": str, "data_fingerprint": str, "method": str, "extractor": str, "seed": int}


def check_fields(meta: dict, tensors: dict, path: Path) -> dict:
    """The Manifest fields of a loaded manifest.json + partition.safetensors; UsageError naming a missing key, a
    wrong type, or assignments that are not integer island indices 0..K-1."""
    for key, kind in FIELD_TYPES.items():
        if key not in meta:
            raise UsageError(f"manifest {path}: manifest.json has no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise UsageError(f"manifest {path}: {key}={meta[key]!r} is not of type {kind.__name__}")
    k = meta["k"]
    if k < 1:
        raise UsageError(f"manifest {path}: k={k} must be >= 1")
    for name in ("assignments", "centroids"):
        if name not in tensors:
            raise UsageError(f"manifest {path}: partition.safetensors has no {name!r} tensor")
    assignments, centroids = tensors["assignments"], tensors["centroids"]
    if assignments.dtype != torch.int64 or assignments.dim() != 1:
        raise UsageError(f"manifest {path}: assignments must be a 1-D int64 tensor, got {assignments.dtype} {tuple(assignments.shape)}")
    if len(assignments) and not 0 <= int(assignments.min()) <= int(assignments.max()) < k:
        raise UsageError(f"manifest {path}: assignments hold island {int(assignments.max())} or {int(assignments.min())}, outside 0..{k - 1}")
    if not centroids.is_floating_point() or centroids.dim() != 2 or len(centroids) != k:
        raise UsageError(f"manifest {path}: centroids must be a (K={k}, D) float tensor, got {centroids.dtype} {tuple(centroids.shape)}")
    image_size = meta.get("image_size")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UsageError(f"manifest {path}: image_size={image_size!r} is not a positive integer")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise UsageError(f"manifest {path}: extra={extra!r} is not an object")
    return {**{key: meta[key] for key in FIELD_TYPES}, "assignments": assignments, "centroids": centroids,
            "image_size": image_size, "extra": extra}
