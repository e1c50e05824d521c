"""`ddm eval`: FID, classifier accuracy and per-class coverage of generated samples.

FID is torchmetrics' `FrechetInceptionDistance` on features that need no download:
- digits (default): the penultimate 64-d features of the shipped digit classifier (ddm/digit_classifier.py),
  against the fixed held-out 20% of the digits (359 images, seeded split; the classifier never saw them);
- real data: `--feature-model PATH`, a local transformers vision checkpoint (pooled image feature), against
  the images in `--reference DIR`.
Samples come from `--samples` (a .safetensors written by `ddm sample`, or a folder of images, sub-folders
named by class) or are generated with `--ensemble DIR --n N`, classes cycling 0..C-1.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ddm import UsageError
from ddm.io import atomic_write_json
from router.strategies import DEFAULT_GUIDANCE_ROUTING, GUIDANCE_ROUTING, SPECS, check_guidance_routing


class ImageFeatures(nn.Module):
    """Adapts a feature function of images in [0, 1] to torchmetrics' custom-extractor interface."""

    def __init__(self, fn, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.fn(images01)


def digit_features(classifier) -> ImageFeatures:
    return ImageFeatures(lambda x: classifier.features(x * 2 - 1), classifier.num_features)


def pretrained_features(path: str | Path) -> ImageFeatures:
    """Pooled image features of a local transformers checkpoint (DINOv2, CLIP, ...), never downloaded."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a feature model from {path}: {str(e).splitlines()[0]}") from None

    def fn(images01):
        rgb = images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01
        pixels = processor(images=list(rgb.float()), do_rescale=False, return_tensors="pt")["pixel_values"]
        if hasattr(model, "get_image_features"):
            return model.get_image_features(pixel_values=pixels)
        out = model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    with torch.inference_mode():
        probe = torch.zeros(1, 3, 32, 32)
        dim = fn(probe).shape[-1]
    return ImageFeatures(fn, dim)


def load_samples(path: str | Path, channels: int, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images in [0, 1], labels or None) from a `ddm sample` .safetensors or a folder of images."""
    path = Path(path)
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise UsageError(f"cannot read samples {path}: {e}") from None
        if "images" not in tensors:
            raise UsageError(f"{path} has no 'images' tensor")
        return tensors["images"].float(), tensors.get("labels")
    if not path.is_dir():
        raise UsageError(f"samples not found: {path}")
    from ddm.data.images import ImageFolderDataset

    ds = ImageFolderDataset(path, image_size or 8)
    images = (torch.stack([ds[i][0] for i in range(len(ds))]) + 1) / 2
    if channels == 1:
        images = images.mean(1, keepdim=True)
    labels = ds.labels if ds.num_classes else None
    if labels is not None:  # sub-folders named by class index
        try:
            labels = torch.tensor([int(ds.class_names[i]) for i in labels])
        except ValueError:
            raise UsageError(f"class sub-folders of {path} must be named by class index, got {ds.class_names}") from None
    return images, labels


def digits_reference() -> torch.Tensor:
    """The fixed FID reference: the held-out 20% of the digits, in [0, 1]."""
    from ddm.data.images import DigitsDataset
    from evaluation.digit_classifier import digits_split

    ds = DigitsDataset()
    return (ds.images[digits_split(len(ds))[1]] + 1) / 2


@torch.inference_mode()
def evaluate_samples(images01, labels, reference01, features: ImageFeatures, classifier=None, num_classes: int = 10, batch_size: int = 512) -> dict:
    """FID vs the reference; with a classifier, accuracy vs the requested labels and per-class coverage."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(images01) < 2:
        raise UsageError(f"FID needs at least 2 samples, got {len(images01)}")
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    for chunk in reference01.split(batch_size):
        fid.update(chunk, real=True)
    for chunk in images01.split(batch_size):
        fid.update(chunk, real=False)
    result = {"fid": float(fid.compute()), "num_samples": len(images01), "num_reference": len(reference01)}
    if classifier is not None:
        predicted = torch.cat([classifier(c * 2 - 1).argmax(1) for c in images01.split(batch_size)])
        counts = torch.bincount(predicted, minlength=num_classes)
        result["predicted_class_fraction"] = (counts.float() / len(predicted)).tolist()
        result["class_coverage"] = int((counts > 0).sum()) / num_classes
        if labels is not None:
            labels = labels.long()
            result["accuracy"] = (predicted == labels).float().mean().item()
            result["per_class_accuracy"] = [
                (predicted[labels == c] == c).float().mean().item() if (labels == c).any() else None for c in range(num_classes)
            ]
    return result


def generate(model_dir, n: int, strategy: str | None, steps: int, cfg: float, seed: int, batch_size: int = 256,
             guidance_routing: str = DEFAULT_GUIDANCE_ROUTING, device_map=None):
    """n samples in [0, 1] from an ensemble directory or one expert directory (e.g. the monolith), classes
    cycling 0..C-1, and their labels. The same seed gives the same initial noise for either kind of model."""
    from router.pipeline import make_pipeline

    if (Path(model_dir) / "expert.json").is_file():
        from ddm.models.experts import load_expert

        if strategy or device_map:
            raise UsageError(f"--strategy / --expert-devices need an ensemble; {model_dir} is a single expert")
        model, meta = load_expert(model_dir)
        num_classes, shift = meta["num_classes"], meta["flow"]["shift"]
    else:
        from router.ensemble import DDMEnsemble

        model = DDMEnsemble.from_pretrained(model_dir, strategy=strategy, device_map=device_map)
        num_classes, shift = model.config.num_embeds_ada_norm, model.metas[0]["flow"]["shift"]
    pipe = make_pipeline(model, shift)
    labels = torch.arange(n) % num_classes
    gen = torch.Generator().manual_seed(seed)
    images = [pipe(chunk, steps, cfg, gen, output_type="pt", guidance_routing=guidance_routing).images.cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images), labels


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="a .safetensors from `ddm sample`, or a folder of images (sub-folders = classes)")
    src.add_argument("--ensemble", help="an ensemble directory, or one expert directory (e.g. the monolith), to sample from")
    p.add_argument("--n", type=int, default=1000, help="samples to generate with --ensemble")
    p.add_argument("--strategy", default=None, help=f"override the ensemble's routing strategy: {SPECS}")
    p.add_argument("--guidance-routing", default=DEFAULT_GUIDANCE_ROUTING,
                   help=f"{' | '.join(GUIDANCE_ROUTING)}: how a guided sample's null-label row is routed (see ddm sample)")
    p.add_argument("--expert-devices", default=None, help="experts on several devices, as in ddm sample")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="digits", help="'digits' (shipped classifier features) or use --feature-model/--reference")
    p.add_argument("--feature-model", help="local transformers vision checkpoint for real data")
    p.add_argument("--reference", help="folder of held-out real images for real data")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--out", help="write the metrics JSON here")


def run(args) -> int:
    real_data = args.data != "digits"
    if real_data and not (args.feature_model and args.reference):
        raise UsageError(f"--data {args.data}: real data needs --feature-model PATH and --reference DIR (no downloads)")
    check_guidance_routing(args.guidance_routing)
    if args.ensemble and args.n < 2:
        raise UsageError(f"--n must be >= 2 for FID, got {args.n}")
    if real_data:
        from ddm.data.images import ImageFolderDataset

        features, classifier, num_classes = pretrained_features(args.feature_model), None, 0
        ref = ImageFolderDataset(args.reference, args.image_size or 224)
        reference = (torch.stack([ref[i][0] for i in range(len(ref))]) + 1) / 2
        channels = 3
    else:
        from evaluation.digit_classifier import load_digit_classifier

        classifier = load_digit_classifier()
        features, num_classes, reference, channels = digit_features(classifier), 10, digits_reference(), 1
    if args.samples:
        images, labels = load_samples(args.samples, channels, args.image_size or reference.shape[-1])
    else:
        images, labels = generate(args.ensemble, args.n, args.strategy, args.steps, args.cfg, args.seed,
                                  guidance_routing=args.guidance_routing, device_map=args.expert_devices)
    if images.shape[1:] != reference.shape[1:]:
        raise UsageError(f"samples are {tuple(images.shape[1:])}, the reference set is {tuple(reference.shape[1:])}")
    result = evaluate_samples(images, labels, reference, features, classifier, num_classes)
    result["reference"] = "digits held-out 20% (seed 0)" if not real_data else str(args.reference)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0
