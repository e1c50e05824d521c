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
from ddm.io import atomic_save_tensors, atomic_write_json, replaced_dir

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
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(tensors_path)
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise UsageError(f"corrupt manifest {path}: {e}") from None
        if meta.get("format") != FORMAT:
            raise UsageError(f"{meta_path} is not a {FORMAT} manifest (format={meta.get('format')!r})")
        fields = {k: meta[k] for k in ("k", "data", "data_fingerprint", "method", "extractor", "seed")}
        return cls(
            **fields,
            assignments=tensors["assignments"],
            centroids=tensors["centroids"],
            image_size=meta.get("image_size"),
            extra=meta.get("extra", {}),
        )

    def load_dataset(self):
        """The data set this manifest was made from, checked against its fingerprint."""
        from ddm.data import load_dataset

        ds = load_dataset(self.data, self.image_size)
        self.check_data(ds)
        return ds
