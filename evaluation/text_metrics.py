"""Text-to-image scores: the CLIP score of samples against their prompts, per-prompt sample grids, and the digit a
digit prompt asks for (so `ddm eval` reports the classifier's accuracy on prompted digits too).

CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore): 100 · max(cos(image embedding, text embedding), 0),
averaged over the samples, with a local transformers CLIP folder (model + processor; never downloaded).
torchmetrics 1.9's CLIPScore takes a loader callable, but it normalises `get_image_features`' return value, which
transformers 5 wraps in an output object, so the same formula is computed here.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ddm import UsageError


def load_clip(path: str | Path):
    """(CLIPModel, CLIPProcessor) of a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load a CLIP model and processor from {path}: {str(e).splitlines()[0]}") from None
    return model, processor


def features(output) -> torch.Tensor:
    return getattr(output, "pooler_output", output)  # transformers 5 wraps the projected features in an output object


def clip_scores(images01: torch.Tensor, texts: list[str], clip_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Per-sample CLIP score of images (N, C, H, W) in [0, 1] against their texts."""
    return 100 * clip_cosines(images01, texts, clip_dir, batch_size).clamp_min(0)


@torch.inference_mode()
def clip_cosines(images01: torch.Tensor, texts: list[str], clip_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Cosine of each image's CLIP embedding with its text's."""
    model, processor = load_clip(clip_dir)
    scores = []
    for start in range(0, len(images01), batch_size):
        chunk = images01[start : start + batch_size]
        if chunk.shape[1] == 1:
            chunk = chunk.expand(-1, 3, -1, -1)
        rgb = list((chunk * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        inputs = processor(text=texts[start : start + batch_size], images=rgb, return_tensors="pt", padding=True, truncation=True)
        image = features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        scores.append(torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1))
    return torch.cat(scores)


def prompt_labels(prompts: list[str], prompt_index: torch.Tensor) -> torch.Tensor | None:
    """Each sample's digit class when every prompt names exactly one digit, else None."""
    from ddm.data.captions import digit_class_of

    classes = [digit_class_of(p) for p in prompts]
    if any(c is None for c in classes):
        return None
    return torch.tensor(classes)[prompt_index]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "empty"


def write_prompt_grids(images01: torch.Tensor, prompt_index: torch.Tensor, prompts: list[str], out_dir: str | Path,
                       scale: int = 4) -> list[Path]:
    """One PNG grid per prompt (its samples, in order): OUT_DIR/NN-<prompt>.png."""
    from ddm.io import atomic_write_bytes
    from router.sample import image_grid

    out_dir = Path(out_dir)
    paths = []
    for i, prompt in enumerate(prompts):
        mine = images01[prompt_index == i]
        if len(mine):
            path = out_dir / f"{i:02d}-{slug(prompt)}.png"
            atomic_write_bytes(path, image_grid(mine, scale))
            paths.append(path)
    return paths
