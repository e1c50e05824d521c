"""Sampling time per image: one expert vs the K=4 ensemble under top-1, top-2, full, trajectory and the hybrid.

Targets (issue 13): top-1 and trajectory <= 1.05x one expert, full ~ Kx. Rows marked [grouped] force the sync-free
grouped dispatch that a GPU takes (router/grouped.py), to compare it with gather on a CPU.
Experts and router are built untrained (timing does not depend on the weights); the router's head is
scaled so that it spreads each batch over all experts, as a trained router does, so top-1 pays the real
gather/scatter cost. Configurations run interleaved, `--repeats` rounds, median per configuration.

    python scripts/bench_sample.py     # writes docs/benchmarks/sample.json and a section of docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("top1", "topk:2", "full", "trajectory", "trajectory:0.5:top1")
GROUPED = ("top1", "full")


def build(root: Path, preset: str, k: int):
    from ddm.models.experts import build_dit, load_expert, write_expert
    from ddm.flow import FlowConfig
    from router.ensemble import DDMEnsemble
    from router.model import RouterModel, measured_flops

    flow = FlowConfig().to_dict()
    for i in range(k):
        torch.manual_seed(i)
        model = build_dit(preset, 8, 1, 10)
        write_expert(root / f"e{i}", model, model, dict(island=i, k=k, manifest_fingerprint="bench", flow=flow, num_classes=10))
    torch.manual_seed(100)
    router = RouterModel(num_experts=k, sample_size=8, in_channels=1, flow=flow, manifest_fingerprint="bench", hidden_dim=32, num_layers=2)
    with torch.no_grad():
        router.head.weight.mul_(30.0)
    router.save_pretrained(root / "router")
    x, t, y = torch.zeros(1, 1, 8, 8), torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
    expert = load_expert(root / "e0")[0]
    ratio = measured_flops(router, x, t) / measured_flops(expert, x, t, y)
    experts = [root / f"e{i}" for i in range(k)]
    models = {"one expert": expert}
    for strategy in STRATEGIES:
        models[strategy] = DDMEnsemble.from_dirs(root / "router", experts, strategy)
    for strategy in GROUPED:  # own expert copies: stacking re-points the experts' weights
        models[f"{strategy} [grouped]"] = DDMEnsemble.from_dirs(root / "router", experts, strategy, dispatch="grouped")
    return models, ratio


def time_per_image(pipe, labels, steps: int, cfg: float, clock=time.perf_counter) -> float:
    start = clock()
    pipe(labels, steps, cfg, torch.Generator().manual_seed(0), output_type="pt")
    return (clock() - start) / len(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", help="expert size (the router is the default train-router size)")
    p.add_argument("--k", type=int, default=4, help="number of experts")
    p.add_argument("--n", type=int, default=128, help="images per batch")
    p.add_argument("--steps", type=int, default=5, help="Euler steps per image")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (2 rows per image)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared machine, more threads time the contention, not the work")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this process's CPU time (time.process_time), steadier than wall time on a loaded machine")
    p.add_argument("--json", default=str(ROOT / "docs/benchmarks/sample.json"), help="results JSON")
    p.add_argument("--fragment", default=str(ROOT / "docs/BENCHMARKS.md"), help="markdown file whose bench-sample section is replaced")
    args = p.parse_args(argv)
    from ddm.io import atomic_write_json
    from evaluation.report import update_fragment
    from router.pipeline import make_pipeline

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    labels = torch.arange(args.n) % 10
    with tempfile.TemporaryDirectory() as tmp:
        models, ratio = build(Path(tmp), args.preset, args.k)
        pipes = {name: make_pipeline(m) for name, m in models.items()}
        for pipe in pipes.values():  # warm-up
            time_per_image(pipe, labels[:4], 2, args.cfg)
        times = {name: [] for name in pipes}
        for _ in range(args.repeats):
            for name, pipe in pipes.items():
                times[name].append(time_per_image(pipe, labels, args.steps, args.cfg, clock))
        runs = {name: torch.stack(m.routing_weights).gt(0).sum(-1).float().mean().item() if hasattr(m, "routing_weights") else 1.0
                for name, m in models.items()}
    base = statistics.median(times["one expert"])
    rows = [{"config": name, "ms_per_image": 1000 * statistics.median(ts), "ms_per_image_all": [1000 * t for t in ts],
             "vs_one_expert": statistics.median(ts) / base, "experts_per_step": runs[name]} for name, ts in times.items()]
    command = "python scripts/bench_sample.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("json", "fragment") and v != p.get_default(k))
    result = {
        "command": command, "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {args.threads} thread(s)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "fragment")},
        "router_over_expert_forward_flops": ratio, "results": rows,
        "targets": {"top1": "<= 1.05x one expert", "trajectory": "<= 1.05x one expert", "full": f"~ {args.k}x one expert"},
    }
    atomic_write_json(Path(args.json), result)
    lines = [
        f"### Sampling time per image, K={args.k} ({result['date']})", "",
        f"Command: `{command}` on {result['machine']}, {args.clock} clock. DiT `{args.preset}` experts on 8x8x1, router "
        f"{ratio:.1%} of an expert's forward FLOPs, {args.n} images per batch, {args.steps} Euler steps, CFG {args.cfg} "
        f"(2 rows per image), median of {args.repeats} interleaved rounds.", "",
        "| configuration | ms / image | x one expert | experts run per sample and step | target |", "|---|---|---|---|---|",
    ]
    for r in rows:
        target = result["targets"].get(r["config"], "")
        lines.append(f"| {r['config']} | {r['ms_per_image']:.2f} | {r['vs_one_expert']:.2f} | {r['experts_per_step']:.2f} | {target} |")
    text = "\n".join(lines) + "\n"
    update_fragment(Path(args.fragment), "bench-sample", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
