"""Benchmark: time per frame of the shipped video model at the settings it carries.

    python scripts/bench_video_model.py [--model ddm/assets/video/quick] [--seconds 8] [--ranks 1 2] [--rounds 3]
                                        [--json docs/benchmarks/video_model.json]

Renders `--seconds` of the demo prompt through `parallel_infer.api.render_video`, giving nothing but the length
and the seed: steps, block, context, CFG, flow shift, sampler, fps and canvas all come from the model's
video_settings.json. Each rank count in `--ranks` (DualParal processes of 1 thread each) renders once per round,
the rank counts interleaved round by round (the machine may be shared); the median round counts. Per rank count
it prints milliseconds per frame of denoising and of the whole render (the sidecar's `total`: prompt encoding,
denoising, decoding and MP4 writing), and the wall time the caller waited (process start and weight loading
included).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "ddm" / "assets" / "video" / "quick", help="video model folder")
    parser.add_argument("--prompt", default="a 3 moving right", help="prompt of every render (the demo's)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each video")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="DualParal process counts to time")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per rank count; the median counts")
    parser.add_argument("--json", type=Path, help="also write the figures here (e.g. docs/benchmarks/video_model.json)")
    args = parser.parse_args()

    from ddm import UsageError, run_reporting_usage_errors
    from parallel_infer.api import render_video

    def run() -> int:
        if args.rounds < 1 or args.seconds <= 0 or min(args.ranks) < 1:
            raise UsageError(f"--rounds {args.rounds}, --seconds {args.seconds} and --ranks {args.ranks} must be positive")
        runs = {ranks: [] for ranks in args.ranks}
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for ranks in args.ranks:
                    out = Path(tmp) / f"r{ranks}-{round_}.mp4"
                    start = time.perf_counter()
                    record = render_video(args.model, args.prompt, out, seconds=args.seconds, seed=0, ranks=ranks, threads=1)
                    wall = time.perf_counter() - start
                    frames = record["frames_written"]
                    runs[ranks].append({"frames": frames, "denoise_s": record["timings_s"]["denoise"],
                                        "total_s": record["timings_s"]["total"], "wall_s": wall})
        settings = {k: record["settings"][k] for k in ("steps", "block", "cat", "guidance_scale", "flow_shift", "sampler", "fps", "height", "width")}
        results = []
        print(f"{args.model}: {frames} frames of {args.prompt!r} at its carried settings {settings}")
        print(f"{'ranks':>5} {'denoise ms/frame':>17} {'render ms/frame':>16} {'wall s':>8}   (median of {args.rounds})")
        for ranks, rows in runs.items():
            median = {k: statistics.median(r[k] for r in rows) for k in ("denoise_s", "total_s", "wall_s")}
            row = {"ranks": ranks, "threads_per_rank": 1, "frames": frames,
                   "denoise_ms_per_frame": 1000 * median["denoise_s"] / frames,
                   "render_ms_per_frame": 1000 * median["total_s"] / frames, "wall_s": median["wall_s"], "rounds": rows}
            results.append(row)
            print(f"{ranks:>5} {row['denoise_ms_per_frame']:>17.2f} {row['render_ms_per_frame']:>16.2f} {row['wall_s']:>8.2f}")
        if args.json:
            from ddm.io import atomic_write_json

            atomic_write_json(args.json, {
                "command": "python scripts/bench_video_model.py " + " ".join(sys.argv[1:]),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
                "model": str(args.model), "model_step": json.loads((args.model / "expert.json").read_text()).get("step"),
                "prompt": args.prompt, "settings": settings, "results": results,
            })
        return 0

    return run_reporting_usage_errors(run)


if __name__ == "__main__":
    sys.exit(main())
