"""One ensemble step on one GPU: top-1, trajectory, the hybrid and full vs one expert, gather vs grouped dispatch.

  python scripts/gpu_sample_check.py          K=4 untrained `small` experts on 8x8x1 (and DiT-B/2 on 32x32x4 where that
                                              preset exists), bf16, batches 256 and 2048; < 5 min on an H100
  python scripts/gpu_sample_check.py --tiny   the same code on a CPU with `tiny` experts and small batches (the tests)

Each configuration is one call of the ensemble (router + experts, as one sampling step) on a batch of rows at
sigma = 0.5, timed with the device synchronized, median of --rounds interleaved rounds of --repeats calls. The
router's head is scaled so that it spreads the rows over all experts, as a trained router does. Also reported:
whether a grouped step synchronizes with the host (torch.cuda.set_sync_debug_mode), the largest difference
between grouped and gather outputs, and `full` as one vmap call over stacked experts (torch.func).
Target (issue 13): top-1 and trajectory <= 1.10x one expert at batch >= 256.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["top1", "trajectory", "trajectory:0.5:top1", "full"]
K = 4


def build(preset: str, size: int, channels: int, device, dtype):
    from ddm.flow import FlowConfig
    from ddm.models.experts import build_dit
    from router.model import RouterModel

    flow = FlowConfig().to_dict()
    experts = []
    for i in range(K):
        torch.manual_seed(i)
        expert = build_dit(preset, size, channels, 10)
        with torch.no_grad():  # DiT zero-inits its output layer: make the experts' outputs differ
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        experts.append(expert.to(device, dtype).eval().requires_grad_(False))
    torch.manual_seed(100)
    router = RouterModel(num_experts=K, sample_size=size, in_channels=channels, hidden_dim=32, num_layers=2, flow=flow,
                         manifest_fingerprint="gpu-check")
    with torch.no_grad():
        router.head.weight.mul_(30.0)
    metas = [dict(island=i, k=K, manifest_fingerprint="gpu-check", flow=flow, num_classes=10) for i in range(K)]
    return router.to(device, dtype).eval().requires_grad_(False), experts, metas


def vmap_full(router, experts):
    """`full` as one vmap over the experts' stacked weights (torch.func), weighted by the router."""
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state(experts)
    base = copy.deepcopy(experts[0]).to("meta")

    def one(p, b, x, t, y):
        return functional_call(base, (p, b), (x, t, y)).sample

    def step(x, t, y):
        v = torch.vmap(one, in_dims=(0, 0, None, None, None))(params, buffers, x, t, y)  # K, B, ...
        w = router(x, t, y).float().softmax(1).t().to(v.dtype)
        return (w.view(K, -1, *[1] * (v.dim() - 2)) * v).sum(0)

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns: dict, device, repeats: int, rounds: int) -> dict:
    """Median over rounds of seconds per call; configurations interleaved within each round. On a CPU the clock is
    this process's CPU time (one thread), which other jobs on a shared machine disturb far less than wall time."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = clock()
            for _ in range(repeats):
                fn()
            synchronize(device)
            times[name].append((clock() - start) / repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def syncs_in_a_step(step, device) -> str:
    """'none' if a step runs under set_sync_debug_mode('error'), else the error's first line."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check(preset, size, channels, batch, device, dtype, repeats, rounds) -> list[dict]:
    from router.ensemble import DDMEnsemble
    from router.strategies import parse_strategy

    router, experts, metas = build(preset, size, channels, device, dtype)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g, device=device).to(dtype)
    t = torch.full((batch,), 500.0, device=device)
    y = torch.randint(0, 10, (batch,), generator=g, device=device)
    fns = {"one expert": lambda: experts[0](x, t, y).sample}
    # one ensemble per dispatch, its strategy switched per configuration: the experts are stacked once
    ensembles = {dispatch: DDMEnsemble(router, experts, metas, "top1", dispatch) for dispatch in ("gather", "grouped")}
    for ens in ensembles.values():
        ens.reset_routing(torch.Generator(device).manual_seed(0))  # trajectory draws at its first call, then keeps it
    for strategy in STRATEGIES:
        for dispatch, ens in ensembles.items():

            def step(ens=ens, parsed=parse_strategy(strategy, K)):
                ens.strategy = parsed
                ens.routing_weights.clear()  # the record would grow over the timed calls
                return ens(x, t, y).sample

            fns[f"{strategy} ({dispatch})"] = step
    fns["full (vmap)"] = lambda step=vmap_full(router, experts): step(x, t, y)
    with torch.inference_mode():
        seconds = time_calls(fns, device, repeats, rounds)
        differences = {s: (fns[f"{s} (grouped)"]().float() - fns[f"{s} (gather)"]().float()).abs().max().item() for s in STRATEGIES}
        differences["full (vmap)"] = (fns["full (vmap)"]().float() - fns["full (gather)"]().float()).abs().max().item()
        syncs = {s: syncs_in_a_step(fns[f"{s} (grouped)"], device) for s in STRATEGIES}
    base = seconds["one expert"]
    rows = []
    for name, sec in seconds.items():
        strategy, _, dispatch = name.partition(" (")
        dispatch = dispatch.rstrip(")")
        rows.append({"preset": preset, "shape": f"{channels}x{size}x{size}", "batch": batch, "config": name, "ms": 1000 * sec,
                     "vs_one_expert": sec / base, "max_abs_diff_vs_gather": differences.get(strategy if dispatch == "grouped" else name),
                     "host_sync": syncs.get(strategy) if dispatch == "grouped" else None})
    return rows


def markdown(result: dict) -> str:
    lines = [f"### One ensemble step on {result['device']} ({result['date']})", "",
             f"Command: `{result['command']}`; {result['dtype']}, K={K}, sigma 0.5, {result['clock']} clock, median of {result['rounds']} interleaved rounds "
             f"of {result['repeats']} calls. Target: top-1 and trajectory <= 1.10x one expert at batch >= 256.", "",
             "| preset | shape | batch | configuration | ms / step | x one expert | max diff vs gather | host sync (grouped) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        diff = "" if r["max_abs_diff_vs_gather"] is None else f"{r['max_abs_diff_vs_gather']:.1e}"
        lines.append(f"| {r['preset']} | {r['shape']} | {r['batch']} | {r['config']} | {r['ms']:.2f} | {r['vs_one_expert']:.2f} | "
                     f"{diff} | {r['host_sync'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="on the CPU (one thread, CPU-time clock): tiny experts and small "
                                                       "batches unless told otherwise")
    p.add_argument("--preset", default=None, help="expert preset (default small; --tiny: tiny), e.g. --tiny --preset small on a CPU")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="rows per step (default 256 2048; --tiny: 8 32)")
    p.add_argument("--repeats", type=int, default=None, help="calls per round (default 10; --tiny: 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (default 5; --tiny: 2)")
    p.add_argument("--out", default=None, help="results JSON (default docs/benchmarks/gpu_sample.json; --tiny: not written)")
    p.add_argument("--fragment", default=None, help="markdown file whose gpu-sample (CPU: cpu-step) section is replaced "
                                                    "(default docs/BENCHMARKS.md; --tiny: none)")
    args = p.parse_args(argv)
    from diffusers.utils import logging

    from ddm import run_reporting_usage_errors

    logging.set_verbosity_error()  # not the "cast with to()" notes of every bf16 model

    return run_reporting_usage_errors(run, args)


def run(args) -> int:
    from ddm import UsageError
    from ddm.io import atomic_write_json
    from ddm.models.experts import DIT_PRESETS
    from evaluation.report import update_fragment

    if args.tiny:
        torch.set_num_threads(1)
        device, dtype, configs = torch.device("cpu"), torch.float32, [(args.preset or "tiny", 8, 1)]
        batches, repeats, rounds = args.batches or [8, 32], args.repeats or 1, args.rounds or 2
    else:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device: run with --tiny for the CPU smoke run")
        device, dtype, configs = torch.device("cuda"), torch.bfloat16, [(args.preset or "small", 8, 1)]
        if "DiT-B/2" in DIT_PRESETS:  # the paper's DiT-B/2 on 32x32x4 latents, where the latent presets exist
            configs.append(("DiT-B/2", 32, 4))
        batches, repeats, rounds = args.batches or [256, 2048], args.repeats or 10, args.rounds or 5
    if min(batches) < 2 or repeats < 1 or rounds < 1:
        raise UsageError(f"--batches must be >= 2 and --repeats, --rounds >= 1, got {batches}, {repeats}, {rounds}")
    start = time.perf_counter()
    rows = [r for preset, size, channels in configs for batch in batches
            for r in check(preset, size, channels, batch, device, dtype, repeats, rounds)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    command = "python scripts/gpu_sample_check.py" + "".join(
        f" --{k}" + ("" if v is True else " " + " ".join(map(str, v if isinstance(v, list) else [v])))
        for k, v in vars(args).items() if v not in (None, False) and k not in ("out", "fragment"))
    result = {"command": command, "date": datetime.date.today().isoformat(), "device": name, "dtype": str(dtype).split(".")[-1],
              "clock": "wall" if device.type == "cuda" else "CPU-time (1 thread)",
              "repeats": repeats, "rounds": rounds, "wall_seconds": time.perf_counter() - start, "results": rows}
    text = markdown(result)
    print(text)
    out = args.out or (None if args.tiny else str(ROOT / "docs/benchmarks/gpu_sample.json"))
    if out:
        atomic_write_json(Path(out), result)
    fragment = args.fragment or (None if args.tiny else str(ROOT / "docs/BENCHMARKS.md"))
    if fragment:
        update_fragment(Path(fragment), "gpu-sample" if device.type == "cuda" else "cpu-step", text)
    print(json.dumps({"wall_seconds": round(result["wall_seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
