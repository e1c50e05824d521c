"""Island trainer throughput vs a minimal plain PyTorch loop (same DiT, batch, AdamW; no EMA, logging, clipping).

    OMP_NUM_THREADS=2 python scripts/bench_train.py [--preset small] [--batch-size 64] [--steps 150] [--repeats 3]

Both run in this process on the digits, alternating (plain, ours, plain, ours, ...) so that load from other
processes hits both alike. Ours is `ddm train` itself; its samples/s is read from its metrics.jsonl over the
steady-state intervals (the first interval, with the one-off start-up, is left out). The best repeat of each
is compared. Prints a table and writes docs/benchmarks/train.json.
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
from ddm.data.images import DigitsDataset  # noqa: E402
from ddm.models.experts import build_dit  # noqa: E402
from ddm.flow import FlowConfig, add_noise, to_timestep, velocity_target  # noqa: E402
from ddm.io import atomic_write_json  # noqa: E402

INTERVALS = 5


def plain_loop(preset: str, batch_size: int, steps: int, lr: float) -> float:
    """samples/s of the steady-state steps of the simplest flow-matching loop."""
    data = DigitsDataset()
    torch.manual_seed(0)
    model = build_dit(preset, 8, 1, data.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    flow = FlowConfig()
    warmup = steps // INTERVALS
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(0, len(data), (batch_size,))
        x0, labels = data.images[idx], data.labels[idx]
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "train.json"))
    args = p.parse_args()
    if args.steps < 2 * INTERVALS or args.steps % INTERVALS:
        raise UsageError(f"--steps {args.steps} must be a multiple of {INTERVALS} and at least {2 * INTERVALS}")
    if args.repeats < 1 or args.batch_size < 1:
        raise UsageError(f"--repeats {args.repeats} and --batch-size {args.batch_size} must be positive")

    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest"
        if ddm_main(["partition", "--k", "1", "--random", "--out", str(manifest)]):
            return 2
        for r in range(args.repeats):
            plain.append(plain_loop(args.preset, args.batch_size, args.steps, args.lr))
            ours.append(our_trainer(manifest, Path(tmp) / f"run{r}", args.preset, args.batch_size, args.steps, args.lr))
    ratio = max(ours) / max(plain)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "OMP_NUM_THREADS={} python scripts/bench_train.py --preset {} --batch-size {} --steps {} --repeats {}".format(
            os.environ.get("OMP_NUM_THREADS", "unset"), args.preset, args.batch_size, args.steps, args.repeats),
        "device": f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "plain_samples_per_s": [round(x, 1) for x in plain],
        "ours_samples_per_s": [round(x, 1) for x in ours],
        "plain_best": round(max(plain), 1),
        "ours_best": round(max(ours), 1),
        "ours_median_over_plain_median": round(statistics.median(ours) / statistics.median(plain), 3),
        "ratio_best": round(ratio, 3),
        "target": 0.9,
    }
    print(f"{'loop':<28}{'best samples/s':>16}{'all repeats':>40}")
    print(f"{'plain PyTorch':<28}{max(plain):>16.1f}{str(result['plain_samples_per_s']):>40}")
    print(f"{'ddm train (EMA, logging...)':<28}{max(ours):>16.1f}{str(result['ours_samples_per_s']):>40}")
    print(f"ours / plain = {ratio:.3f} (target >= 0.9)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_usage_errors(main))
