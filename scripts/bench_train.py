"""Island trainer throughput vs a minimal plain PyTorch loop (same DiT, batch, fused AdamW; no EMA, logging, clipping).

    OMP_NUM_THREADS=1 python scripts/bench_train.py [--data digits|latents|LATENT_DIR] [--preset small] [--batch-size 64]
                                                    [--steps 150] [--repeats 3]

Both run in this process, alternating (plain, ours, plain, ours, ...) so that load from other processes hits
both alike. Ours is `ddm train` itself; its samples/s is read from its metrics.jsonl over the steady-state
intervals (the first interval, with the one-off start-up, is left out). The best repeat of each is compared.
Data: the digits; a latent directory (`ddm encode`); or `latents`: 512 random 32x32 images encoded here by a
tiny random AutoencoderKL (downsampling 4) into 4x8x8 latents. On latents both loops draw x0 = mean + std * eps.
Prints a table and writes docs/benchmarks/train.json (train_latents.json for latents).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddm import UsageError  # noqa: E402
from ddm import run_reporting_usage_errors
from frontends.cli import main as ddm_main  # noqa: E402
from ddm.data import load_dataset  # noqa: E402
from ddm.models.experts import build_dit  # noqa: E402
from ddm.flow import FlowConfig, add_noise, to_timestep, velocity_target  # noqa: E402
from ddm.io import atomic_write_json  # noqa: E402

INTERVALS = 5


def tiny_latent_cache(root: Path) -> Path:
    """512 random 32x32 images in 4 classes, encoded by a random AutoencoderKL into 4x8x8 latents."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for i in range(512):
        (root / "images" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"c{i % 4}" / f"{i}.png")
    if ddm_main(["encode", "--data", str(root / "images"), "--vae", str(root / "vae"), "--image-size", "32", "--out", str(root / "latents"),
                 "--workers", "0"]):
        raise SystemExit(2)
    return root / "latents"


def plain_loop(data_spec: str, preset: str, batch_size: int, steps: int, lr: float) -> float:
    """samples/s of the steady-state steps of the simplest flow-matching loop."""
    data = load_dataset(data_spec)
    if hasattr(data, "rows"):  # latents: all in memory, a fresh draw from mean and std per step
        means, stds = data.rows(range(len(data)))

        def batch(idx):
            return means[idx].float() + stds[idx].float() * torch.randn(len(idx), *means.shape[1:])
    else:
        def batch(idx):
            return data.images[idx]
    torch.manual_seed(0)
    model = build_dit(preset, data.image_size, data.channels, data.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # as ours: the fused kernel where torch has one
    flow = FlowConfig()
    warmup = steps // INTERVALS
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(0, len(data), (batch_size,))
        x0, labels = batch(idx), data.labels[idx]
        noise, sigma = torch.randn_like(x0), flow.sample_sigmas(batch_size)
        pred = model(add_noise(x0, noise, sigma), timestep=to_timestep(sigma), class_labels=labels).sample
        loss = F.mse_loss(pred, velocity_target(x0, noise))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - warmup) * batch_size / (time.perf_counter() - start)


def our_trainer(manifest: Path, out: Path, preset: str, batch_size: int, steps: int, lr: float) -> float:
    code = ddm_main(["train", "--manifest", str(manifest), "--island", "all", "--out", str(out), "--preset", preset,
                     "--batch-size", str(batch_size), "--steps", str(steps), "--lr", str(lr),
                     "--log-every", str(steps // INTERVALS), "--checkpoint-every", str(steps)])
    if code:
        raise SystemExit(code)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]
    seconds = sum((r["step"] - p["step"]) * batch_size / r["samples_per_s"] for p, r in zip(records, steady))
    return (steady[-1]["step"] - records[0]["step"]) * batch_size / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", help="digits, latents (a small cache made here) or a latent directory")
    p.add_argument("--preset", default="small", help="DiT preset of both loops")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best is reported")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of both loops")
    p.add_argument("--out", default=None, help="default: docs/benchmarks/train.json (train_latents.json on latents)")
    args = p.parse_args()
    if args.steps < 2 * INTERVALS or args.steps % INTERVALS:
        raise UsageError(f"--steps {args.steps} must be a multiple of {INTERVALS} and at least {2 * INTERVALS}")
    if args.repeats < 1 or args.batch_size < 1:
        raise UsageError(f"--repeats {args.repeats} and --batch-size {args.batch_size} must be positive")

    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(tiny_latent_cache(Path(tmp))) if args.data == "latents" else args.data
        manifest = Path(tmp) / "manifest"
        if ddm_main(["partition", "--data", data, "--k", "1", "--random", "--out", str(manifest)]):
            return 2
        for r in range(args.repeats):
            plain.append(plain_loop(data, args.preset, args.batch_size, args.steps, args.lr))
            ours.append(our_trainer(manifest, Path(tmp) / f"run{r}", args.preset, args.batch_size, args.steps, args.lr))
    ratio = max(ours) / max(plain)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "OMP_NUM_THREADS={} python scripts/bench_train.py --data {} --preset {} --batch-size {} --steps {} --repeats {}".format(
            os.environ.get("OMP_NUM_THREADS", "unset"), args.data, args.preset, args.batch_size, args.steps, args.repeats),
        "device": f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "data": args.data,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "plain_samples_per_s": [round(x, 1) for x in plain],
        "ours_samples_per_s": [round(x, 1) for x in ours],
        "plain_best": round(max(plain), 1),
        "ours_best": round(max(ours), 1),
        "ours_median_over_plain_median": round(statistics.median(ours) / statistics.median(plain), 3),
        "ratio_best": round(ratio, 3),
        "target": 0.95,
    }
    print(f"{'loop':<28}{'best samples/s':>16}{'all repeats':>40}")
    print(f"{'plain PyTorch':<28}{max(plain):>16.1f}{str(result['plain_samples_per_s']):>40}")
    print(f"{'ddm train (EMA, logging...)':<28}{max(ours):>16.1f}{str(result['ours_samples_per_s']):>40}")
    print(f"ours / plain = {ratio:.3f} (target >= 0.95)")
    out = Path(args.out or REPO / "docs" / "benchmarks" / ("train.json" if args.data == "digits" else "train_latents.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_usage_errors(main))
