"""The latent cache: an image folder encoded once by a VAE, read by every DDM command like any other data set.

Layout of a latent directory (written by `ddm encode`, ddm/data/encode.py):
  plan.json                  written first: what is being encoded (source folder and its fingerprint, image size,
                             flip, VAE record with its hash and factors, storage dtype, images per shard)
  shard-00000.safetensors    `mean`, `std` (n, C, h, w) of the model-space latent distribution, `labels` (n,) int64;
  ...                        each shard lands by rename, so a file with this name is always whole
  text-00000.safetensors     with `--text-encoder`: `hidden` (n, L, D), `mask` (n, L) uint8, `pooled` (n, P) of the
  ...                        samples' captions, written before the latent shard of the same number
  text-empty.safetensors     the empty caption's row (the classifier-free guidance null condition)
  index.json                 written last, its presence marks a complete cache: the plan + every shard's sample
                             count and sha256 + the cache's fingerprint (what a partition manifest records)

Samples are in image order; with `--flip` every image is followed by its mirror image (2N samples). Mean AND std are
stored so that training can draw a fresh latent from the encoder's distribution at every step (as the latent
diffusion papers do) instead of freezing one draw; std costs as much disk as mean, hence float16 by default.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddm import UsageError
from ddm.io import sha256_file

FORMAT = "ddm-latents/1"
PLAN, INDEX = "plan.json", "index.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NUMPY = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "U8": np.uint8}
# Plan keys that decide the content: a rerun must agree on these to resume (paths may be spelled differently).
PLAN_KEYS = ("format", "source_fingerprint", "image_size", "flip", "vae_hash", "dtype", "shard_size", "num_images",
             "text_encoder_hash", "captions_hash")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def is_latent_dir(path: str | Path) -> bool:
    return (Path(path) / PLAN).is_file() or (Path(path) / INDEX).is_file()


def plan_key(plan: dict) -> dict:
    return {k: plan.get(k) for k in PLAN_KEYS}


def shard_images(plan: dict, shard: int) -> range:
    """The source image indices of one shard."""
    size = plan["shard_size"]
    return range(shard * size, min((shard + 1) * size, plan["num_images"]))


def num_shards(plan: dict) -> int:
    return -(-plan["num_images"] // plan["shard_size"])


def read_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, without reading its tensors."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


def shard_samples(path: Path) -> int | None:
    """The number of samples in a shard file, or None if it is not a readable shard."""
    try:
        _, header = read_header(path)
        return header["mean"]["shape"][0]
    except (OSError, ValueError, KeyError, IndexError, struct.error):
        return None


def cache_fingerprint(index: dict) -> str:
    key = {k: v for k, v in plan_key(index).items() if v is not None}  # caches without text keep their fingerprint
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for shard in index["shards"]:
        h.update(shard["sha256"].encode())
    return h.hexdigest()[:16]


def read_index(root: str | Path) -> dict:
    """The index of a complete cache; an incomplete one (plan but no index) is refused, never trusted."""
    root = Path(root)
    if not (root / INDEX).is_file():
        if (root / PLAN).is_file():
            raise UsageError(f"latent cache {root} is incomplete (no {INDEX}): run the same `ddm encode` again to resume it")
        raise UsageError(f"not a latent directory (no {INDEX}): {root}")
    try:
        index = json.loads((root / INDEX).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"corrupt {root / INDEX}: {e}") from None
    if index.get("format") != FORMAT:
        raise UsageError(f"{root / INDEX}: unknown format {index.get('format')!r}, expected {FORMAT}")
    return index


def _memmap(path: Path, name: str) -> np.memmap:
    length, header = read_header(path)
    info = header[name]
    start, _ = info["data_offsets"]
    return np.memmap(path, dtype=_NUMPY[info["dtype"]], mode="r", offset=8 + length + start, shape=tuple(info["shape"]))


class LatentDataset(Dataset):
    """A complete latent cache, memory-mapped (the page cache holds what is read; nothing is decoded per step).

    Items are (mean, std, label, index); `rows(indices)` gathers a batch at once. `image_size` and `channels` are
    those of the latents, the model's samples; `pixel_size` is the source images' size.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = read_index(self.root)
        self.index = index
        self.name = str(self.root)
        self.fingerprint = index["fingerprint"]
        self.vae = index["vae"]
        self.channels, self.image_size, _ = index["latent_shape"]
        self.pixel_size = index["image_size"]
        self.class_names = index["class_names"]
        self.num_classes = len(self.class_names)
        self.means, self.stds, labels = [], [], []
        for shard in index["shards"]:
            path = self.root / shard["file"]
            if shard_samples(path) != shard["samples"]:
                raise UsageError(f"latent cache {self.root}: {shard['file']} is missing or not the shard the index lists")
            self.means.append(_memmap(path, "mean"))
            self.stds.append(_memmap(path, "std"))
            labels.append(torch.from_numpy(np.array(_memmap(path, "labels"))))
        self.labels = torch.cat(labels)
        self.starts = np.cumsum([0] + [s["samples"] for s in index["shards"]])

    def __len__(self):
        return int(self.starts[-1])

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of these samples (storage dtype), gathered shard by shard."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        mean = np.empty((len(idx), *self.means[0].shape[1:]), self.means[0].dtype)
        std = np.empty_like(mean)
        for s in np.unique(shard):
            sel = shard == s
            local = idx[sel] - self.starts[s]
            mean[sel], std[sel] = self.means[s][local], self.stds[s][local]
        return torch.from_numpy(mean), torch.from_numpy(std)

    def __getitem__(self, i):
        mean, std = self.rows([i])
        return mean[0], std[0], int(self.labels[i]), i

    def text_table(self):
        """The caption embeddings stored beside the latents (ddm/data/text_embeddings.py), checked against the index."""
        from safetensors.torch import load_file

        from ddm.data.text_embeddings import EMPTY, TextTable

        text = self.index.get("text")
        if not text:
            raise UsageError(f"latent cache {self.root} holds no caption embeddings: encode it with `ddm encode --text-encoder DIR`")
        parts = []
        for entry in [*text["shards"], {"file": EMPTY, "sha256": text["empty_sha256"]}]:
            path = self.root / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise UsageError(f"latent cache {self.root}: {entry['file']} is missing or not the file the index lists")
            parts.append(load_file(path))
        rows, empty = parts[:-1], parts[-1]
        hidden, mask, pooled = (torch.cat([p[k] for p in rows]) for k in ("hidden", "mask", "pooled"))
        return TextTable(hidden, mask.bool(), pooled.float(), empty["hidden"], empty["mask"].bool(), empty["pooled"].float(),
                         {**text["encoder"], "captions_hash": text["captions_hash"]})

    def subset(self, indices: torch.Tensor) -> "LatentSubset":
        return LatentSubset(self, indices)

    def source_images(self) -> Dataset:
        """The images the latents were encoded from (mirrored where the cache holds a mirror image), for
        partition features computed on pixels; refused if the folder changed since encoding."""
        from ddm.data.images import ImageFolderDataset

        folder = ImageFolderDataset(self.index["source"], self.pixel_size)
        if folder.fingerprint != self.index["source_fingerprint"]:
            raise UsageError(
                f"the images in {self.index['source']} changed since {self.root} was encoded "
                f"(fingerprint {folder.fingerprint}, encoded from {self.index['source_fingerprint']})"
            )
        return SourceImages(folder, self.index["flip"])


class LatentSubset(Dataset):
    """Some samples of a LatentDataset. `__getitems__` makes the DataLoader fetch a whole batch in one gather
    (use it with a pass-through collate_fn): a batch is (mean, std, labels)."""

    returns_batches = True

    def __init__(self, data: LatentDataset, indices: torch.Tensor):
        self.data, self.indices = data, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[int(self.indices[i])][:3]

    def __getitems__(self, positions: list[int]):
        idx = self.indices[positions]
        mean, std = self.data.rows(idx.numpy())
        return mean, std, self.data.labels[idx]


class SourceImages(Dataset):
    """Sample j of a latent cache as an image: image j (or j // 2, mirrored when j is odd, with flip)."""

    def __init__(self, folder, flip: bool):
        self.folder, self.flip = folder, flip
        self.labels = folder.labels.repeat_interleave(2) if flip else folder.labels
        self.num_classes, self.fingerprint, self.name = folder.num_classes, folder.fingerprint, folder.name

    def __len__(self):
        return len(self.folder) * (2 if self.flip else 1)

    def __getitem__(self, j):
        image, label, _ = self.folder[j // 2 if self.flip else j]
        if self.flip and j % 2:
            image = image.flip(-1)
        return image, label, j
