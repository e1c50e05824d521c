"""`ddm sample`: an image grid through the router ensemble, plus the routing statistics of every step.

Writes OUT (PNG grid), OUT with .json (routing: per sample the expert used at every step, per step the mean
weights and the number of samples per expert) and OUT with .safetensors (images in [0, 1] + class labels,
readable by `ddm eval --samples`); `--save-ensemble DIR` also writes the ensemble directory. With CFG the
routing is reported for the conditional rows and for the null-label rows (`experts_uncond`), which follow the
conditional rows under `--guidance-routing conditional` (the default) and are routed alone under `per-row`.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import torch

from ddm import UsageError, command_args
from ddm.io import atomic_save_tensors, atomic_write_bytes, atomic_write_json
from router.strategies import DEFAULT_GUIDANCE_ROUTING, DEFAULT_STRATEGY, GUIDANCE_ROUTING, SPECS, check_guidance_routing

SAMPLE_FORMAT = "ddm-sample/1"  # in OUT.json (and OUT.safetensors' metadata): marks the three files as ours
MAX_SCALE = 64  # PNG upscale factor: a 64x grid of 8x8 digits is already 512 pixels a digit


def image_grid(images01: torch.Tensor, scale: int = 1, columns: int | None = None, labels: torch.Tensor | None = None) -> bytes:
    """PNG bytes of images (N, C, H, W) in [0, 1] tiled with 1-pixel gutters, upscaled by `scale` (nearest
    neighbour, so pixels stay sharp). `columns` defaults to a near-square grid; when every column holds one class
    of `labels`, a header row names it."""
    from PIL import Image, ImageDraw

    n, c, h, w = images01.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, img in enumerate(images01):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    arr = (canvas * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    column_classes = [set(labels[q::cols].tolist()) for q in range(cols)] if labels is not None else []
    if column_classes and all(len(k) == 1 for k in column_classes):
        header = 14
        framed = Image.new(im.mode, (im.width, im.height + header), 0)
        framed.paste(im, (0, header))
        draw = ImageDraw.Draw(framed)
        for q, (k,) in enumerate(column_classes):
            draw.text((q * (w + 1) * scale + scale + 2, 1), str(k), fill=255 if im.mode == "L" else (255, 255, 255))
        im = framed
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def routing_statistics(weights: list[torch.Tensor], labels: torch.Tensor, sigmas: torch.Tensor, cfg: bool, key: str = "class") -> dict:
    """weights: one (B, K) tensor per step (B = n, or 2n with CFG: conditional rows first); `labels` are each
    sample's class, or its prompt's index (key "prompt") for text experts."""
    n = len(labels)
    w = torch.stack(weights)  # steps, B, K
    cond = w[:, :n]
    chosen = cond.argmax(-1)  # steps, n (the expert with the largest weight)
    k = w.shape[-1]
    stats = {
        "num_experts": k,
        "steps": [
            {
                "sigma": float(s),
                "mean_weights": cond[i].mean(0).tolist(),
                "samples_per_expert": torch.bincount(chosen[i], minlength=k).tolist(),
                "weights": cond[i].tolist(),
            }
            for i, s in enumerate(sigmas)
        ],
        "samples": [{key: int(labels[j]), "experts": chosen[:, j].tolist()} for j in range(n)],
    }
    if cfg:
        uncond = w[:, n:].argmax(-1)
        for j, sample in enumerate(stats["samples"]):
            sample["experts_uncond"] = uncond[:, j].tolist()
    return stats


def add_arguments(p) -> None:
    p.add_argument("--ensemble", help="a pipeline folder saved by --save-ensemble (or an older ensemble directory)")
    p.add_argument("--router", help="router directory (with --experts)")
    p.add_argument("--experts", nargs="+", help="expert directories: any subset of the islands")
    p.add_argument("--strategy", default=None, help=f"{SPECS} (default {DEFAULT_STRATEGY}); see docs/ddm.md")
    p.add_argument("--guidance-routing", default=DEFAULT_GUIDANCE_ROUTING,
                   help=f"{' | '.join(GUIDANCE_ROUTING)} (default {DEFAULT_GUIDANCE_ROUTING}): with CFG, the null-label row "
                        "follows its conditional row's routing, or each row is routed alone")
    p.add_argument("--expert-devices", default=None,
                   help="put experts on several devices: cuda:0,cuda:1,... (one per expert, island order) or 0=cuda:0,2=cuda:1; "
                        "the router goes on the first")
    p.add_argument("--n", type=int, default=None, help="number of samples (default 64), or per prompt with --prompt/--prompts (default 4)")
    p.add_argument("--classes", type=int, nargs="+", help="class labels, cycled to n (default 0..C-1 cycled)")
    p.add_argument("--prompt", action="append", default=None, help="text-conditional experts: a prompt (repeat the flag for several)")
    p.add_argument("--prompts", default=None, help="text-conditional experts: a UTF-8 file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="the guidance's unconditional branch for every prompt (default: the empty caption)")
    p.add_argument("--text-encoder", default=None, help="folder of the experts' text encoder, if it moved (checked by hash)")
    p.add_argument("--steps", type=int, default=50, help="Euler sampling steps")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial noise and any sampled routing")
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG grid (nearest neighbour)")
    p.add_argument("--columns", type=int, default=None, help="grid columns (default: near-square); with as many columns as classes, one class per column, labelled")
    p.add_argument("--out", required=True, help="grid PNG path (OUT.json and OUT.safetensors go beside it; files ddm did not write are never replaced)")
    p.add_argument("--save-ensemble", help="also save the pipeline (router + experts + strategy + scheduler) as a diffusers folder here: new, empty, or a pipeline ddm wrote")


def check_outputs(out: Path) -> None:
    """OUT.png, OUT.json and OUT.safetensors are written together; overwrite them only if OUT.json says that ddm
    wrote them (a `ddm-sample` format field), so a run never replaces a user's file or another artifact's."""
    from ddm.io import check_json_output, check_writable

    for path in (out, out.with_suffix(".safetensors")):
        check_writable(path, "--out")
    check_json_output(out.with_suffix(".json"), SAMPLE_FORMAT)
    if not out.with_suffix(".json").exists():
        for path in (out, out.with_suffix(".safetensors")):
            if path.exists():
                raise UsageError(f"--out {out}: {path} exists and was not written by `ddm sample`; refusing to overwrite it")


def run(args) -> int:
    from ddm.checks import check_range, check_seed
    from ddm.io import check_owned, output_lock
    from router.ensemble import DDMEnsemble
    from router.pipeline import ensemble_pipeline, load_pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png path, got {args.out}")
    if bool(args.ensemble) == bool(args.router or args.experts):
        raise UsageError("give either --ensemble DIR or --router DIR --experts DIR...")
    if args.router and not args.experts or args.experts and not args.router:
        raise UsageError("--router and --experts go together")
    if args.columns is not None and args.columns < 1:
        raise UsageError(f"--columns must be >= 1, got {args.columns}")
    check_guidance_routing(args.guidance_routing)
    prompts = read_prompts(args)
    args.n = args.n if args.n is not None else (4 if prompts else 64)
    for name in ("n", "steps", "scale"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_range("--scale", args.scale, high=MAX_SCALE)
    check_range("--cfg", args.cfg)
    check_seed(args.seed)
    check_outputs(out)
    if args.save_ensemble:
        check_owned(Path(args.save_ensemble), "pipeline", "--save-ensemble")
    if args.ensemble:
        pipe = load_pipeline(args.ensemble, args.strategy, device_map=args.expert_devices, text_encoder=args.text_encoder)
    else:
        pipe = ensemble_pipeline(args.router, args.experts, args.strategy, device_map=args.expert_devices, text_encoder=args.text_encoder)
    ensemble = pipe.transformer
    if not isinstance(ensemble, DDMEnsemble):
        raise UsageError(f"--ensemble {args.ensemble} holds a single expert; `ddm sample` reports routing, so it needs an ensemble")
    if ensemble.text != bool(prompts):
        raise UsageError(f"{'--classes: ' if args.classes else ''}these experts are text-conditional: give --prompt or --prompts" if ensemble.text
                         else "--prompt/--prompts need text-conditional experts; these are class-conditional (use --classes)")
    if prompts:
        return sample_prompts(args, pipe, prompts, out)
    num_classes = ensemble.config.num_embeds_ada_norm
    bad = [c for c in args.classes or [] if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes {bad[0]} is outside 0..{num_classes - 1}")
    classes = torch.tensor(args.classes if args.classes else list(range(num_classes)))
    labels = classes.repeat(math.ceil(args.n / len(classes)))[: args.n]
    with output_lock(out, folder=False), output_lock(Path(args.save_ensemble)) if args.save_ensemble else contextlib.nullcontext():
        images = pipe(labels, args.steps, args.cfg, torch.Generator().manual_seed(args.seed), output_type="pt",
                      guidance_routing=args.guidance_routing).images.cpu()
        if not torch.isfinite(images).all():
            raise UsageError("sampling produced non-finite values (a diverged expert or router?); nothing was written")
        stats = routing_statistics([w.cpu() for w in ensemble.routing_weights], labels, pipe.scheduler.sigmas[:-1], args.cfg != 1.0)
        stats.update(format=SAMPLE_FORMAT, strategy=str(ensemble.strategy), islands_present=ensemble.islands, seed=args.seed, cfg=args.cfg,
                     guidance_routing=args.guidance_routing)
        atomic_write_json(out.with_suffix(".json"), stats)  # first: it marks the three files as ours
        atomic_write_bytes(out, image_grid(images, args.scale, args.columns, labels))
        atomic_save_tensors(out.with_suffix(".safetensors"), {"images": images, "labels": labels}, metadata={"format": SAMPLE_FORMAT})
        if args.save_ensemble:
            pipe.save_pretrained(args.save_ensemble)
    used = torch.tensor([e for s in stats["samples"] for e in s["experts"]])
    share = (torch.bincount(used, minlength=stats["num_experts"]).float() / len(used)).tolist()
    print(f"wrote {out} ({args.n} samples, strategy {ensemble.strategy}); expert share over steps: "
          + ", ".join(f"{k}: {s:.2f}" for k, s in enumerate(share)))
    return 0


def read_prompts(args) -> list[str]:
    """The prompts of --prompt / --prompts (checked before anything loads), [] for class sampling."""
    from ddm.data.captions import read_prompts_file

    if args.prompt and args.prompts:
        raise UsageError("give --prompt or --prompts, not both")
    if args.prompts:
        prompts = read_prompts_file(args.prompts)
    else:
        prompts = list(args.prompt or [])
    if prompts and args.classes:
        raise UsageError("--classes goes with class-conditional experts, --prompt/--prompts with text-conditional ones")
    return prompts


def sample_prompts(args, pipe, prompts: list[str], out: Path) -> int:
    """`--n` samples per prompt, one grid row per prompt; the .safetensors holds `prompt_index` instead of labels."""
    from ddm.io import output_lock

    ensemble = pipe.transformer
    index = torch.arange(len(prompts)).repeat_interleave(args.n)
    with output_lock(out, folder=False), output_lock(Path(args.save_ensemble)) if args.save_ensemble else contextlib.nullcontext():
        images = pipe(prompts, negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.cfg,
                      num_images_per_prompt=args.n, generator=torch.Generator().manual_seed(args.seed), output_type="pt",
                      guidance_routing=args.guidance_routing).images.cpu()
        if not torch.isfinite(images).all():
            raise UsageError("sampling produced non-finite values (a diverged expert or router?); nothing was written")
        stats = routing_statistics([w.cpu() for w in ensemble.routing_weights], index, pipe.scheduler.sigmas[:-1], args.cfg != 1.0, "prompt")
        stats.update(format=SAMPLE_FORMAT, strategy=str(ensemble.strategy), islands_present=ensemble.islands, seed=args.seed, cfg=args.cfg,
                     guidance_routing=args.guidance_routing, prompts=prompts, negative_prompt=args.negative_prompt,
                     text_encoder_seconds=pipe.encode_seconds)
        atomic_write_json(out.with_suffix(".json"), stats)  # first: it marks the three files as ours
        atomic_write_bytes(out, image_grid(images, args.scale, args.columns or args.n))
        atomic_save_tensors(out.with_suffix(".safetensors"), {"images": images, "prompt_index": index}, metadata={"format": SAMPLE_FORMAT})
        if args.save_ensemble:
            pipe.save_pretrained(args.save_ensemble)
    print(f"wrote {out} ({len(prompts)} prompts x {args.n} samples, strategy {ensemble.strategy})")
    return 0


def sample(**options) -> Path:
    """Python API of `ddm sample`: the same options as keyword arguments (`router=..., experts=[...], out=...` or
    `ensemble=...`), the same defaults and checks. Returns the grid's path (its .json and .safetensors lie beside it)."""
    args = command_args(add_arguments, **options)
    run(args)
    return Path(args.out)
