"""Benchmark: the app's Video tab with warm worker processes vs a fresh start per render.

    python scripts/bench_app_video.py [--model ddm/assets/video/quick] [--seconds 2] [--workers 2] [--renders 3]

Renders the same prompt `--renders` times through the app's own action (`Actions.render_video`, which keeps a
`parallel_infer.pool.RenderPool`), as many times more on the warm pool through the Render button's action
(`Actions.render_video_live`, which also writes each block as a video segment for the live player), then once
more through `parallel_infer.api.render_video` (spawn, load, render, tear down: what every render cost before
the pool). Per render it prints the wall time the caller waited, the time spent waiting for the model to load,
the render itself (the sidecar's `total`: prompt encoding, denoising, decoding and writing), the ratio
wall / render, and the seconds spent decoding and writing (the segments' encoding included). The target: from
the second render on, load ~ 0 and wall <= 1.2 x render. Settings are the model's own (its video_settings.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "ddm" / "assets" / "video" / "quick", help="video model folder")
    parser.add_argument("--prompt", default="a 3 moving right", help="prompt of every render")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each video")
    parser.add_argument("--workers", type=int, default=2, help="DualParal ranks of the warm pool")
    parser.add_argument("--renders", type=int, default=3, help="renders in a row (the first one loads)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from app_actions import Actions
    from frontends.app_inputs import AllowedRoots
    from frontends.app_video import STREAMING
    from parallel_infer.api import render_video
    from parallel_infer.loader import inspect_model
    from parallel_infer.model_settings import resolve_settings
    from parallel_infer.render import VideoSettings

    settings, _ = resolve_settings(inspect_model(args.model), VideoSettings(seconds=args.seconds))
    fields = dict(fps=settings.fps, height=settings.height, width=settings.width, steps=settings.steps,
                  block=settings.block, cat=settings.cat, cfg=settings.cfg)
    scratch = tempfile.TemporaryDirectory(prefix="bench-app-video-")
    actions = Actions(AllowedRoots([args.model.resolve().parent]), Path(scratch.name))
    rows = []
    try:
        for path, action in (("app, warm pool", actions.render_video), ("app, warm pool, live", actions.render_video_live)):
            for i in range(args.renders):
                start = time.perf_counter()
                result = action(
                    str(args.model.resolve()), args.prompt, "", args.seconds, fields["fps"], fields["height"],
                    fields["width"], fields["steps"], fields["block"], fields["cat"], fields["cfg"], i, args.workers,
                    progress=lambda *a, **k: None,
                )
                record = (list(result)[-1] if path.endswith("live") else result)[-1]  # live: its last yield
                rows.append((path, i + 1, time.perf_counter() - start, record))
    finally:
        actions.close()
        scratch.cleanup()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        record = render_video(args.model, args.prompt, Path(tmp) / "v.mp4", seconds=args.seconds, ranks=args.workers,
                              seed=0, **{k: v for k, v in fields.items()})
        rows.append(("render_video, fresh", 1, time.perf_counter() - start, record))

    print(f"model {args.model}, {args.seconds:g} s of video, {args.workers} workers, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, settings {fields}, "
          f"live segments {'on' if STREAMING else 'off (no ffmpeg/ffprobe on PATH)'}")
    print(f"{'path':<22} {'render #':>8} {'wall s':>7} {'load s':>7} {'render s':>8} {'wall/render':>11} {'decode+write s':>14}")
    figures = []
    for path, n, wall, record in rows:
        load, render, write = (record["timings_s"][k] for k in ("load", "total", "decode_write"))
        print(f"{path:<22} {n:>8} {wall:>7.2f} {load:>7.2f} {render:>8.2f} {wall / render:>11.2f} {write:>14.2f}")
        figures.append({"path": path, "render": n, "wall_s": wall, "load_s": load, "render_s": render,
                        "decode_write_s": write})
    if args.json:
        args.json.write_text(json.dumps({"settings": fields, "workers": args.workers, "seconds": args.seconds,
                                         "rows": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
