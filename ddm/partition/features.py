"""Pluggable feature extractors for partitioning.

`extract_features(spec, dataset)` returns (N x D float32 features, extractor id). `spec` is either a name from
`EXTRACTORS` or a local directory holding a transformers vision checkpoint (DINOv2, CLIP, ...: anything
`AutoModel` + `AutoImageProcessor` load). The id is recorded in the manifest so a partition says how it was made.

- `pixels-pca` (default): standardized pixels projected on their first 32 principal components. Needs no
  download, and on the 8x8 digits it keeps ~90% of the variance, enough for k-means to find digit-like clusters.
- `pixels`: the raw pixels, standardized.
- a checkpoint path: the model's pooled image feature (`get_image_features` for CLIP-style models, else
  `pooler_output`, else the CLS token of `last_hidden_state`), as in the DDM paper's DINOv2 features.
- `latents-pca`: for a latent cache, its latent means standardized and projected on 32 principal components
  (fitted on at most 20,000 seeded samples, then applied in batches, so ImageNet-size caches fit in memory).
- `text`: the captions' pooled text embeddings (ddm/data/text_embeddings.py), L2-normalised so k-means compares
  them by angle as CLIP does: from a latent cache encoded with `--text-encoder`, else encoded now with
  `--text-encoder` (the digits default to the embedded encoder).
On a latent cache, `pixels`, `pixels-pca` and checkpoints read the source images the latents were encoded from
(mirrored where the cache holds a mirror image).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ddm import UsageError

PCA_DIM = 32


def dataset_images(dataset, batch_size: int = 256):
    """Yield batches of images (B x C x H x W in [-1, 1]) in index order."""
    if hasattr(dataset, "images"):  # in-memory data sets (digits): slice, no per-item work
        for start in range(0, len(dataset), batch_size):
            yield dataset.images[start : start + batch_size]
        return
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])


def _standardized_pixels(dataset) -> np.ndarray:
    x = torch.cat([b.flatten(1) for b in dataset_images(dataset)]).double().numpy()
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def pixels(dataset) -> np.ndarray:
    return _standardized_pixels(dataset).astype(np.float32)


def pixels_pca(dataset) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = _standardized_pixels(dataset)
    dim = min(PCA_DIM, x.shape[0], x.shape[1])
    return PCA(n_components=dim, svd_solver="full").fit_transform(x).astype(np.float32)


def latents_pca(dataset, fit_samples: int = 20_000, batch_size: int = 4096) -> np.ndarray:
    from sklearn.decomposition import PCA

    if not hasattr(dataset, "rows"):
        raise UsageError(f"--features latents-pca needs a latent directory as --data, got {dataset.name}")
    n = len(dataset)
    fit = np.sort(np.random.default_rng(0).permutation(n)[: min(n, fit_samples)])
    x = dataset.rows(fit)[0].flatten(1).double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    pca = PCA(n_components=min(PCA_DIM, *x.shape), svd_solver="full").fit((x - mean) / std)
    chunks = [pca.transform((dataset.rows(np.arange(s, min(s + batch_size, n)))[0].flatten(1).double().numpy() - mean) / std)
              for s in range(0, n, batch_size)]
    return np.concatenate(chunks).astype(np.float32)


def clip_params(dataset) -> np.ndarray:
    """Moving-digit clips: digit histogram, motion, start position (MovingDigitsDataset.features)."""
    return dataset.features().numpy()


def text_features(dataset, text_encoder=None, allow_empty: bool = False) -> tuple[np.ndarray, str]:
    from ddm.data.text_embeddings import caption_table

    table = caption_table(dataset, text_encoder, allow_empty)
    pooled = torch.nn.functional.normalize(table.pooled.float(), dim=1)
    return pooled.numpy(), f"text:{table.record['kind']}:{table.record['hash']}"


EXTRACTORS: dict[str, Callable] = {"text": text_features, "pixels-pca": pixels_pca, "pixels": pixels, "clip-params": clip_params, "latents-pca": latents_pca}


def _checkpoint_id(path: Path, model_type: str) -> str:
    """Names the checkpoint by its type, folder name and a digest of its config and file sizes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\0".encode())
    return f"hf:{model_type}:{path.name}:{h.hexdigest()[:12]}"


def load_image_encoder(path: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(encode, model_type) of a local transformers vision checkpoint (DINOv2, CLIP, ...), never downloaded.

    encode: images in [-1, 1] (N, C, H, W) → pooled features (N, D) float32, through the checkpoint's own processor.
    Partitioning and `ddm eval` on real data both use it, so they see images the same way.
    """
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a feature model from {path}: {str(e).splitlines()[0]}") from None

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        rgb = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pixel_values = processor(images=list(rgb), return_tensors="pt")["pixel_values"]
        if hasattr(model, "get_image_features"):
            feats = model.get_image_features(pixel_values=pixel_values)
            feats = getattr(feats, "pooler_output", feats)  # newer transformers wrap it in an output object
        else:
            out = model(pixel_values=pixel_values)
            pooled = getattr(out, "pooler_output", None)
            feats = pooled if pooled is not None else out.last_hidden_state[:, 0]
        return feats.float()

    return encode, model.config.model_type


def pretrained_features(path: Path, dataset, batch_size: int = 64) -> tuple[np.ndarray, str]:
    encode, model_type = load_image_encoder(path)
    chunks = [encode(images) for images in dataset_images(dataset, batch_size)]
    return torch.cat(chunks).numpy(), _checkpoint_id(path, model_type)


def check_spec(spec: str) -> None:
    """Fail fast (before any data is loaded) on an unknown name or a missing checkpoint."""
    if spec in EXTRACTORS:
        return
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"unknown feature extractor {spec!r}: use one of {', '.join(EXTRACTORS)} or a local checkpoint directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"feature model directory has no config.json: {spec}")


def check_supported(spec: str, dataset) -> None:
    """`clip-params` reads the generator parameters only moving-digit clips have."""
    if spec == "clip-params" and not hasattr(dataset, "features"):
        raise UsageError(f"--features clip-params needs moving-digit clips (--data moving-digits:...), not {getattr(dataset, 'name', 'this data')}")


def extract_features(spec: str, dataset, text_encoder=None, allow_empty_captions: bool = False) -> tuple[np.ndarray, str]:
    check_spec(spec)
    if spec == "text":
        return text_features(dataset, text_encoder, allow_empty_captions)
    if text_encoder is not None:
        raise UsageError(f"--text-encoder goes with --features text, not --features {spec}")
    if spec == "latents-pca":
        return latents_pca(dataset), spec
    if hasattr(dataset, "source_images"):  # a latent cache: pixel features come from its images
        dataset = dataset.source_images()
    if spec in EXTRACTORS:
        return EXTRACTORS[spec](dataset), spec
    return pretrained_features(Path(spec), dataset)
