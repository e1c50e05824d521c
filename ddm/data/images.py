"""Image datasets: the embedded 8x8 digits and a folder of images.

Each yields (image in [-1, 1] as CxHxW float32, label (int, -1 if none), index) and has a stable
`fingerprint` (hash of the sample list and sizes) that a partition manifest records, so an island can
refuse to train on data that is not the data it was partitioned from.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ddm import UsageError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8x8 digits (values 0..16), scaled to [-1, 1]; shipped inside sklearn, no download."""

    name = "digits"
    num_classes = 10
    channels = 1
    image_size = 8

    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # N,1,8,8
        self.labels = torch.from_numpy(d.target.astype(np.int64))
        h = hashlib.sha256(b"digits\0")
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i

    def captions(self, allow_empty: bool = False) -> list[str]:
        """Generated captions ("a handwritten seven", a few phrasings per class; ddm/data/captions.py)."""
        from ddm.data.captions import digit_captions

        return digit_captions(self.labels)


class ImageFolderDataset(Dataset):
    """A directory of images; if it has sub-folders, each sub-folder is a class (sorted by name).

    Images are converted to RGB, resized so the short side is `image_size`, then center-cropped.
    """

    def __init__(self, root: str | Path, image_size: int):
        from PIL import Image  # noqa: F401  (fail early if Pillow is missing)

        self.root = Path(root)
        if not self.root.is_dir():
            raise UsageError(f"image folder not found: {self.root}")
        if image_size <= 0:
            raise UsageError(f"image size must be positive, got {image_size}")
        self.name = str(self.root)
        self.image_size = image_size
        self.channels = 3
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise UsageError(f"image folder is empty (no {'/'.join(sorted(IMAGE_SUFFIXES))} files): {self.root}")
        self.files = files
        self.class_names = classes
        self.num_classes = len(classes)
        index = {c: i for i, c in enumerate(classes)}
        rel = [f.relative_to(self.root) for f in files]
        self.labels = torch.tensor(
            [index[r.parts[0]] if len(r.parts) > 1 and classes else -1 for r in rel], dtype=torch.int64
        )
        h = hashlib.sha256(b"folder\0")
        h.update(str(image_size).encode())
        for r, f in zip(rel, files):
            h.update(f"{r.as_posix()}\0{f.stat().st_size}\0".encode())
        self.fingerprint = h.hexdigest()[:16]

    def __len__(self):
        return len(self.files)

    def load_image(self, i: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.image_size / min(w, h)
                im = im.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for a bad file
            raise UsageError(f"cannot read image {self.files[i]}: {first_line(e)}") from None
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, i):
        return self.load_image(i), int(self.labels[i]), i

    def captions(self, allow_empty: bool = False) -> list[str]:
        """One caption per image: sidecar .txt files or metadata.jsonl (ddm/data/captions.py)."""
        from ddm.data.captions import folder_captions

        return folder_captions(self.root, self.files, allow_empty)
