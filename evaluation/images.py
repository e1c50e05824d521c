"""`ddm eval`: FID, classifier accuracy and per-class coverage of generated samples.

FID is torchmetrics' `FrechetInceptionDistance` on features that need no download:
- digits (default): the penultimate 64-d features of the shipped digit classifier (evaluation/digit_classifier.py),
  against the fixed held-out 20% of the digits (359 images, seeded split; the classifier never saw them);
- real data: `--feature-model PATH`, a local transformers vision checkpoint (pooled image feature), against
  the images in `--reference DIR`; with `--data LATENTS` (a latent cache) the reference defaults to the images
  the cache was encoded from, at their size, and generated samples must come from experts on the same VAE.
Samples come from `--samples` (a .safetensors written by `ddm sample`, or a folder of images, sub-folders
named by class) or are generated with `--ensemble DIR --n N`, classes cycling 0..C-1. Text-conditional models take
`--prompts FILE` (prompts cycling); prompted samples also get a CLIP score with `--clip-model DIR`, one grid per
prompt with `--grids DIR`, and, on the digits, the classifier's accuracy against the digit each prompt names
(evaluation/text_metrics.py).
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

EVAL_FORMAT = "ddm-eval/1"  # in --out: marks the file as ours, so a re-run may replace it


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
    """Pooled image features of a local transformers checkpoint (the encoder partitioning uses too)."""
    from ddm.partition.features import load_image_encoder

    encode, _ = load_image_encoder(path)
    dim = encode(torch.zeros(1, 3, 32, 32)).shape[-1]
    return ImageFeatures(lambda images01: encode(images01 * 2 - 1), dim)


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
        images, labels = tensors["images"], tensors.get("labels")
        if images.dim() != 4 or (labels is not None and (labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point())):
            raise UsageError(f"{path}: expected images (N, C, H, W) and integer labels (N,), got {tuple(images.shape)} and "
                             f"{None if labels is None else (labels.dtype, tuple(labels.shape))}")
        return images.float(), labels
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


def model_meta(model_dir) -> dict:
    """expert.json of one expert directory, or of an ensemble's first expert (also inside a pipeline folder)."""
    from ddm.models.experts import read_expert_meta

    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").is_file():  # a pipeline folder: its transformer is the ensemble
        return model_meta(model_dir / "transformer")
    if (model_dir / "expert.json").is_file():
        return read_expert_meta(model_dir)
    try:
        spec = json.loads((model_dir / "ensemble.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"not an expert or ensemble directory: {model_dir}: {e}") from None
    return read_expert_meta(model_dir / spec["experts"][0])


def generate(model_dir, n: int, strategy: str | None, steps: int, cfg: float, seed: int, batch_size: int = 256,
             guidance_routing: str = DEFAULT_GUIDANCE_ROUTING, device_map=None):
    """n samples in [0, 1] from a pipeline folder, an ensemble or one expert directory (e.g. the monolith), classes
    cycling 0..C-1, and their labels. The same seed gives the same initial noise for either kind of model.
    Latent-space experts decode with their VAE (load_pipeline attaches it)."""
    from router.pipeline import load_pipeline

    pipe = load_pipeline(model_dir, strategy, device_map=device_map)
    if hasattr(pipe, "encode_prompt"):
        raise UsageError(f"{model_dir} is text-conditional: give --prompts FILE")
    labels = torch.arange(n) % pipe.transformer.config.num_embeds_ada_norm
    gen = torch.Generator().manual_seed(seed)
    images = [pipe(chunk, steps, cfg, gen, output_type="pt", guidance_routing=guidance_routing).images.cpu()
              for chunk in labels.split(batch_size)]
    return torch.cat(images), labels


def generate_prompted(model_dir, n: int, prompts: list[str], negative_prompt: str, strategy: str | None, steps: int, cfg: float,
                      seed: int, batch_size: int = 256, guidance_routing: str = DEFAULT_GUIDANCE_ROUTING, device_map=None):
    """n samples in [0, 1] of a text-conditional model, prompts cycling, and each sample's prompt index."""
    from router.pipeline import load_pipeline

    pipe = load_pipeline(model_dir, strategy, device_map=device_map)
    if not hasattr(pipe, "encode_prompt"):
        raise UsageError(f"--prompts: {model_dir} is class-conditional")
    index = torch.arange(n) % len(prompts)
    gen = torch.Generator().manual_seed(seed)
    images = [pipe([prompts[i] for i in chunk.tolist()], negative_prompt=negative_prompt, num_inference_steps=steps,
                   guidance_scale=cfg, generator=gen, output_type="pt", guidance_routing=guidance_routing).images.cpu()
              for chunk in index.split(batch_size)]
    return torch.cat(images), index


def prompted_samples(path: Path) -> tuple[list[str], torch.Tensor] | None:
    """(prompts, prompt index) of a `ddm sample --prompts` .safetensors (prompts from its .json), else None."""
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    if "prompt_index" not in tensors:
        return None
    try:
        prompts = json.loads(path.with_suffix(".json").read_text())["prompts"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise UsageError(f"{path}: its prompts ({path.with_suffix('.json').name}) are unreadable: {e}") from None
    return prompts, tensors["prompt_index"]


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="a .safetensors from `ddm sample`, or a folder of images (sub-folders = classes)")
    src.add_argument("--ensemble", help="a pipeline folder (ddm sample --save-ensemble), an ensemble, or one expert directory (e.g. the monolith) to sample from")
    p.add_argument("--n", type=int, default=1000, help="samples to generate with --ensemble")
    p.add_argument("--strategy", default=None, help=f"override the ensemble's routing strategy: {SPECS}")
    p.add_argument("--guidance-routing", default=DEFAULT_GUIDANCE_ROUTING,
                   help=f"{' | '.join(GUIDANCE_ROUTING)}: how a guided sample's null-label row is routed (see ddm sample)")
    p.add_argument("--expert-devices", default=None, help="experts on several devices, as in ddm sample")
    p.add_argument("--steps", type=int, default=50, help="Euler sampling steps with --ensemble")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale with --ensemble (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial noise with --ensemble")
    p.add_argument("--data", default="digits", help="'digits' (shipped classifier features), a latent directory, or use --feature-model/--reference")
    p.add_argument("--feature-model", help="local transformers vision checkpoint for real data")
    p.add_argument("--reference", help="folder of held-out real images for real data (default for --data LATENTS: its source images)")
    p.add_argument("--image-size", type=int, default=None, help="resize + center-crop size of image folders (default: the reference's)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--prompts", help="text-conditional --ensemble: a UTF-8 file with one prompt per line (cycled to --n)")
    p.add_argument("--negative-prompt", default="", help="with --prompts: the guidance's unconditional branch (default: the empty caption)")
    p.add_argument("--clip-model", help="local transformers CLIP folder (model + processor): also report the CLIP score of prompted samples")
    p.add_argument("--grids", help="folder for one sample grid per prompt (prompted samples)")


def check_samples(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> None:
    """Before FID (whose matrix square root crashes on them): finite values, labels that name a class."""
    if not torch.isfinite(images).all():
        raise UsageError(f"samples hold {int((~torch.isfinite(images)).sum())} non-finite values (nan or inf); refusing to score them")
    if labels is not None and num_classes and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise UsageError(f"sample labels {int(labels.min())}..{int(labels.max())} are outside the classes 0..{num_classes - 1}")


def run(args) -> int:
    from ddm.data.latents import LatentDataset, is_latent_dir

    from ddm.checks import check_range, check_seed
    from ddm.io import check_json_output, output_lock

    check_range("--cfg", args.cfg)
    check_seed(args.seed)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {args.image_size}")
    if args.out:
        check_json_output(Path(args.out), EVAL_FORMAT)
    real_data = args.data != "digits"
    latents = LatentDataset(args.data) if real_data and is_latent_dir(args.data) else None
    if real_data and not (args.feature_model and (args.reference or latents)):
        raise UsageError(f"--data {args.data}: real data needs --feature-model PATH and --reference DIR (no downloads)")
    check_guidance_routing(args.guidance_routing)
    prompts = None
    if args.prompts:
        from ddm.data.captions import read_prompts_file

        if not args.ensemble:
            raise UsageError("--prompts goes with --ensemble (prompted --samples carry their prompts)")
        prompts = read_prompts_file(args.prompts)
    if args.clip_model and not (Path(args.clip_model) / "config.json").is_file():
        raise UsageError(f"--clip-model {args.clip_model}: not a folder with a config.json")
    if args.grids and Path(args.grids).exists() and not Path(args.grids).is_dir():
        raise UsageError(f"--grids {args.grids} exists and is not a folder")
    if args.ensemble and args.n < 2:
        raise UsageError(f"--n must be >= 2 for FID, got {args.n}")
    if args.ensemble and latents is not None:
        from ddm.data.vae import check_same_vae

        check_same_vae(model_meta(args.ensemble).get("vae"), f"the experts of {args.ensemble}", latents.vae, f"the latents {args.data}")
    if real_data:
        from ddm.data.images import ImageFolderDataset

        features, classifier, num_classes = pretrained_features(args.feature_model), None, 0
        default_size = latents.pixel_size if latents is not None else 224
        ref = ImageFolderDataset(args.reference or latents.index["source"], args.image_size or default_size)
        reference = (torch.stack([ref[i][0] for i in range(len(ref))]) + 1) / 2
        channels = 3
    else:
        from evaluation.digit_classifier import load_digit_classifier

        classifier = load_digit_classifier()
        features, num_classes, reference, channels = digit_features(classifier), 10, digits_reference(), 1
    prompt_index = None
    if args.samples:
        images, labels = load_samples(args.samples, channels, args.image_size or reference.shape[-1])
        prompts, prompt_index = prompted_samples(Path(args.samples)) or (None, None)
    elif prompts:
        images, prompt_index = generate_prompted(args.ensemble, args.n, prompts, args.negative_prompt, args.strategy, args.steps,
                                                 args.cfg, args.seed, guidance_routing=args.guidance_routing, device_map=args.expert_devices)
        labels = None
    else:
        images, labels = generate(args.ensemble, args.n, args.strategy, args.steps, args.cfg, args.seed,
                                  guidance_routing=args.guidance_routing, device_map=args.expert_devices)
    if prompts is None and (args.clip_model or args.grids):
        raise UsageError("--clip-model and --grids score prompted samples: give --prompts, or --samples from `ddm sample --prompts`")
    if prompts is not None and not real_data:
        from evaluation.text_metrics import prompt_labels

        labels = prompt_labels(prompts, prompt_index)  # the digit each prompt names, if every prompt names one
    if images.shape[1:] != reference.shape[1:]:
        raise UsageError(f"samples are {tuple(images.shape[1:])}, the reference set is {tuple(reference.shape[1:])}")
    check_samples(images, labels, num_classes)
    result = evaluate_samples(images, labels, reference, features, classifier, num_classes)
    result["reference"] = "digits held-out 20% (seed 0)" if not real_data else str(args.reference)
    if prompts is not None:
        from evaluation.text_metrics import clip_scores, write_prompt_grids

        result["prompts"] = prompts
        if args.clip_model:
            scores = clip_scores(images, [prompts[i] for i in prompt_index.tolist()], args.clip_model)
            result["clip_score"] = scores.mean().item()
            result["clip_score_per_prompt"] = [scores[prompt_index == i].mean().item() for i in range(len(prompts))]
        if args.grids:
            result["grids"] = [str(p) for p in write_prompt_grids(images, prompt_index, prompts, args.grids)]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))
    if args.out:
        with output_lock(Path(args.out), folder=False):
            atomic_write_json(Path(args.out), {"format": EVAL_FORMAT, **result})
    return 0
