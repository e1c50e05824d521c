r"""Render one MP4 (+ JSON sidecar) per prompt line and seed with DualParal, on N ranks or one plain process.

  torchrun --nproc_per_node N scripts/render_videos.py --model DIR --prompts prompts.txt \
      (--frames F | --seconds S) [--seeds-per-prompt N] [--steps ...] --out DIR
  python scripts/render_videos.py ...   (the same, as one process)
  torchrun --nnodes 2 --node-rank I --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      scripts/render_videos.py ...      (two machines; see docs/dualparal.md)

The prompts file holds plain prompts, or JSON lines with "prompt" and optionally "seed", "negative_prompt",
"seconds" and "name"; every line is checked before any model loads. A line renders --seeds-per-prompt videos,
seeds s .. s+N-1 (s: its "seed", else --seed), named <name>-seed<s>.mp4 (name: its "name", else the prompt).
Settings not given take the model's video_settings.json, else Wan2.1's defaults (50 steps, block 8, cat 4,
CFG 5, shift 3, 16 fps); the first line printed says where each came from. A video whose MP4 and sidecar
already exist with the same settings is skipped, so a re-run finishes a batch; files are written under a temp
name and renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddm import OneLineParser, run_reporting_usage_errors
from parallel_infer.config import SAMPLERS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help line (where it has one), and the examples above kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":  # no default to show
            return action.help
        return super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="diffusers Wan folder or a video expert directory")
    p.add_argument("--prompts", required=True, type=Path, help="one prompt per line, or JSON lines (see above)")
    p.add_argument("--out", required=True, type=Path, help="folder of videos: new, empty, or one ddm rendered into")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="video frames (must fit the block layout)")
    length.add_argument("--seconds", type=float, help="video length; the layout is rounded up, the video is cut to it")
    p.add_argument("--seeds-per-prompt", type=int, default=1, help="videos per prompt line, with consecutive seeds")
    model = "default: the model's video_settings.json, else"
    p.add_argument("--fps", type=int, help=f"frames per second of the MP4 (and of --seconds) ({model} 16)")
    p.add_argument("--height", type=int, help="pixels (default: video_settings.json, else the model's size)")
    p.add_argument("--width", type=int, help="pixels (default: video_settings.json, else the model's size)")
    p.add_argument("--steps", type=int, help=f"denoising steps per block ({model} 50)")
    p.add_argument("--block", type=int, help=f"latent frames per block ({model} 8)")
    p.add_argument("--cat", type=int, help=f"context latent frames shared with the previous block ({model} 4)")
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale, 1 = off ({model} 5.0)")
    p.add_argument("--flow-shift", type=float, help=f"flow shift of the sampler ({model} the model's scheduler shift, else 3.0)")
    p.add_argument("--sampler", choices=SAMPLERS, help=f"each block's ODE solver ({model} the model's scheduler class, else unipc)")
    p.add_argument("--seed", type=int, default=0, help="seed of lines that give none (the first of --seeds-per-prompt)")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance, for lines that give none (default: empty)")
    p.add_argument("--no-feature-cache", action="store_true", help="ablation: blocks ignore the next block's keys/values")
    p.add_argument("--independent-noise", action="store_true", help="ablation: i.i.d. noise per block")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may stay silent while rendering before it is an error")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    place = p.add_argument_group("placement across ranks (the video is the same)")
    place.add_argument("--layer-split", default="auto",
                       help="layers per pipeline stage, e.g. 14,16; auto: balanced by the costs rank 0 measures")
    place.add_argument("--cfg-parallel", action="store_true",
                       help="two rank groups run the conditional and the unconditional branch (even rank count, --cfg != 1)")
    place.add_argument("--decode-on", choices=["first", "last"], default="first", help="the rank that decodes and writes the MP4")
    place.add_argument("--decode", choices=["auto", "thread", "inline"], default="auto",
                       help="thread: decode beside denoising (its own CUDA stream); inline: on the denoising thread; "
                            "auto: thread on a GPU, inline on a CPU")


def run(args: argparse.Namespace) -> int:
    from parallel_infer.batch import render_prompt_file
    from parallel_infer.layer_split import parse_layer_split
    from parallel_infer.render import VideoSettings
    from parallel_infer.topology import ParallelOptions

    settings = VideoSettings(
        frames=args.frames, seconds=args.seconds, fps=args.fps, height=args.height, width=args.width, steps=args.steps,
        block=args.block, cat=args.cat, cfg=args.cfg, flow_shift=args.flow_shift,
        sampler=args.sampler, seed=args.seed,
        negative_prompt=args.negative_prompt, feature_cache=not args.no_feature_cache,
        coordinated_noise=not args.independent_noise,
    )
    options = ParallelOptions(parse_layer_split(args.layer_split), args.cfg_parallel, args.decode_on, args.decode)
    render_prompt_file(args.model, args.prompts, args.out, settings, seeds_per_prompt=args.seeds_per_prompt,
                       timeout=args.timeout, threads=args.threads, options=options)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run_reporting_usage_errors(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
