"""Render one MP4 (+ JSON sidecar) per prompt line with DualParal, on N ranks or one plain process.

  torchrun --nproc_per_node N scripts/render_videos.py --model DIR --prompts prompts.txt \
      (--frames F | --seconds S) [--fps 16] [--steps 50] [--block 8] [--cat 4] [--cfg 5.0] [--seed S] --out DIR
  python scripts/render_videos.py ...   (the same, as one process)

Video i gets seed S + i and the name NNNN-<prompt>.mp4. A video whose MP4 and sidecar already exist with the
same settings is skipped, so a re-run finishes a batch; files are written under a temp name and renamed.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ddm import OneLineParser, UsageError, run_reporting_usage_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="diffusers Wan folder or a video expert directory")
    p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
    p.add_argument("--out", required=True, type=Path, help="folder of videos: new, empty, or one ddm rendered into")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="video frames (must fit the block layout)")
    length.add_argument("--seconds", type=float, help="video length; the layout is rounded up, the video is cut to it")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--height", type=int, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--block", type=int, default=8, help="latent frames per block")
    p.add_argument("--cat", type=int, default=4, help="context latent frames shared with the previous block")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--flow-shift", type=float, help="default: the model's scheduler shift, else 3.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--no-feature-cache", action="store_true", help="ablation: blocks ignore the next block's keys/values")
    p.add_argument("--independent-noise", action="store_true", help="ablation: i.i.d. noise per block")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may stay silent while rendering before it is an error")
    p.add_argument("--threads", type=int, help="torch threads per process")


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"prompts file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {path}: {e}") from None
    if not prompts:
        raise UsageError(f"no prompts in {path}")
    return prompts


def video_name(index: int, prompt: str) -> str:
    return f"{index:04d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:48] or 'video'}.mp4"


def run(args: argparse.Namespace) -> int:
    import os

    from ddm.checks import check_range
    from ddm.io import check_owned, output_lock
    from parallel_infer.loader import inspect_model
    from parallel_infer.render import VideoSettings, check_prompts, complete_sidecar, plan_video, settings_record

    # Everything the user typed is checked here, on every rank, before any weight loads or collective call.
    check_range("--timeout", args.timeout, above=0)
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    check_owned(args.out, "videos")
    prompts = read_prompts(args.prompts)
    settings = VideoSettings(
        frames=args.frames, seconds=args.seconds, fps=args.fps, height=args.height, width=args.width, steps=args.steps,
        block=args.block, cat=args.cat, cfg=args.cfg, flow_shift=args.flow_shift, seed=args.seed,
        negative_prompt=args.negative_prompt, feature_cache=not args.no_feature_cache,
        coordinated_noise=not args.independent_noise,
    )
    info = inspect_model(args.model)
    plan = plan_video(info, settings, int(os.environ.get("WORLD_SIZE", 1)))
    check_prompts(info, plan, settings, prompts)
    videos = []
    for i, prompt in enumerate(prompts):
        path, seed = args.out / video_name(i, prompt), settings.seed + i
        done = complete_sidecar(path, settings_record(info, plan, settings, prompt, seed))
        videos.append((path, prompt, seed, done))
    if os.environ.get("RANK", "0") != "0":
        return render_batch(args, info, plan, settings, videos)
    with output_lock(args.out):  # rank 0 writes; a second batch on this --out stops here
        return render_batch(args, info, plan, settings, videos)


def render_batch(args, info, plan, settings, videos) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from ddm.io import atomic_write_json, claim_dir
    from parallel_infer.api import default_dtype
    from parallel_infer.distributed import fail, init_from_env, ready
    from parallel_infer.loader import load_model
    from parallel_infer.render import Renderer

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rank, world, device = init_from_env(args.timeout)
    try:
        todo = torch.tensor([not done for *_, done in videos], dtype=torch.uint8, device=device)
        if world > 1:  # rank 0's view of the output directory decides, also across machines
            dist.broadcast(todo, 0)
        model = load_model(info, device, default_dtype(device), load_vae=rank == 0)
        ready()
        if rank == 0:
            claim_dir(args.out, "videos")  # created and marked as ours once the model loaded, before any video
        loaded = time.perf_counter()
        renderer = Renderer(model, plan, settings, args.timeout)
        for (path, prompt, seed, _), needed in zip(videos, todo.tolist()):
            if not needed:
                if rank == 0:
                    print(f"skip {path} (complete)", file=sys.stderr)
                continue
            bar = tqdm(total=plan.config.num_blocks, desc=path.name, unit="block", disable=rank != 0)
            record = renderer.render(prompt, seed, path if rank == 0 else None, lambda done, total: bar.update(1))
            bar.close()
            if rank == 0:
                record["timings_s"]["load"] = loaded - start
                atomic_write_json(path.with_suffix(".json"), record)
    except Exception as e:
        if world == 1:
            raise
        fail(f"rank {rank}: {e}", 2 if isinstance(e, UsageError) else 1)  # leave at once: a collective teardown could wait on a dead peer
    if world > 1:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_reporting_usage_errors(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
