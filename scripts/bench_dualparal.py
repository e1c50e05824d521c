"""DualParal on this CPU with a small random-weight Wan (about 2.3M parameters, pixel space, 8x8 frames).

  python scripts/bench_dualparal.py [--json docs/benchmarks/dualparal.json] [--rounds 5]

(a) speedup: 2 ranks x 1 thread vs 1 process x 2 threads (equal cores), denoising time of the same video;
    1 process x 1 thread beside them shows the layer pipeline's own efficiency (ideal 2x); the 2-rank runs
    with the even split (4,4), the balanced split rank 0 measures (auto), and CFG-parallel (two groups of 1);
    and the machine's own ceiling: two independent 1-thread renders at once vs one alone;
(b) traffic: bytes sent between ranks per block-step, measured, beside the formula, and beside what
    DeepSpeed-Ulysses sequence parallelism would move for the same video and ranks;
(c) memory: peak RSS of one rendering process (1 thread) for videos of 1x, 4x and 16x the frames;
(d) time per frame for the same three lengths;
(e) decode placement: a tiny Wan VAE model with few steps, so decoding weighs as on the GPU (about half the
    wall time when it is inline): inline vs the decode thread, on 1 process and on 2 ranks with either decode rank.
Every run goes through `parallel_infer.api.render_video` (decode + MP4 writing included in (c) and (e), not in
(a)). The machine may be shared: (a) and (e) interleave their settings round by round and report medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

MODEL = dict(layers=8, heads=4, head_dim=32, ffn=512, text_dim=64)
VIDEO = dict(steps=8, block=4, cat=2, height=8, width=8, cfg=5.0, seed=0)
# (c)/(d): 64x64 frames through 8x8 patches: the compute of (a) (64 tokens a frame), but frames large
# enough that keeping the whole video would show: 48 KiB of float32 latents per frame.
MEMORY_VIDEO = dict(steps=4, height=64, width=64)
MEMORY_PATCH = 8
PROMPT = "a cat runs"
BYTES = 4  # float32


def layout_frames(blocks: int) -> int:
    return VIDEO["block"] + VIDEO["cat"] + (blocks - 1) * VIDEO["block"]


# (e): 32x32 pixels through a tiny VAE (spatial factor 4, temporal factor 2) -> 8x8 latents, patch 2
DECODE_VIDEO = dict(steps=3, block=4, cat=2, height=32, width=32, cfg=5.0, seed=0)
DECODE_MODEL = dict(layers=4, heads=4, head_dim=32, ffn=512, text_dim=64)
DECODE_BLOCKS = 10


def render(model_dir: Path, out: Path, blocks: int, ranks: int, threads: int, **options) -> dict:
    from parallel_infer.api import render_video

    return render_video(model_dir, PROMPT, out, frames=layout_frames(blocks), ranks=ranks, threads=threads, **VIDEO, **options)


def interleaved(runs: dict, rounds: int, render_one) -> dict:
    """Every setting once per round, in turn, `rounds` times: name -> list of records."""
    records = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            records[name].append(render_one(name, run, r))
    return records


def median_of(records: list[dict], key: str) -> float:
    return statistics.median(rec["timings_s"][key] for rec in records)


def child(args) -> None:
    """One rendering in a fresh process: its peak RSS is the video's, not the benchmark's. The RSS is also
    sampled as each block is written: its growth from the first block is what streaming must keep at zero."""
    import psutil

    from parallel_infer.api import render_video

    me, samples = psutil.Process(), []
    record = render_video(Path(args.model), PROMPT, Path(args.out), frames=layout_frames(args.blocks), threads=1,
                          **{**VIDEO, **MEMORY_VIDEO}, progress_callback=lambda done, total: samples.append(me.memory_info().rss))
    record["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["rss_growth_mib"] = (max(samples) - samples[0]) / 2**20
    print(json.dumps(record))


def traffic(blocks: int, ranks: int, steps: int) -> dict:
    """Bytes per block-step: DualParal (formula) and Ulysses (all-to-all of q, k, v and the output per layer)."""
    tokens_per_frame = (VIDEO["height"] // 2) * (VIDEO["width"] // 2)
    dim, batch, window = MODEL["heads"] * MODEL["head_dim"], 2, VIDEO["block"] + VIDEO["cat"]
    hidden = batch * window * tokens_per_frame * dim * BYTES
    frames = layout_frames(blocks)
    predictions = 3 * tokens_per_frame * 4 * BYTES * frames * steps  # each block's own frames, every step
    dualparal_total = (ranks - 1) * hidden * blocks * steps + predictions
    ulysses_total = steps * MODEL["layers"] * 4 * batch * frames * tokens_per_frame * dim * BYTES * (ranks - 1) / ranks
    return {"dualparal_formula": dualparal_total / (blocks * steps), "ulysses": ulysses_total / (blocks * steps),
            "hidden_per_link": hidden}


def solo_child(args) -> None:
    """(a)'s 1-thread render in a fresh process: prints its denoise seconds."""
    record = render(Path(args.model), Path(args.out), args.blocks, 1, 1)
    print(record["timings_s"]["denoise"])


def two_core_ceiling(model_dir: Path, tmp: Path, blocks: int, rounds: int) -> dict:
    """What two cores give two independent 1-thread renders (no communication at all): the ceiling of any
    2-rank speedup on this machine (below 2 when the cores share a physical core, or other jobs run)."""
    def launch(tag: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--solo-child", "--model", str(model_dir), "--out",
                                 str(tmp / f"solo-{tag}.mp4"), "--blocks", str(blocks)], stdout=subprocess.PIPE, text=True)

    def seconds(proc) -> float:
        return float(proc.communicate()[0].strip().splitlines()[-1])

    alone, together = [], []
    for r in range(rounds):
        alone.append(seconds(launch(f"{r}")))
        pair = [launch(f"{r}-{i}") for i in range(2)]
        together.append(statistics.mean(seconds(proc) for proc in pair))
    alone_s, together_s = statistics.median(alone), statistics.median(together)
    return {"alone_s": alone_s, "two_at_once_s": together_s, "throughput_ratio": 2 * alone_s / together_s}


def speedup_and_traffic(model_dir: Path, tmp: Path, blocks: int, rounds: int) -> dict:
    """(a) and (b), from the same 2-rank runs."""
    runs = {"1 process x 1 thread": (1, 1, {}), "1 process x 2 threads": (1, 2, {}),
            "2 ranks x 1 thread, even split": (2, 1, {"layer_split": "4,4"}),
            "2 ranks x 1 thread, balanced split": (2, 1, {}),
            "2 ranks x 1 thread, CFG-parallel": (2, 1, {"cfg_parallel": True})}
    timing = interleaved(runs, rounds, lambda name, run, r: render(
        model_dir, tmp / f"a-{r}-{len(name)}.mp4", blocks, run[0], run[1], **run[2]))
    denoise = {name: median_of(recs, "denoise") for name, recs in timing.items()}
    single, one, even, balanced, cfg = (denoise[k] for k in runs)
    pipeline = timing["2 ranks x 1 thread, balanced split"][0]
    speedup = {
        "blocks": blocks, "latent_frames": layout_frames(blocks), "rounds": rounds, "denoise_s_median": denoise,
        "denoise_s_all": {name: [rec["timings_s"]["denoise"] for rec in recs] for name, recs in timing.items()},
        "balanced_split": pipeline["parallel"]["layer_split"],
        "measured_ms_per_block_step": pipeline["parallel"]["measured_ms_per_block_step"],
        "speedup": one / balanced, "speedup_even_split": one / even, "speedup_vs_1thread": single / balanced,
        "cfg_parallel_speedup_vs_layer_pipeline": balanced / cfg, "target": 1.6,
        "two_core_ceiling": two_core_ceiling(model_dir, tmp, blocks, rounds)}
    traffic_row = {"measured": pipeline["bytes_sent_per_block_step"], **traffic(blocks, 2, VIDEO["steps"]), "ranks": 2,
                   "measured_cfg_parallel": timing["2 ranks x 1 thread, CFG-parallel"][0]["bytes_sent_per_block_step"]}
    return {"a_speedup": speedup, "b_traffic_bytes_per_block_step": traffic_row}


def memory_and_time_per_frame(tmp: Path) -> dict:
    """(c) and (d): 1x, 4x, 16x the frames, each in a fresh process."""
    from parallel_infer.tiny import write_tiny_model

    memory_model = write_tiny_model(tmp / "memory-model", prompts=(PROMPT, ""), text_tokens=16, patch=MEMORY_PATCH, **MODEL)
    lengths = []
    for factor in (1, 4, 16):
        blocks = layout_blocks(4, factor)
        out = subprocess.run([sys.executable, __file__, "--child", "--model", str(memory_model), "--out",
                              str(tmp / f"c-{factor}.mp4"), "--blocks", str(blocks)],
                             check=True, capture_output=True, text=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        frames = rec["frames_written"]
        whole_video_mib = frames * 3 * MEMORY_VIDEO["height"] * MEMORY_VIDEO["width"] * BYTES / 2**20
        lengths.append({"factor": factor, "blocks": blocks, "video_frames": frames, "max_rss_mib": rec["max_rss_mib"],
                        "rss_growth_mib": rec["rss_growth_mib"], "whole_video_latents_mib": whole_video_mib,
                        "denoise_s": rec["timings_s"]["denoise"], "total_s": rec["timings_s"]["total"],
                        "ms_per_frame": 1000 * rec["timings_s"]["total"] / frames})
    rss = [x["max_rss_mib"] for x in lengths]
    per_frame = [x["ms_per_frame"] for x in lengths]
    return {"c_memory": {"video": {**VIDEO, **MEMORY_VIDEO, "patch": MEMORY_PATCH}, "runs": lengths,
                         "rss_spread": max(rss) / min(rss) - 1, "target_spread": 0.10},
            "d_time_per_frame": {"ms_per_frame": per_frame, "spread": max(per_frame) / min(per_frame) - 1}}


def report(results: dict, parts: list[str]) -> None:
    if "a" in parts:
        a = results["a_speedup"]
        print(f"(a) {a['blocks']} blocks, median denoise s over {a['rounds']} interleaved rounds:")
        for name, value in a["denoise_s_median"].items():
            print(f"      {name:<36} {value:.3f}")
        print(f"    speedup {a['speedup']:.2f}x vs 2 threads (target 1.6x; even split {a['speedup_even_split']:.2f}x), "
              f"{a['speedup_vs_1thread']:.2f}x vs 1 thread; balanced split {a['balanced_split']}; "
              f"CFG-parallel {a['cfg_parallel_speedup_vs_layer_pipeline']:.2f}x the 2-rank layer pipeline")
        c = a["two_core_ceiling"]
        print(f"    two independent 1-thread renders at once: {c['two_at_once_s']:.3f} s each vs {c['alone_s']:.3f} s alone: "
              f"this machine's two cores give {c['throughput_ratio']:.2f}x one (the ceiling of a 2-rank speedup vs 1 thread)")
        b = results["b_traffic_bytes_per_block_step"]
        print(f"(b) bytes/block-step, 2 ranks: measured {b['measured']:.0f} | formula {b['dualparal_formula']:.0f} | "
              f"Ulysses {b['ulysses']:.0f} ({b['ulysses'] / b['measured']:.1f}x more)")
    if "c" in parts:
        print("(c)(d) length | frames | peak RSS MiB | RSS growth MiB | whole-video latents MiB | ms/frame")
        for x in results["c_memory"]["runs"]:
            print(f"      {x['factor']:>3}x   | {x['video_frames']:>6} | {x['max_rss_mib']:>12.1f} | {x['rss_growth_mib']:>14.2f} | "
                  f"{x['whole_video_latents_mib']:>23.2f} | {x['ms_per_frame']:.1f}")
        print(f"      RSS spread {results['c_memory']['rss_spread']:.1%} (target <= 10%), "
              f"time/frame spread {results['d_time_per_frame']['spread']:.1%}")
    if "e" in parts:
        print(f"(e) decode placement, {DECODE_BLOCKS} blocks, medians (s): setting | total | denoise | decode+write | tail")
        for name, row in results["e_decode"]["median_s"].items():
            print(f"      {name:<40} {row['total']:.2f} | {row['denoise']:.2f} | {row['decode_write']:.2f} | {row['decode_tail']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", type=Path, default=Path("docs/benchmarks/dualparal.json"), help="results JSON")
    p.add_argument("--blocks", type=int, default=12, help="blocks in the (a)/(b) video")
    p.add_argument("--rounds", type=int, default=5, help="(a), (e): interleaved rounds per setting; the median counts")
    p.add_argument("--parts", nargs="+", choices=["a", "c", "e"], default=["a", "c", "e"],
                   help="a: (a)+(b), c: (c)+(d), e: (e); the others' figures already in --json are kept")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--solo-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.solo_child:
        return solo_child(args)

    import torch
    from diffusers import WanTransformer3DModel

    from ddm.io import atomic_write_json
    from parallel_infer.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-dualparal-"))
    model_dir = write_tiny_model(tmp / "model", prompts=(PROMPT, ""), text_tokens=16, **MODEL)
    params = sum(p.numel() for p in WanTransformer3DModel.from_pretrained(model_dir / "transformer").parameters())
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    load = {"before": os.getloadavg()}
    if "a" in args.parts:
        results.update(speedup_and_traffic(model_dir, tmp, args.blocks, args.rounds))
    if "c" in args.parts:
        results.update(memory_and_time_per_frame(tmp))
    if "e" in args.parts:
        results["e_decode"] = decode_placement(tmp, args.rounds)
    load["after"] = os.getloadavg()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results.update({"torch": torch.__version__, "command": "python scripts/bench_dualparal.py",
                    "model": {**MODEL, "parameters": params}, "video": VIDEO})
    for part in args.parts:  # when and under what load each part was measured
        results.setdefault("measured", {})[part] = {"date": date, "load_average": load}
    atomic_write_json(args.json, results)
    print(f"model: {params / 1e6:.2f}M parameters; video {VIDEO}")
    report(results, args.parts)
    print(f"load average before/after: {load['before']} / {load['after']}")
    print(f"wrote {args.json}")


def decode_placement(tmp: Path, rounds: int) -> dict:
    """(e): the same video with the decode inline or in its thread, on 1 process and on 2 ranks."""
    from parallel_infer.api import render_video
    from parallel_infer.tiny import write_tiny_model

    model = write_tiny_model(tmp / "vae-model", vae=True, prompts=(PROMPT, ""), text_tokens=16, **DECODE_MODEL)
    frames = 2 * (DECODE_VIDEO["block"] + DECODE_VIDEO["cat"] + (DECODE_BLOCKS - 1) * DECODE_VIDEO["block"] - 1) + 1
    runs = {"1 process x 1 thread, inline": (1, 1, dict(decode="inline")),
            "1 process x 1 thread, decode thread": (1, 1, dict(decode="thread")),
            "1 process x 2 threads, inline": (1, 2, dict(decode="inline")),
            "2 ranks x 1 thread, first, inline": (2, 1, dict(decode_on="first", decode="inline")),
            "2 ranks x 1 thread, first, thread": (2, 1, dict(decode_on="first", decode="thread")),
            "2 ranks x 1 thread, last, inline": (2, 1, dict(decode_on="last", decode="inline")),
            "2 ranks x 1 thread, last, thread": (2, 1, dict(decode_on="last", decode="thread"))}
    records = interleaved(runs, rounds, lambda name, run, r: render_video(
        model, PROMPT, tmp / f"e-{r}-{len(name)}.mp4", frames=frames, ranks=run[0], threads=run[1], **DECODE_VIDEO, **run[2]))
    keys = ("total", "denoise", "decode_write", "decode_tail")
    return {"video": {**DECODE_VIDEO, "blocks": DECODE_BLOCKS, "video_frames": frames}, "model": DECODE_MODEL,
            "rounds": rounds, "median_s": {name: {k: median_of(recs, k) for k in keys} for name, recs in records.items()},
            "layer_split": {name: recs[0]["parallel"]["layer_split"] for name, recs in records.items()}}


def layout_blocks(base: int, factor: int) -> int:
    """Blocks whose video has about `factor` times the frames of a `base`-block video."""
    frames = layout_frames(base) * factor
    return max(1, round((frames - VIDEO["block"] - VIDEO["cat"]) / VIDEO["block"]) + 1)


if __name__ == "__main__":
    main()
