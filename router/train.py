"""`ddm train-router`: learn p(k | x_t) on exactly the experts' noise path and sigma distribution.

For text-conditional experts the router learns p(k | x_t, t, text), conditioned on the captions' pooled embeddings
from the experts' own text encoder; 10% of them are replaced by the empty caption's so the router also serves
classifier-free guidance rows routed alone (`guidance_routing="per-row"`).

Cross-entropy against the island index k of x0 in S_k, with x_t = (1 - sigma) x0 + sigma eps and sigma
drawn from the experts' FlowConfig. With --balance, batches draw every island equally often and the logits
get log(pi_k / pi_k^train) so the router still predicts the posterior under the true prior pi_k = |S_k| / N.
Writes a `from_pretrained` directory: config.json + safetensors + router_metrics.json (top-1 accuracy per
sigma bucket: high at low noise, near the prior at sigma -> 1).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm import UsageError, command_args
from ddm.data.vae import check_same_vae
from ddm.models.experts import read_expert_meta
from ddm.flow import FlowConfig, add_noise, to_timestep
from ddm.io import atomic_write_json, check_owned, output_lock, replacing_dir
from ddm.partition.manifest import Manifest
from router.members import check_experts
from router.model import RouterModel, measured_flops

SIGMA_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def dataset_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) and labels (N,) of a small data set, in memory; a latent cache gives its latent
    means (the router learns where a sample came from, the encoder's small std does not matter for that)."""
    if hasattr(dataset, "rows"):
        return dataset.rows(range(len(dataset)))[0].float(), dataset.labels
    if hasattr(dataset, "images"):
        return dataset.images, dataset.labels
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), dataset.labels


def read_experts(manifest: Manifest, expert_dirs: list) -> tuple[FlowConfig, dict, dict]:
    """(flow, expert model config, expert.json) shared by all experts, checked against the manifest."""
    if not expert_dirs:
        raise UsageError("train-router needs --experts: the router must learn the experts' own noise path")
    metas = [read_expert_meta(p) for p in expert_dirs]
    configs = []
    for p in expert_dirs:
        try:
            configs.append(json.loads((Path(p) / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"expert {p} has no readable config.json: {e}") from None
    for config, p in zip(configs, expert_dirs):
        for key in ("sample_size", "in_channels", "patch_size"):
            value = config.get(key) if isinstance(config, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"expert {p}: config.json has {key}={value!r}, not a positive integer")
    check_experts(metas, configs, [str(p) for p in expert_dirs])
    meta = metas[0]
    check_same_vae(meta.get("vae"), f"experts {expert_dirs[0]}", manifest.extra.get("vae"), f"the data of manifest {manifest.data}")
    if meta["k"] != manifest.k or meta["manifest_fingerprint"] != manifest.fingerprint:
        raise UsageError(
            f"experts were trained on manifest {meta['manifest_fingerprint']} (K={meta['k']}), "
            f"not on this one ({manifest.fingerprint}, K={manifest.k})"
        )
    return FlowConfig.from_dict(meta["flow"]), configs[0], meta


def fit_router(
    images: torch.Tensor,
    labels: torch.Tensor,
    manifest: Manifest,
    flow: FlowConfig,
    num_classes: int,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    patch_size: int = 2,
    class_cond: bool = False,
    balance: bool = False,
    log_every: int = 0,
    text=None,
) -> RouterModel:
    """`text`: the experts' caption table (ddm/data/text_embeddings.py) for a text-conditioned router, else None."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init
    islands = manifest.assignments
    sizes = torch.bincount(islands, minlength=manifest.k).float()
    prior = sizes / sizes.sum()
    correction = None
    if balance:  # the training prior is uniform over non-empty islands
        train_prior = (sizes > 0).float() / (sizes > 0).sum()
        correction = torch.where(sizes > 0, prior.log() - train_prior.log(), torch.full_like(prior, -30.0)).tolist()
    router = RouterModel(
        num_experts=manifest.k, sample_size=images.shape[-1], in_channels=images.shape[1], patch_size=patch_size,
        hidden_dim=width, num_layers=layers, num_heads=heads, num_classes=num_classes if class_cond else None,
        logit_correction=correction, flow=flow.to_dict(), manifest_fingerprint=manifest.fingerprint,
        vae_hash=(manifest.extra.get("vae") or {}).get("hash"),
        text_dim=None if text is None else text.pooled.shape[1], text_encoder_hash=None if text is None else text.record["hash"],
    )
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    draw_weights = (1.0 / sizes)[islands] if balance else None
    router.train()
    for step in range(steps):
        if balance:
            idx = torch.multinomial(draw_weights, batch_size, replacement=True, generator=gen)
        else:
            idx = torch.randint(len(islands), (batch_size,), generator=gen)
        x0 = images[idx]
        sigma = flow.sample_sigmas(batch_size, generator=gen)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), sigma)
        class_labels = pooled = None
        if text is not None:  # 10% empty captions, as the experts' caption dropout
            drop = torch.rand(batch_size, generator=gen) < 0.1
            pooled = torch.where(drop[:, None], text.empty_pooled, text.pooled[idx])
        if class_cond:  # drop 10% of labels so the router also serves the CFG null-label rows
            drop = torch.rand(batch_size, generator=gen) < 0.1
            class_labels = torch.where(drop, torch.full_like(labels[idx], num_classes), labels[idx])
        # the correction is a constant offset: train on the plain logits of the (rebalanced) batches
        logits = router(x_t, to_timestep(sigma), class_labels, pooled) - router.prior_correction
        loss = F.cross_entropy(logits, islands[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"router step {step:5d}  loss {loss.item():.4f}")
    return router.eval().requires_grad_(False)


@torch.inference_mode()
def accuracy_by_sigma(router: RouterModel, images, labels, islands, flow: FlowConfig, num_classes: int, seed: int = 1234,
                      pooled: torch.Tensor | None = None) -> dict:
    """Top-1 accuracy of the router on every sample, with sigma uniform inside each bucket, vs the prior's."""
    gen = torch.Generator().manual_seed(seed)
    prior = torch.bincount(islands).float() / len(islands)
    class_labels = labels if router.config.num_classes else None
    rows = []
    for lo, hi in zip(SIGMA_BUCKETS[:-1], SIGMA_BUCKETS[1:]):
        sigma = lo + (hi - lo) * torch.rand(len(images), generator=gen)
        x_t = add_noise(images, torch.randn(images.shape, generator=gen), sigma)
        pred = router(x_t, to_timestep(sigma), class_labels, pooled).argmax(1)
        rows.append({"sigma": [lo, hi], "accuracy": (pred == islands).float().mean().item()})
    metrics = {"buckets": rows, "prior_accuracy": prior.max().item(), "num_samples": len(images), "training_flow": flow.to_dict()}
    if class_labels is not None:  # what the class alone tells: sum_c p(c) max_k p(k | c)
        joint = torch.zeros(num_classes, len(prior)).index_put_((labels, islands), torch.ones(len(labels)), accumulate=True)
        metrics["prior_accuracy_given_class"] = (joint.max(1).values.sum() / len(labels)).item()
    return metrics


def router_flop_ratio(router: RouterModel, expert_config: dict, meta: dict | None = None) -> dict:
    """Router FLOPs / expert FLOPs for one sample's forward (the expert is built from its config, no weights)."""
    from ddm.models.experts import MODEL_CLASSES, dummy_condition

    meta = meta or {"model_class": "DiTTransformer2DModel"}
    expert = MODEL_CLASSES[meta["model_class"]].from_config(expert_config)
    c, s = expert_config["in_channels"], expert_config["sample_size"]
    x, t, y = torch.zeros(1, c, s, s), torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
    text_length = (meta.get("text_encoder") or {}).get("max_length", 16)
    pooled = torch.zeros(1, router.config.text_dim) if router.config.text_dim else None
    r = measured_flops(router, x, t, y if router.config.num_classes else None, pooled)
    e = measured_flops(expert, x, timestep=t, **dummy_condition(expert, 1, text_length=text_length))
    return {"router_flops": r, "expert_flops": e, "router_over_expert": r / e}


def save_router(router: RouterModel, metrics: dict, out: str | Path) -> None:
    """Replace `out` whole, only if it is absent, empty or a router ddm wrote; refuse non-finite weights."""
    if not all(torch.isfinite(p).all() for p in router.parameters()):
        raise UsageError("router training diverged (non-finite weights); nothing was saved: lower --lr")
    with replacing_dir(Path(out), "router") as staging:
        router.save_pretrained(staging)
        atomic_write_json(staging / "router_metrics.json", metrics)


def print_metrics(metrics: dict) -> None:
    print("sigma bucket   top-1 accuracy")
    for row in metrics["buckets"]:
        lo, hi = row["sigma"]
        print(f"[{lo:.1f}, {hi:.1f})     {row['accuracy']:.3f}")
    print(f"prior (majority island): {metrics['prior_accuracy']:.3f}")
    if "prior_accuracy_given_class" in metrics:
        print(f"prior given the class (majority island per class): {metrics['prior_accuracy_given_class']:.3f}")
    if "router_over_expert" in metrics:
        print(f"router FLOPs / expert FLOPs per forward: {metrics['router_over_expert']:.3f}")


def experts_caption_table(dataset, meta: dict, class_cond):
    """The caption table of text-conditional experts (their own encoder's; refused if it is another), else None."""
    from ddm.data.text_embeddings import caption_table

    record = meta.get("text_encoder")
    if meta.get("conditioning", "class") != "text":
        return None
    if class_cond:
        raise UsageError("--class-cond: these experts are conditioned on text, not on classes")
    path = record["path"] if Path(record["path"]).is_dir() else record["abspath"]
    # empty captions allowed: the captions' hash tells whether they are the ones the experts were trained on
    table = caption_table(dataset, None if hasattr(dataset, "text_table") else path, allow_empty=True)
    if table.record["hash"] != record["hash"]:
        raise UsageError(f"the captions of {dataset.name} are embedded by text encoder {table.record['hash']}, "
                         f"the experts by {record['hash']} ({record['path']})")
    if table.record["captions_hash"] != record.get("captions_hash"):
        raise UsageError(f"the captions of {dataset.name} changed since the experts were trained on them")
    return table


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="partition manifest directory")
    p.add_argument("--experts", nargs="+", required=True, help="expert directories (their expert.json gives the noise path)")
    p.add_argument("--out", required=True, help="router folder: new, empty, or a router ddm wrote (replaced)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the init, the data draws and the noise")
    p.add_argument("--width", type=int, default=32, help="router hidden size")
    p.add_argument("--layers", type=int, default=2, help="router transformer layers")
    p.add_argument("--heads", type=int, default=2, help="attention heads per layer")
    p.add_argument(
        "--class-cond", action=argparse.BooleanOptionalAction, default=None,
        help="condition the router on the class label (default: on for class-conditional experts; sampling class c "
        "needs p(k | x_t, c), else a class is sent to an island that never saw it)",
    )
    p.add_argument("--balance", action="store_true", help="draw islands equally often (logits get the prior correction)")


def run(args) -> int:
    from ddm.checks import check_range, check_seed

    for name in ("steps", "batch_size", "width", "layers", "heads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.width % args.heads:
        raise UsageError(f"--width {args.width} is not divisible by --heads {args.heads}")
    check_range("--lr", args.lr, above=0)
    check_seed(args.seed)
    check_owned(Path(args.out), "router")
    manifest = Manifest.load(args.manifest)
    flow, expert_config, meta = read_experts(manifest, args.experts)
    if expert_config["sample_size"] % expert_config["patch_size"]:
        raise UsageError(f"expert sample size {expert_config['sample_size']} is not divisible by its patch size")
    dataset = manifest.load_dataset()
    text = experts_caption_table(dataset, meta, args.class_cond)
    images, labels = dataset_tensors(dataset)
    if tuple(images.shape[1:]) != (expert_config["in_channels"], expert_config["sample_size"], expert_config["sample_size"]):
        raise UsageError(f"data samples are {tuple(images.shape[1:])}, experts expect {expert_config['in_channels']}x{expert_config['sample_size']}")
    with output_lock(Path(args.out)):
        start = time.perf_counter()
        router = fit_router(
            images, labels, manifest, flow, meta["num_classes"], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, width=args.width, layers=args.layers, heads=args.heads, patch_size=expert_config["patch_size"],
            class_cond=meta["num_classes"] > 1 if args.class_cond is None else args.class_cond, balance=args.balance, log_every=max(1, args.steps // 10),
            text=text,
        )
        metrics = accuracy_by_sigma(router, images, labels, manifest.assignments, flow, meta["num_classes"],
                                    pooled=None if text is None else text.pooled)
        metrics.update(router_flop_ratio(router, expert_config, meta), train_seconds=time.perf_counter() - start, steps=args.steps)
        save_router(router, metrics, args.out)
    print_metrics(metrics)
    print(f"router saved to {args.out}")
    return 0


def train_router(**options) -> Path:
    """Python API of `ddm train-router`: the same options as keyword arguments (`manifest=..., experts=[...],
    out=...`), the same defaults and checks. Returns the router directory."""
    args = command_args(add_arguments, **options)
    run(args)
    return Path(args.out)
