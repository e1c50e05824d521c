"""The end-to-end demo (`make demo`): each stage is a small function, run in order, sharing one context dict.

Stages:
  1. partition    the embedded digits into K=4 balanced k-means islands      -> outputs/demo/manifest
  2. train        one expert per island, then the monolith on all the data    -> outputs/demo/experts/island-K, monolith
                  at equal total training FLOPs: the monolith's batch is K x the expert batch, same steps.
  3. router       the router on the experts' noise path                       -> outputs/demo/router
  4. sample       a top-1 grid with routing statistics, the ensemble dir, FID -> outputs/demo/grid.png, ensemble/
  5. video_model  the shipped video expert (ddm/assets/video/quick), copied    -> outputs/demo/video-model
  6. video        a 60 s DualParal render of it on 2 processes, with the settings it carries, + its scores
                  (fidelity, seams, drift, motion)                            -> outputs/demo/video.mp4
  7. text         text-to-image DDM on the captioned digits: islands of caption embeddings, PixArt experts
                  and a monolith conditioned on the embedded text encoder, a router on the pooled prompt,
                  prompted grids and scores of ensemble and monolith             -> outputs/demo/text/
  8. page         everything on one page, with frame strips and the motion curve -> outputs/demo/index.html

The video model is not trained here: it took about three and a half hours on one CPU core, far more than the demo may
(docs/video.md has the commands that made it, how long they took, and its scores).

Re-running reuses finished stages: an existing manifest with the same settings is kept, and an expert whose
training completed is not retrained (an interrupted one resumes from its checkpoint).
--fast (or DEMO_FAST=1) shrinks everything (tiny models, few steps), in outputs/demo-fast.
--out DIR (or DEMO_OUT=DIR) writes somewhere else (the tests use it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ddm import run_reporting_usage_errors
from frontends.cli import HelpFormatter, main as ddm  # noqa: E402
from tqdm import tqdm  # noqa: E402

from frontends.demo_page import stage_page  # noqa: E402



class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The stage list as written, and every flag's default."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--fast", action="store_true", default=os.environ.get("DEMO_FAST") == "1",
                   help="tiny models and few steps (also DEMO_FAST=1)")
    p.add_argument("--out", type=Path, default=os.environ.get("DEMO_OUT"),
                   help="output folder, also DEMO_OUT (default: outputs/demo, or outputs/demo-fast with --fast)")
    return p.parse_args()


ARGS = parse_args()  # at import: the settings below depend on it, and nothing imports this script
FAST = ARGS.fast
SETTINGS = {
    "out": Path(ARGS.out or REPO / "outputs" / ("demo-fast" if FAST else "demo")),
    "k": 4,
    "seed": 0,
    "preset": "tiny" if FAST else "small",
    "steps": 20 if FAST else 250,
    "expert_batch": 16 if FAST else 32,
    "lr": 1e-3,  # few steps: a higher rate than the trainer's default, with a short warmup
    "warmup_steps": 2 if FAST else 25,
    "router_steps": 30 if FAST else 2000,
    "sample_steps": 8 if FAST else 25,
    "fid_samples": 50 if FAST else 400,
    "shipped_video_model": REPO / "ddm" / "assets" / "video" / "quick",
    "video_prompt": "a 3 moving right",
    "video_seconds": 4 if FAST else 60,
    "text_k": 2,
    "text_steps": 20 if FAST else 250,
    "text_lr": 3e-3,  # cross-attention to the caption learns slower than DiT's class embedding (docs/ddm.md)
    "text_router_steps": 30 if FAST else 500,
    "text_eval_samples": 40 if FAST else 200,
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


def train_expert(ctx: dict, island: str, out: Path, batch_size: int, manifest: Path | None = None,
                 modality: str = "image", steps: int | None = None, lr: float | None = None,
                 warmup_steps: int | None = None, ema_decay: float = 0.999) -> None:
    steps = steps or ctx["steps"]
    meta_path = out / "expert.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete") and meta.get("steps") == steps:
            print(f"reusing {out} (trained {meta['steps']} steps)")
            return
    run_ddm("train", "--manifest", manifest or ctx["manifest"], "--island", island, "--out", out,
            "--modality", modality, "--preset", ctx["preset"] if modality in ("image", "text") else "small",
            "--steps", steps, "--batch-size", batch_size, "--seed", ctx["seed"], "--lr", lr or ctx["lr"],
            "--warmup-steps", min(warmup_steps or ctx["warmup_steps"], steps), "--ema-decay", ema_decay,
            "--checkpoint-every", max(steps // 4, 1), "--log-every", max(steps // 20, 1))


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
    if not (ensemble / "model_index.json").is_file() or not grid.is_file():
        run_ddm("sample", "--router", ctx["router"], "--experts", *ctx["experts"], "--strategy", "top1",
                "--n", 40, "--columns", 10, "--scale", 8, "--steps", ctx["sample_steps"], "--cfg", 1.5, "--seed", ctx["seed"], "--out", grid,
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


def stage_video_model(ctx: dict) -> None:
    """The shipped video expert, copied so the app's default folder (outputs/demo/video-model) holds a model."""
    import filecmp
    import shutil

    ctx["video_model"] = out = ctx["out"] / "video-model"
    shipped = ctx["shipped_video_model"]
    if out.is_dir() and (out / "expert.json").is_file() and not filecmp.dircmp(shipped, out).diff_files:
        print(f"reusing {out}")
        return
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns("raw", ".*"))


def stage_video(ctx: dict) -> None:
    """60 s through DualParal on 2 processes (rank 0 is this process) with the model's settings, then its scores."""
    from parallel_infer.api import render_video

    model = ctx["video_model"]
    ctx["video"] = video = ctx["out"] / "video.mp4"
    if not video.is_file():
        bar = tqdm(desc="DualParal blocks", unit="block")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        render_video(model, ctx["video_prompt"], video, seconds=ctx["video_seconds"], seed=ctx["seed"], ranks=2,
                     threads=1, progress_callback=progress)
        bar.close()
    scores = ctx["out"] / "video-scores.json"
    if not scores.is_file():
        run_ddm("eval-video", video, "--out", scores)
    ctx["video_record"] = json.loads(video.with_suffix(".json").read_text())
    ctx["video_scores"] = json.loads(scores.read_text())["results"][0]


def stage_text(ctx: dict) -> None:
    """Text-to-image DDM: the digits with generated captions, embedded by the shipped text encoder; islands of
    caption embeddings, a PixArt expert per island and a monolith (equal FLOPs), the router on the pooled prompt,
    then a prompted grid (one row per prompt) and FID / accuracy / per-prompt grids of ensemble and monolith."""
    from ddm.data.captions import DIGIT_NAMES

    text = ctx["out"] / "text"
    prompts = text / "prompts.txt"
    text.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"a handwritten {name}\n" for name in DIGIT_NAMES))
    manifest = text / "manifest"
    if not (manifest / "manifest.json").is_file():
        run_ddm("partition", "--data", "digits", "--k", ctx["text_k"], "--features", "text", "--seed", ctx["seed"], "--out", manifest)
    experts = [text / "experts" / f"island-{k}" for k in range(ctx["text_k"])]
    for k, out in enumerate(experts):
        train_expert(ctx, str(k), out, ctx["expert_batch"], manifest, "text", ctx["text_steps"], ctx["text_lr"])
    monolith = text / "experts" / "monolith"
    train_expert(ctx, "all", monolith, ctx["text_k"] * ctx["expert_batch"], manifest, "text", ctx["text_steps"], ctx["text_lr"])
    router = text / "router"
    if not (router / "router_metrics.json").is_file():
        run_ddm("train-router", "--manifest", manifest, "--experts", *experts, "--out", router,
                "--steps", ctx["text_router_steps"], "--seed", ctx["seed"])
    ensemble, grid = text / "ensemble", text / "grid.png"
    if not (ensemble / "model_index.json").is_file() or not grid.is_file():
        run_ddm("sample", "--router", router, "--experts", *experts, "--strategy", "top1", "--prompts", prompts,
                "--n", 6, "--scale", 8, "--steps", ctx["sample_steps"], "--cfg", 2.0, "--seed", ctx["seed"], "--out", grid,
                "--save-ensemble", ensemble)
    ctx["text"] = {"dir": text, "manifest": manifest, "experts": experts, "monolith": monolith, "router": router, "scores": {}}
    for name, model in (("ensemble (top-1)", ensemble), ("monolith", monolith)):
        tag = "ensemble" if model == ensemble else "monolith"
        out = text / f"eval-{tag}.json"
        if not out.is_file():
            run_ddm("eval", "--ensemble", model, "--prompts", prompts, "--n", ctx["text_eval_samples"], "--steps", ctx["sample_steps"],
                    "--cfg", 2.0, "--seed", ctx["seed"], "--grids", text / f"grids-{tag}", "--out", out)
        ctx["text"]["scores"][name] = json.loads(out.read_text())
    for name, m in ctx["text"]["scores"].items():
        print(f"text {name}: FID {m['fid']:.1f}  accuracy of the prompted digit {m['accuracy']:.3f}")


STAGES = [stage_partition, stage_train, stage_router, stage_sample, stage_video_model, stage_video, stage_text, stage_page]


def main() -> int:
    ctx = dict(SETTINGS)
    ctx["start"] = start = time.perf_counter()
    for stage in STAGES:
        t = time.perf_counter()
        print(f"== {stage.__name__.removeprefix('stage_')}")
        stage(ctx)
        print(f"   {stage.__name__.removeprefix('stage_')} took {time.perf_counter() - t:.1f}s")
    print(f"demo finished in {time.perf_counter() - start:.1f}s -> {ctx['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_usage_errors(main))
