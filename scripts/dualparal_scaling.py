"""DualParal scaling model: latency and per-GPU memory on N = 1-8 GPUs for Wan2.1-1.3B and 14B, against sequence
parallelism (DeepSpeed-Ulysses, Ring attention), and validated on this CPU for N = 1-3.

  python scripts/dualparal_scaling.py [--gpu h100|4090] [--frames 1025] [--steps 50] [--json FILE]
  python scripts/dualparal_scaling.py --validate [--rounds 3]   measure N = 1-3 here, print the model's error
  python scripts/dualparal_scaling.py --tiny                     the same code paths, small and fast (tests)

DualParal: `simulate` plays the schedule of docs/design.md §3 (one step per queued block per iteration, newest
first; block b waits for block b-1's previous step) through N pipeline stages: a stage takes its layers' time
plus its extra work (balance.py), a hidden state crosses a link in bytes / bandwidth + latency, the prediction
returns to rank 0 the same way. The bubble (pipeline fill and drain, and iterations with fewer queued blocks
than stages) is what the simulation adds over total work / N. Layer time = the analytic FLOPs of one block-step
(gpu_check.analytic_flops' count) / a measured throughput.
Ulysses / Ring: every GPU holds the whole model and 1/N of the whole video's tokens; each step runs the
full-sequence forward (attention quadratic in the video) at the measured full-sequence throughput / N, plus
Ulysses' 4 all-to-alls per layer (q, k, v, out: (N-1)/N^2 of the sequence's hidden states sent per GPU) or Ring's
N-1 key/value passes per layer (overlapped with attention). Their decode runs after the last step, on one GPU.

Validation (--validate): the bench model's per-block-step costs measured here (balance.measure_costs), one
hidden state's gloo transfer measured between two local processes, and this machine's capacity for concurrent
processes (two busy 1-thread processes at once vs one alone, measured in every round: the cores may be shared)
give the predicted denoising time on N = 1-3 ranks, beside the median measured `render_video` time.

Sources: H100 throughputs measured by scripts/gpu_check.py (issue 14: 421 TFLOP/s per block-step, 527 TFLOP/s
full sequence at 121 latent frames; decode + write 14.66 s for 237 frames, peak 14.04 GiB at N = 1, used to
calibrate the memory the terms below do not count). RTX 4090: the same 53% of its dense bf16 peak (165 TFLOP/s)
and PCIe without peer-to-peer (12 GB/s), both assumptions. Paper: arXiv:2505.21070 (abstract): 1,025-frame
Wan2.1 videos, up to 6.54x lower latency and 1.48x lower memory than the baselines on 8x RTX 4090.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

WAN = {  # diffusers WanTransformer3DModel configs of the T2V models
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                 freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2)),
    "14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2)),
}
GPUS = {
    "h100": dict(block_tflops=421.0, full_tflops=527.0, link_gb_s=300.0, latency_s=10e-6, decode_s_per_latent_frame=14.66 / 60,
                 calibration_gib=14.04, memory_gib=80),
    "4090": dict(block_tflops=421.0 * 165 / 790, full_tflops=527.0 * 165 / 790, link_gb_s=12.0, latency_s=30e-6,
                 decode_s_per_latent_frame=14.66 / 60 * 790 / 165, calibration_gib=14.04, memory_gib=24),
}
VIDEO = dict(height=480, width=832, block=8, cat=4, steps=50, text_tokens=512, batch=2)  # paper defaults (design §3)
BF16, F32 = 2, 4
GIB = 2**30


def analytic_flops(config: dict, tokens: int, key_tokens: int, text_tokens: int, batch: int, layers: int = 1) -> float:
    """FLOPs (2 x multiply-adds) of `layers` transformer layers, as scripts/gpu_check.py counts them."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    per_layer = (8 * tokens * d * d + 4 * tokens * key_tokens * d + 4 * tokens * d * d + 4 * text_tokens * d * d
                 + 4 * tokens * text_tokens * d + 4 * tokens * d * config["ffn_dim"])
    return batch * layers * per_layer


def simulate(num_blocks: int, steps: int, stage_s: list[float], link_s: float = 0.0, back_s: float = 0.0) -> float:
    """Seconds until the last block leaves the queue, playing the schedule through len(stage_s) stages."""
    finish_of, free = {}, [0.0] * len(stage_s)
    for it in range(steps + num_blocks - 1):
        newest, oldest = min(it, num_blocks - 1), max(0, it - steps + 1)
        for b in range(newest, oldest - 1, -1):
            # rank 0 embeds block b once the previous iteration's steps of blocks b-1 (its context) and b are applied
            needed = finish_of.get((it - 1, max(b - 1, 0, it - steps)))  # max(0, it - steps): that iteration's oldest
            t = free[0] if needed is None else max(free[0], needed + back_s)
            for s, cost in enumerate(stage_s):
                t = max(t + (link_s if s else 0.0), free[s]) + cost
                free[s] = t
            finish_of[(it, b)] = t
    return max(finish_of.values())


def param_counts(config: dict) -> tuple[int, int]:
    """(parameters of one layer, parameters outside the layers), counted on the meta device."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**{**config, "num_layers": 1})
    layer = sum(p.numel() for p in model.blocks[0].parameters())
    return layer, sum(p.numel() for p in model.parameters()) - layer


def block_layout(frames: int, block: int, cat: int) -> tuple[int, int]:
    """(latent frames, blocks) of a video of `frames` frames (Wan VAE: 4n + 1), the layout rounded up."""
    latent = (frames - 1) // 4 + 1
    blocks = max(1, -(-(latent - block - cat) // block) + 1)
    return block + cat + (blocks - 1) * block, blocks


def activations(config: dict, tokens: int, batch: int) -> float:
    """Bytes alive in one layer's forward: about 8 bf16 hidden-sized tensors (input, norm, q, k, v, attention
    out, residual, the received/sent buffers), 2 float32 ones (the blocks' .float() norms) and the FFN's."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return batch * tokens * (8 * d * BF16 + 2 * d * F32 + config["ffn_dim"] * BF16)


def dualparal(name: str, gpu: dict, n: int, frames: int, video: dict = VIDEO) -> dict:
    from parallel_infer.layer_split import balanced_split

    config = WAN[name]
    d, layers = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    per_frame = (video["height"] // 16) * (video["width"] // 16)  # VAE 8x, patch 2
    window = (video["block"] + video["cat"]) * per_frame
    latent, blocks = block_layout(frames, video["block"], video["cat"])
    flops = analytic_flops(config, window, window + video["cat"] * per_frame, video["text_tokens"], video["batch"])
    layer_s = flops / (gpu["block_tflops"] * 1e12)
    decode_s = gpu["decode_s_per_latent_frame"] * video["block"] / video["steps"]  # per work item, on rank 0
    extras = [0.0] * n
    extras[0] += decode_s
    sizes = balanced_split(layers, layer_s, extras)
    stage_s = [k * layer_s + e for k, e in zip(sizes, extras)]
    hidden = video["batch"] * window * d * BF16
    link = hidden / (gpu["link_gb_s"] * 1e9) + gpu["latency_s"]
    seconds = simulate(blocks, video["steps"], stage_s, link if n > 1 else 0.0, gpu["latency_s"] if n > 1 else 0.0)
    layer_params, other_params = param_counts(config)
    cache = 2 * video["batch"] * video["cat"] * per_frame * d * BF16  # keys + values of block b+1's first cat frames
    memory = [other_params * BF16 + k * (layer_params * BF16 + cache) + activations(config, window, video["batch"])
              for k in sizes]
    work = blocks * video["steps"] * (layers * layer_s + decode_s)
    return {"gpus": n, "layer_split": list(sizes), "latency_s": seconds, "ideal_s": work / n,
            "bubble": seconds / (work / n) - 1, "memory_gib": [m / GIB for m in memory], "blocks": blocks,
            "latent_frames": latent, "hidden_mb_per_link_per_block_step": hidden / 1e6}


def sequence_parallel(name: str, gpu: dict, n: int, frames: int, kind: str, video: dict = VIDEO) -> dict | None:
    """DeepSpeed-Ulysses ("ulysses") or Ring attention ("ring") over the whole video; None when Ulysses cannot
    split the heads over n GPUs."""
    config = WAN[name]
    heads, d, layers = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    if kind == "ulysses" and heads % n:
        return None
    per_frame = (video["height"] // 16) * (video["width"] // 16)
    latent, _ = block_layout(frames, video["block"], video["cat"])
    tokens = latent * per_frame
    total = analytic_flops(config, tokens, tokens, video["text_tokens"], video["batch"], layers)
    attention = video["batch"] * layers * 4 * tokens * tokens * d
    compute = total / n / (gpu["full_tflops"] * 1e12)
    link = gpu["link_gb_s"] * 1e9
    if kind == "ulysses":
        comm = layers * 4 * (video["batch"] * tokens * d * BF16 * (n - 1) / n**2 / link + gpu["latency_s"]) if n > 1 else 0.0
        step = compute + comm
    else:
        passes = layers * (n - 1) * (2 * video["batch"] * tokens / n * d * BF16 / link + gpu["latency_s"])
        attention_s = attention / n / (gpu["full_tflops"] * 1e12)
        step = compute - attention_s + max(attention_s, passes)
    layer_params, other_params = param_counts(config)
    memory = (layer_params * layers + other_params) * BF16 + activations(config, tokens // n, video["batch"])
    if kind == "ring":
        memory += 2 * video["batch"] * tokens // n * d * BF16  # the key/value block in flight
    decode = gpu["decode_s_per_latent_frame"] * latent
    return {"gpus": n, "latency_s": video["steps"] * step + decode, "memory_gib": memory / GIB}


def predict(gpu_name: str, frames: int, steps: int, models=("1.3B", "14B"), gpus=range(1, 9)) -> dict:
    gpu, video = GPUS[gpu_name], {**VIDEO, "steps": steps}
    calibration = None
    out = {"gpu": gpu_name, "assumptions": gpu, "frames": frames, "video": video, "models": {}}
    for name in models:
        rows = []
        for n in gpus:
            row = {"dualparal": dualparal(name, gpu, n, frames, video)}
            for kind in ("ulysses", "ring"):
                row[kind] = sequence_parallel(name, gpu, n, frames, kind, video)
            rows.append(row)
        if name == "1.3B" and calibration is None:
            # what the terms do not count (VAE decode buffers, allocator slack), from the measured N = 1 peak
            calibration = gpu["calibration_gib"] - rows[0]["dualparal"]["memory_gib"][0]
        for row in rows:
            row["dualparal"]["memory_gib"][0] += calibration  # on the decode rank
            for kind in ("ulysses", "ring"):
                if row[kind] is not None:
                    row[kind]["memory_gib"] += calibration
        out["models"][name] = rows
    out["unaccounted_gib_from_calibration"] = calibration
    out["against_paper"] = against_paper(out)
    return out


def against_paper(result: dict) -> dict:
    """The model's ratios at the largest N beside the paper's headline (8x RTX 4090, 1,025 frames)."""
    out = {"paper": {"latency_ratio_up_to": 6.54, "memory_ratio": 1.48, "gpus": 8, "frames": 1025, "source": "arXiv:2505.21070"}}
    for name, rows in result["models"].items():
        dp, ring = rows[-1]["dualparal"], rows[-1]["ring"]
        out[name] = {"gpus": dp["gpus"], "ring_over_dualparal_latency": ring["latency_s"] / dp["latency_s"],
                     "ring_over_dualparal_memory": ring["memory_gib"] / max(dp["memory_gib"])}
    return out


def print_prediction(result: dict) -> None:
    print(f"{result['gpu']}: {result['frames']} frames, {result['video']}")
    for name, rows in result["models"].items():
        print(f"Wan2.1-{name}  N | DualParal s (bubble) max GiB/GPU | Ulysses s GiB | Ring s GiB | Ulysses/DualParal")
        for row in rows:
            dp, ul, ring = row["dualparal"], row["ulysses"], row["ring"]
            ul_text = f"{ul['latency_s']:>9.0f} {ul['memory_gib']:>6.1f}" if ul else f"{'(heads)':>16}"
            ratio = f"{ul['latency_s'] / dp['latency_s']:.2f}x" if ul else "-"
            print(f"   {row['dualparal']['gpus']:>2} | {dp['latency_s']:>8.0f} ({dp['bubble']:>5.1%}) {max(dp['memory_gib']):>6.1f} | "
                  f"{ul_text} | {ring['latency_s']:>9.0f} {ring['memory_gib']:>6.1f} | {ratio}")
    paper = result["against_paper"]
    for name in result["models"]:
        r = paper[name]
        print(f"Wan2.1-{name} at N={r['gpus']}: Ring / DualParal latency {r['ring_over_dualparal_latency']:.2f}x, "
              f"memory {r['ring_over_dualparal_memory']:.2f}x (paper, 8x RTX 4090, 1,025 frames: up to 6.54x and 1.48x)")


def measure_link(hidden_bytes: int) -> tuple[float, float]:
    """(seconds per byte, fixed seconds) of one gloo message between two local processes, from ping-pongs."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    result = ctx.Queue()
    store = str(Path(tempfile.mkdtemp(prefix="dualparal-link-")) / "store")
    procs = [ctx.Process(target=_ping, args=(r, store, hidden_bytes, result)) for r in range(2)]
    for p in procs:
        p.start()
    small, large = result.get(timeout=120)
    for p in procs:
        p.join()
    per_byte = max(0.0, (large - small) / hidden_bytes)
    return per_byte, small


def _ping(rank: int, store: str, size: int, result) -> None:
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    times = []
    for numel in (1, size // 4):
        buffer = torch.zeros(numel)
        for _ in range(3):  # warm-up
            dist.send(buffer, 1 - rank) if rank == 0 else dist.recv(buffer, 0)
            dist.recv(buffer, 1) if rank == 0 else dist.send(buffer, 0)
        start = time.perf_counter()
        for _ in range(20):
            dist.send(buffer, 1 - rank) if rank == 0 else dist.recv(buffer, 0)
            dist.recv(buffer, 1) if rank == 0 else dist.send(buffer, 0)
        times.append((time.perf_counter() - start) / 40)  # one way
    if rank == 0:
        result.put(times)
    dist.destroy_process_group()


def _busy(seconds_out, work: int) -> None:
    import time

    import torch

    torch.set_num_threads(1)
    x = torch.randn(192, 192)
    start = time.perf_counter()
    for _ in range(work):
        x = torch.tanh(x @ x)
    seconds_out.put(time.perf_counter() - start)


def capacity(rounds: int, work: int = 1500) -> float:
    """How many single processes' worth of compute two busy 1-thread processes get here now: 2 x (time alone /
    time each when both run). 2 on two idle cores; less when other jobs share the machine."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    alone, together = [], []
    for _ in range(rounds):
        for n, out in ((1, alone), (2, together)):
            queue = ctx.Queue()
            procs = [ctx.Process(target=_busy, args=(queue, work)) for _ in range(n)]
            for p in procs:
                p.start()
            out.append(statistics.mean(queue.get(timeout=300) for _ in procs))
            for p in procs:
                p.join()
    return 2 * statistics.median(alone) / statistics.median(together)


def validate(rounds: int, tiny: bool) -> dict:
    """Measure the bench model's costs here, predict N = 1-3, render the same video on N = 1-3 ranks x 1 thread,
    and compare. With N > 1 busy ranks the stages run at the machine's measured capacity for concurrent
    processes (`capacity`: below N when the ranks outnumber the cores or other jobs share them)."""
    import os

    from parallel_infer.api import render_video
    from parallel_infer.balance import measure_costs
    from parallel_infer.loader import inspect_model
    from parallel_infer.model_settings import resolve_settings
    from parallel_infer.render import VideoSettings, plan_video
    from parallel_infer.tiny import write_tiny_model

    import torch

    torch.set_num_threads(1)
    model = dict(layers=4, heads=2, head_dim=16, ffn=64, text_dim=16) if tiny else dict(layers=8, heads=4, head_dim=32, ffn=512, text_dim=64)
    video = dict(steps=3 if tiny else 8, block=4, cat=2, height=8, width=8, cfg=5.0)
    blocks = 3 if tiny else 12
    frames = video["block"] + video["cat"] + (blocks - 1) * video["block"]
    tmp = Path(tempfile.mkdtemp(prefix="dualparal-scaling-"))
    model_dir = write_tiny_model(tmp / "model", prompts=("a cat runs", ""), text_tokens=16, **model)
    info = inspect_model(model_dir)
    settings, _ = resolve_settings(info, VideoSettings(frames=frames, **{k: v for k, v in video.items()}))
    plan = plan_video(info, settings)
    d = model["heads"] * model["head_dim"]
    hidden = 2 * (video["block"] + video["cat"]) * (video["height"] // 2) * (video["width"] // 2) * d * F32
    per_byte, fixed = measure_link(hidden)
    link = hidden * per_byte + fixed
    cores = len(os.sched_getaffinity(0))
    ranks = (1, 2) if tiny else (1, 2, 3)
    runs = {n: [] for n in ranks}
    for r in range(rounds):  # interleaved, and each render predicted from figures taken just before it
        for n in ranks:
            costs = measure_costs(info, plan, torch.device("cpu"), torch.float32, batch=2)
            two = capacity(1, work=150 if tiny else 1500) if n > 1 else 1.0
            sizes = costs.split(model["layers"], n, 0)
            share = max(1.0, n / min(two, cores)) if n > 1 else 1.0  # each busy stage's slice of the machine
            stage = [share * (k * costs.layer + e) for k, e in zip(sizes, costs.extras(n, 0))]
            predicted = simulate(blocks, video["steps"], stage, link if n > 1 else 0.0, fixed if n > 1 else 0.0)
            rec = render_video(model_dir, "a cat runs", tmp / f"v{n}-{r}.mp4", frames=frames, ranks=n, threads=1, **video)
            runs[n].append({"predicted_s": predicted, "measured_s": rec["timings_s"]["denoise"], "capacity": two,
                            "layer_ms": costs.layer * 1e3, "layer_split": list(sizes)})
    rows = []
    for n in ranks:
        errors = [run["predicted_s"] / run["measured_s"] - 1 for run in runs[n]]
        rows.append({"ranks": n, "layer_split": runs[n][-1]["layer_split"],
                     "predicted_s": statistics.median(run["predicted_s"] for run in runs[n]),
                     "measured_s": statistics.median(run["measured_s"] for run in runs[n]),
                     "error": statistics.median(errors), "errors": errors, "runs": runs[n]})
    return {"model": model, "video": video, "blocks": blocks, "cores": cores, "rounds": rounds,
            "link_ms_per_hidden": link * 1e3, "link_fixed_ms": fixed * 1e3,
            "rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows), "load_average": os.getloadavg()}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default after its help line, and the examples of the docstring kept as written."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--gpu", choices=sorted(GPUS), default="4090", help="the GPU the prediction is for")
    p.add_argument("--frames", type=int, default=1025, help="video frames (4n + 1)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the predicted video")
    p.add_argument("--validate", action="store_true", help="measure N = 1-3 on this CPU and state the model's error")
    p.add_argument("--rounds", type=int, default=3, help="--validate: interleaved rounds, the median counts")
    p.add_argument("--tiny", action="store_true", help="a fast check of every code path (small model, N = 1-2)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        result = {"prediction": predict(args.gpu, 81, 4, models=("1.3B",), gpus=(1, 2)), "validation": validate(1, tiny=True)}
    else:
        result = {"prediction": predict(args.gpu, args.frames, args.steps)}
        if args.validate:
            result["validation"] = validate(args.rounds, tiny=False)
    print_prediction(result["prediction"])
    if "validation" in result:
        v = result["validation"]
        print(f"validation on {v['cores']} CPU cores, {v['blocks']} blocks x {v['video']['steps']} steps, "
              f"one hidden state over gloo {v['link_ms_per_hidden']:.3f} ms; each render predicted from the costs and "
              f"the capacity for two busy processes measured just before it")
        for row in v["rows"]:
            capacities = ", ".join(f"{run['capacity']:.2f}" for run in row["runs"])
            print(f"  N={row['ranks']} split {row['layer_split']}: predicted {row['predicted_s']:.3f} s, measured "
                  f"{row['measured_s']:.3f} s (medians of {len(row['runs'])}), error {row['error']:+.1%} (median; all "
                  f"{', '.join(f'{e:+.0%}' for e in row['errors'])}; capacity {capacities})")
        print(f"  largest median error {v['max_abs_error']:.1%} (load average {v['load_average']})")
    if args.json:
        from ddm.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
