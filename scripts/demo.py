"""The end-to-end demo (`make demo`): each stage is a small function, run in order, sharing one context dict.

Stages so far:
  1. partition  the embedded digits into K=4 balanced k-means islands        -> outputs/demo/manifest
  2. train      one expert per island, then the monolith on all the data      -> outputs/demo/experts/island-K, monolith
                at equal total training FLOPs: the monolith's batch is K x the expert batch, same steps.
Later stages (router, sample grid, video model, DualParal render, HTML page) append to STAGES.

Re-running reuses finished stages: an existing manifest with the same settings is kept, and an expert whose
training completed is not retrained (an interrupted one resumes from its checkpoint).
DEMO_FAST=1 shrinks everything (tiny models, few steps) to well under a minute, in outputs/demo-fast.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddm import UsageError  # noqa: E402
from ddm.cli import main as ddm  # noqa: E402

FAST = os.environ.get("DEMO_FAST") == "1"
SETTINGS = {
    "out": REPO / "outputs" / ("demo-fast" if FAST else "demo"),
    "k": 4,
    "seed": 0,
    "preset": "tiny" if FAST else "small",
    "steps": 20 if FAST else 250,
    "expert_batch": 16 if FAST else 32,
    "lr": 1e-3,  # few steps: a higher rate than the trainer's default, with a short warmup
    "warmup_steps": 2 if FAST else 25,
    "router_steps": 30 if FAST else 600,
    "sample_steps": 8 if FAST else 25,
    "fid_samples": 50 if FAST else 400,
}


def run_ddm(*argv) -> None:
    code = ddm([str(a) for a in argv])
    if code:
        sys.exit(code)  # ddm already printed the one-line error


def stage_partition(ctx: dict) -> None:
    manifest = ctx["out"] / "manifest"
    ctx["manifest"] = manifest
    meta_path = manifest / "manifest.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta["k"], meta["method"], meta["seed"]) == (ctx["k"], "balanced-kmeans", ctx["seed"]):
            print(f"reusing {manifest} (islands of {meta['sizes']} samples)")
            return
    run_ddm("partition", "--data", "digits", "--k", ctx["k"], "--balanced", "--seed", ctx["seed"], "--out", manifest)


def train_expert(ctx: dict, island: str, out: Path, batch_size: int) -> None:
    meta_path = out / "expert.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete") and meta.get("steps") == ctx["steps"]:
            print(f"reusing {out} (trained {meta['steps']} steps)")
            return
    run_ddm("train", "--manifest", ctx["manifest"], "--island", island, "--out", out, "--preset", ctx["preset"],
            "--steps", ctx["steps"], "--batch-size", batch_size, "--seed", ctx["seed"], "--lr", ctx["lr"],
            "--warmup-steps", ctx["warmup_steps"],
            "--checkpoint-every", max(ctx["steps"] // 4, 1), "--log-every", max(ctx["steps"] // 20, 1))


def stage_train(ctx: dict) -> None:
    experts = ctx["out"] / "experts"
    ctx["experts"] = [experts / f"island-{k}" for k in range(ctx["k"])]
    for k, out in enumerate(ctx["experts"]):
        train_expert(ctx, str(k), out, ctx["expert_batch"])
    ctx["monolith"] = experts / "monolith"
    train_expert(ctx, "all", ctx["monolith"], ctx["k"] * ctx["expert_batch"])


def stage_router(ctx: dict) -> None:
    ctx["router"] = router = ctx["out"] / "router"
    if (router / "router_metrics.json").is_file():
        print(f"reusing {router}")
        return
    run_ddm("train-router", "--manifest", ctx["manifest"], "--experts", *ctx["experts"], "--out", router,
            "--steps", ctx["router_steps"], "--seed", ctx["seed"])


def stage_sample(ctx: dict) -> None:
    """A grid through the top-1 ensemble (with routing statistics), then FID of ensemble vs monolith."""
    ctx["ensemble"] = ensemble = ctx["out"] / "ensemble"
    grid = ctx["out"] / "grid.png"
    if not (ensemble / "ensemble.json").is_file() or not grid.is_file():
        run_ddm("sample", "--router", ctx["router"], "--experts", *ctx["experts"], "--strategy", "top1",
                "--n", 40, "--steps", ctx["sample_steps"], "--cfg", 1.5, "--seed", ctx["seed"], "--out", grid,
                "--save-ensemble", ensemble)
    ctx["fid"] = {}
    for name, model in (("ensemble (top-1)", ensemble), ("monolith", ctx["monolith"])):
        out = ctx["out"] / f"eval-{'ensemble' if model == ensemble else 'monolith'}.json"
        if not out.is_file():
            run_ddm("eval", "--ensemble", model, "--n", ctx["fid_samples"], "--steps", ctx["sample_steps"],
                    "--cfg", 1.5, "--seed", ctx["seed"], "--out", out)
        ctx["fid"][name] = json.loads(out.read_text())
    for name, m in ctx["fid"].items():
        print(f"FID {name}: {m['fid']:.1f}  accuracy {m['accuracy']:.3f}  ({m['num_samples']} samples)")


STAGES = [stage_partition, stage_train, stage_router, stage_sample]


def main() -> int:
    ctx = dict(SETTINGS)
    start = time.perf_counter()
    for stage in STAGES:
        t = time.perf_counter()
        print(f"== {stage.__name__.removeprefix('stage_')}")
        stage(ctx)
        print(f"   {stage.__name__.removeprefix('stage_')} took {time.perf_counter() - t:.1f}s")
    print(f"demo finished in {time.perf_counter() - start:.1f}s -> {ctx['out']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
