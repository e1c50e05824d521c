"""GPU check of the island trainer on latents: `ddm train` vs a plain bf16 loop, DiT-B/2 and DiT-XL/2 on 4x32x32
latents, global batch 256. Finishes in about 8 minutes on one H100 (a preset that would start past the budget is
skipped and reported as such).

    python scripts/gpu_train_check.py [--presets DiT-B/2 DiT-XL/2] [--steps 30] [--out docs/benchmarks/gpu_train.json]
    python scripts/gpu_train_check.py --tiny     # CPU, seconds: the same code on a tiny model (run by the tests)

Data: random 256x256 images encoded by `ddm encode` with a tiny random AutoencoderKL (downsampling 8, 4 channels):
the latents are the real path's, only their content is random, which a throughput check does not care about.
- plain: the same DiT, fused AdamW, bf16 autocast, all latents on the GPU, x0 = mean + std * eps, flow matching.
- ours: `ddm train --island all` (bf16 by default on a GPU, EMA, clipping, logging, checkpoint at the end);
  samples/s from its metrics.jsonl over the steady-state intervals.
Both accumulate over the same micro-batches (`MICRO_BATCH`: DiT-XL/2's 256 activations do not fit 80 GB at once).
Reported per preset: samples/s of both and their ratio (target >= 0.97), TFLOP/s achieved counting forward +
backward as 3 forwards (FlopCounterMode, 2 FLOPs per multiply-add), peak memory of each, and for the first preset
the host syncs per training step of ours (CUDA sync debug mode, runs of 10 and 20 steps subtracted).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddm import UsageError, run_reporting_usage_errors  # noqa: E402
from ddm.data import load_dataset  # noqa: E402
from ddm.flow import FlowConfig, add_noise, to_timestep, velocity_target  # noqa: E402
from ddm.io import atomic_write_json  # noqa: E402
from ddm.models.experts import build_dit, forward_flops  # noqa: E402
from frontends.cli import main as ddm_main  # noqa: E402

BUDGET_S = 8 * 60
MICRO_BATCH = {"DiT-XL/2": 128}  # per forward; others take the whole batch at once
SYNC_WARNING = "synchroniz"


def latent_cache(root: Path, images: int, image_size: int, vae_blocks: int, workers: int | None) -> Path:
    """Random images, encoded by a tiny random AutoencoderKL with 2**(vae_blocks-1) downsampling, 4 channels."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,) * vae_blocks, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                  up_block_types=("UpDecoderBlock2D",) * vae_blocks, latent_channels=4, norm_num_groups=4, layers_per_block=1,
                  sample_size=image_size).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for i in range(images):
        (root / "images" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(root / "images" / f"c{i % 10}" / f"{i}.png")
    if ddm_main(["encode", "--data", str(root / "images"), "--vae", str(root / "vae"), "--image-size", str(image_size),
                 "--out", str(root / "latents"), "--flip", "--batch-size", "64", *(["--workers", str(workers)] if workers is not None else [])]):
        raise SystemExit(2)
    return root / "latents"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # the previous run's model and optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def plain_loop(data_dir: Path, preset: str, batch: int, micro: int, steps: int, device: torch.device) -> float:
    """samples/s after the first fifth of the steps, of the simplest bf16 flow-matching loop."""
    data = load_dataset(str(data_dir))
    means, stds = (t.to(device) for t in data.rows(range(len(data))))
    labels = data.labels.clamp_min(0).to(device)
    torch.manual_seed(0)
    model = build_dit(preset, data.image_size, data.channels, data.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    flow, bf16 = FlowConfig(), device.type == "cuda"
    warmup = steps // 5
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        for _ in range(batch // micro):
            idx = torch.randint(0, len(data), (micro,), device=device)
            x0 = means[idx].float() + stds[idx].float() * torch.randn(micro, *means.shape[1:], device=device)
            noise, sigma = torch.randn_like(x0), flow.sample_sigmas(micro, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                pred = model(add_noise(x0, noise, sigma), timestep=to_timestep(sigma), class_labels=labels[idx]).sample
            F.mse_loss(pred.float(), velocity_target(x0, noise)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return (steps - warmup) * batch / (time.perf_counter() - start)


def our_trainer(manifest: Path, out: Path, preset: str, batch: int, micro: int, steps: int, log_every: int) -> list[dict]:
    code = ddm_main(["train", "--manifest", str(manifest), "--island", "all", "--out", str(out), "--preset", preset,
                     "--batch-size", str(batch), "--grad-accum", str(batch // micro), "--steps", str(steps), "--lr", "1e-4",
                     "--log-every", str(log_every), "--checkpoint-every", str(steps)])
    if code:
        raise SystemExit(code)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # DiT-XL/2's state is ~12 GB
    return records


def steady_samples_per_s(records: list[dict], batch: int) -> float:
    steady = records[1:]
    seconds = sum((r["step"] - p["step"]) * batch / r["samples_per_s"] for p, r in zip(records, steady))
    return (steady[-1]["step"] - records[0]["step"]) * batch / seconds


def syncs_per_step(manifest: Path, root: Path, preset: str, batch: int, micro: int) -> float:
    """Host syncs of ours per training step: CUDA sync warnings of a 20-step run minus those of a 10-step run (both
    log and checkpoint once, at the end)."""
    counts = []
    for steps in (10, 20):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                our_trainer(manifest, root / f"sync{steps}", preset, batch, micro, steps, log_every=steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum(SYNC_WARNING in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["DiT-B/2", "DiT-XL/2"], help="DiT presets to measure")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--steps", type=int, default=30, help="per measurement; the first fifth is warm-up")
    p.add_argument("--images", type=int, default=1024, help="random images encoded (x2 with their mirror images)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny DiT on 4x8x8 latents, batch 8, 10 steps")
    p.add_argument("--out", default=None, help="JSON results (default docs/benchmarks/gpu_train.json; with --tiny, nothing)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.tiny:
        args.presets, args.batch_size, args.steps, args.images = ["tiny"], 8, 10, 16
        device, image_size, vae_blocks = torch.device("cpu"), 32, 3
    else:
        if not torch.cuda.is_available():
            raise UsageError("gpu_train_check.py needs a CUDA GPU (use --tiny for the CPU smoke run)")
        device, image_size, vae_blocks = torch.device("cuda"), 256, 4
    if args.steps < 10 or args.steps % 5:
        raise UsageError(f"--steps {args.steps} must be a multiple of 5 and at least 10")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        latents = latent_cache(root, args.images, image_size, vae_blocks, 0 if args.tiny else None)
        if ddm_main(["partition", "--data", str(latents), "--k", "1", "--random", "--out", str(root / "manifest")]):
            return 2
        data = load_dataset(str(latents))
        for n, preset in enumerate(args.presets):
            if time.perf_counter() - started > BUDGET_S * 0.6:
                rows.append({"preset": preset, "skipped": "time budget"})
                continue
            micro = MICRO_BATCH.get(preset, args.batch_size)
            flops = forward_flops(build_dit(preset, data.image_size, data.channels, data.num_classes), (data.channels, data.image_size, data.image_size))
            reset_peak(device)
            plain = plain_loop(latents, preset, args.batch_size, micro, args.steps, device)
            plain_peak = peak_gib(device)
            reset_peak(device)
            records = our_trainer(root / "manifest", root / "ours", preset, args.batch_size, micro, args.steps, args.steps // 5)
            ours, ours_peak = steady_samples_per_s(records, args.batch_size), peak_gib(device)
            row = {
                "preset": preset, "latents": f"{data.channels}x{data.image_size}x{data.image_size}", "batch_size": args.batch_size,
                "micro_batch": micro, "forward_gflops_per_sample": round(flops / 1e9, 4),
                "plain_samples_per_s": round(plain, 1), "ours_samples_per_s": round(ours, 1), "ratio": round(ours / plain, 3),
                "plain_tflops": round(3 * flops * plain / 1e12, 1), "ours_tflops": round(3 * flops * ours / 1e12, 1),
                "plain_peak_gib": plain_peak and round(plain_peak, 2), "ours_peak_gib": ours_peak and round(ours_peak, 2),
            }
            if n == 0 and device.type == "cuda":
                row["ours_host_syncs_per_step"] = syncs_per_step(root / "manifest", root, preset, args.batch_size, micro)
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--tiny smoke run)",
        "torch": torch.__version__,
        "command": "python scripts/gpu_train_check.py" + (" --tiny" if args.tiny else f" --presets {' '.join(args.presets)} --steps {args.steps}"),
        "seconds": round(time.perf_counter() - started, 1),
        "target_ratio": 0.97,
        "rows": rows,
    }
    print("| preset | plain samples/s | ours samples/s | ours/plain | plain TFLOP/s | ours TFLOP/s | plain peak GiB | ours peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['preset']} | skipped ({r['skipped']}) |||||||")
        else:
            print(f"| {r['preset']} | {r['plain_samples_per_s']} | {r['ours_samples_per_s']} | {r['ratio']} | {r['plain_tflops']} | "
                  f"{r['ours_tflops']} | {r['plain_peak_gib']} | {r['ours_peak_gib']} |")
    print(f"{result['device']}, {result['seconds']} s")
    out = args.out or (None if args.tiny else str(REPO / "docs" / "benchmarks" / "gpu_train.json"))
    if out:
        atomic_write_json(Path(out), result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_usage_errors(main))
