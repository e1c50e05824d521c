"""`ddm sample`: an image grid through the router ensemble, plus the routing statistics of every step.

Writes OUT (PNG grid), OUT with .json (routing: per sample the expert used at every step, per step the mean
weights and the number of samples per expert) and OUT with .safetensors (images in [0, 1] + class labels,
readable by `ddm eval --samples`); `--save-ensemble DIR` also writes the ensemble directory. With CFG the
routing is reported for the conditional rows and for the null-label rows (`experts_uncond`), which follow the
conditional rows under `--guidance-routing conditional` (the default) and are routed alone under `per-row`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ddm import UsageError
from ddm.io import atomic_save_tensors, atomic_write_bytes, atomic_write_json
from router.strategies import DEFAULT_GUIDANCE_ROUTING, DEFAULT_STRATEGY, GUIDANCE_ROUTING, SPECS, check_guidance_routing


def image_grid(images01: torch.Tensor, scale: int = 1) -> bytes:
    """PNG bytes of images (N, C, H, W) in [0, 1] tiled on a near-square grid with 1-pixel gutters."""
    from PIL import Image

    n, c, h, w = images01.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, img in enumerate(images01):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    arr = (canvas * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def routing_statistics(weights: list[torch.Tensor], labels: torch.Tensor, sigmas: torch.Tensor, cfg: bool) -> dict:
    """weights: one (B, K) tensor per step (B = n, or 2n with CFG: conditional rows first)."""
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
        "samples": [{"class": int(labels[j]), "experts": chosen[:, j].tolist()} for j in range(n)],
    }
    if cfg:
        uncond = w[:, n:].argmax(-1)
        for j, sample in enumerate(stats["samples"]):
            sample["experts_uncond"] = uncond[:, j].tolist()
    return stats


def load_ensemble(args):
    from router.ensemble import DDMEnsemble

    if args.ensemble:
        return DDMEnsemble.from_pretrained(args.ensemble, strategy=args.strategy, device_map=args.expert_devices)
    return DDMEnsemble.from_dirs(args.router, args.experts, args.strategy or DEFAULT_STRATEGY, device_map=args.expert_devices)


def add_arguments(p) -> None:
    p.add_argument("--ensemble", help="an ensemble directory (saved by DDMEnsemble.save_pretrained)")
    p.add_argument("--router", help="router directory (with --experts)")
    p.add_argument("--experts", nargs="+", help="expert directories: any subset of the islands")
    p.add_argument("--strategy", default=None, help=f"{SPECS} (default {DEFAULT_STRATEGY}); see docs/ddm.md")
    p.add_argument("--guidance-routing", default=DEFAULT_GUIDANCE_ROUTING,
                   help=f"{' | '.join(GUIDANCE_ROUTING)} (default {DEFAULT_GUIDANCE_ROUTING}): with CFG, the null-label row "
                        "follows its conditional row's routing, or each row is routed alone")
    p.add_argument("--expert-devices", default=None,
                   help="put experts on several devices: cuda:0,cuda:1,... (one per expert, island order) or 0=cuda:0,2=cuda:1; "
                        "the router goes on the first")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--classes", type=int, nargs="+", help="class labels, cycled to n (default 0..C-1 cycled)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the PNG grid")
    p.add_argument("--out", required=True, help="grid PNG path")
    p.add_argument("--save-ensemble", help="also save the ensemble (router + experts + strategy) to this directory")


def run(args) -> int:
    from router.pipeline import make_pipeline

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png path, got {args.out}")
    if bool(args.ensemble) == bool(args.router or args.experts):
        raise UsageError("give either --ensemble DIR or --router DIR --experts DIR...")
    if args.router and not args.experts or args.experts and not args.router:
        raise UsageError("--router and --experts go together")
    check_guidance_routing(args.guidance_routing)
    for name in ("n", "steps", "scale"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    ensemble = load_ensemble(args)
    num_classes = ensemble.config.num_embeds_ada_norm
    classes = torch.tensor(args.classes if args.classes else list(range(num_classes)))
    labels = classes.repeat(math.ceil(args.n / len(classes)))[: args.n]
    pipe = make_pipeline(ensemble, ensemble.metas[0]["flow"]["shift"])
    images = pipe(labels, args.steps, args.cfg, torch.Generator().manual_seed(args.seed), output_type="pt",
                  guidance_routing=args.guidance_routing).images.cpu()
    stats = routing_statistics([w.cpu() for w in ensemble.routing_weights], labels, pipe.scheduler.sigmas[:-1], args.cfg != 1.0)
    stats.update(strategy=str(ensemble.strategy), islands_present=ensemble.islands, seed=args.seed, cfg=args.cfg,
                 guidance_routing=args.guidance_routing)
    atomic_write_bytes(out, image_grid(images, args.scale))
    atomic_write_json(out.with_suffix(".json"), stats)
    atomic_save_tensors(out.with_suffix(".safetensors"), {"images": images, "labels": labels})
    if args.save_ensemble:
        ensemble.save_pretrained(args.save_ensemble)
    used = torch.tensor([e for s in stats["samples"] for e in s["experts"]])
    share = (torch.bincount(used, minlength=stats["num_experts"]).float() / len(used)).tolist()
    print(f"wrote {out} ({args.n} samples, strategy {ensemble.strategy}); expert share over steps: "
          + ", ".join(f"{k}: {s:.2f}" for k, s in enumerate(share)))
    return 0
