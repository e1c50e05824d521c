"""DualParal on this CPU with a small random-weight Wan (about 2M parameters, pixel space, 16x16 frames).

  python scripts/bench_dualparal.py [--json docs/benchmarks/dualparal.json]

(a) speedup: 2 ranks x 1 thread vs 1 process x 2 threads (equal cores), denoising time of the same video;
(b) traffic: bytes sent between ranks per block-step, measured, beside the formula, and beside what
    DeepSpeed-Ulysses sequence parallelism would move for the same video and ranks;
(c) memory: peak RSS of one rendering process for videos of 1x, 4x and 16x the frames;
(d) time per frame for the same three lengths.
Every run goes through `parallel_infer.api.render_video` (decode + MP4 writing included in (c), not in (a)).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MODEL = dict(layers=8, heads=4, head_dim=32, ffn=512, text_dim=64)
VIDEO = dict(steps=8, block=4, cat=2, height=16, width=16, cfg=5.0, seed=0)
PROMPT = "a cat runs"
BYTES = 4  # float32


def layout_frames(blocks: int) -> int:
    return VIDEO["block"] + VIDEO["cat"] + (blocks - 1) * VIDEO["block"]


def render(model_dir: Path, out: Path, blocks: int, ranks: int, threads: int, steps: int) -> dict:
    from parallel_infer.api import render_video

    return render_video(model_dir, PROMPT, out, frames=layout_frames(blocks), ranks=ranks, threads=threads,
                        **{**VIDEO, "steps": steps})


def child(args) -> None:
    """One rendering in a fresh process: its peak RSS is the video's, not the benchmark's."""
    record = render(Path(args.model), Path(args.out), args.blocks, 1, 2, args.steps)
    record["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=Path("docs/benchmarks/dualparal.json"))
    p.add_argument("--blocks", type=int, default=12, help="blocks in the (a)/(b) video")
    p.add_argument("--repeats", type=int, default=2, help="(a) runs per setting; the fastest counts")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=VIDEO["steps"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    from ddm.io import atomic_write_json
    from parallel_infer.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-dualparal-"))
    model_dir = write_tiny_model(tmp / "model", prompts=(PROMPT, ""), text_tokens=16, **MODEL)
    from diffusers import WanTransformer3DModel

    params = sum(p.numel() for p in WanTransformer3DModel.from_pretrained(model_dir / "transformer").parameters())
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
               "command": "python scripts/bench_dualparal.py", "model": {**MODEL, "parameters": params}, "video": VIDEO}

    # (a) speedup and (b) traffic, on the same video
    runs = {"1 process x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}
    timing = {}
    for name, (ranks, threads) in runs.items():
        best = None
        for r in range(args.repeats):
            rec = render(model_dir, tmp / f"a-{ranks}-{r}.mp4", args.blocks, ranks, threads, VIDEO["steps"])
            if best is None or rec["timings_s"]["denoise"] < best["timings_s"]["denoise"]:
                best = rec
        timing[name] = best
    one, two = timing["1 process x 2 threads"], timing["2 ranks x 1 thread"]
    speedup = one["timings_s"]["denoise"] / two["timings_s"]["denoise"]
    results["a_speedup"] = {"blocks": args.blocks, "latent_frames": layout_frames(args.blocks),
                            "denoise_s_1proc_2threads": one["timings_s"]["denoise"],
                            "denoise_s_2ranks_1thread": two["timings_s"]["denoise"], "speedup": speedup, "target": 1.6}
    expected = traffic(args.blocks, 2, VIDEO["steps"])
    results["b_traffic_bytes_per_block_step"] = {"measured": two["bytes_sent_per_block_step"], **expected, "ranks": 2}

    # (c) memory and (d) time per frame: 1x, 4x, 16x the frames, each in a fresh process
    base = 2
    lengths = []
    for factor in (1, 4, 16):
        blocks = layout_blocks(base, factor)
        out = subprocess.run([sys.executable, __file__, "--child", "--model", str(model_dir), "--out",
                              str(tmp / f"c-{factor}.mp4"), "--blocks", str(blocks), "--steps", "4"],
                             check=True, capture_output=True, text=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        frames = rec["frames_written"]
        lengths.append({"factor": factor, "blocks": blocks, "video_frames": frames, "max_rss_mib": rec["max_rss_mib"],
                        "denoise_s": rec["timings_s"]["denoise"], "total_s": rec["timings_s"]["total"],
                        "ms_per_frame": 1000 * (rec["timings_s"]["denoise"] + rec["timings_s"]["decode_write"]) / frames})
    rss = [x["max_rss_mib"] for x in lengths]
    per_frame = [x["ms_per_frame"] for x in lengths]
    results["c_memory"] = {"runs": lengths, "rss_spread": max(rss) / min(rss) - 1, "target_spread": 0.10}
    results["d_time_per_frame"] = {"ms_per_frame": per_frame, "spread": max(per_frame) / min(per_frame) - 1}
    atomic_write_json(args.json, results)

    print(f"model: {params / 1e6:.2f}M parameters; video {VIDEO}")
    print(f"(a) {args.blocks} blocks, denoise: 1 proc x 2 threads {one['timings_s']['denoise']:.2f} s | "
          f"2 ranks x 1 thread {two['timings_s']['denoise']:.2f} s | speedup {speedup:.2f}x (target 1.6x)")
    b = results["b_traffic_bytes_per_block_step"]
    print(f"(b) bytes/block-step, 2 ranks: measured {b['measured']:.0f} | formula {b['dualparal_formula']:.0f} | "
          f"Ulysses {b['ulysses']:.0f} ({b['ulysses'] / b['measured']:.1f}x more)")
    print("(c)(d) length | frames | peak RSS MiB | ms/frame")
    for x in lengths:
        print(f"      {x['factor']:>3}x   | {x['video_frames']:>6} | {x['max_rss_mib']:>12.1f} | {x['ms_per_frame']:.1f}")
    print(f"      RSS spread {results['c_memory']['rss_spread']:.1%} (target <= 10%), "
          f"time/frame spread {results['d_time_per_frame']['spread']:.1%}")
    print(f"wrote {args.json}")


def layout_blocks(base: int, factor: int) -> int:
    """Blocks whose video has about `factor` times the frames of a `base`-block video."""
    frames = layout_frames(base) * factor
    return max(1, round((frames - VIDEO["block"] - VIDEO["cat"]) / VIDEO["block"]) + 1)


if __name__ == "__main__":
    main()
