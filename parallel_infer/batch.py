"""One DualParal rank's life: join the group, load the model, wait for every rank, render, leave.

Both front ends go through here: `scripts/render_videos.py` (`render_prompt_file`: one video per prompt
line, on torchrun's ranks or one plain process) and `parallel_infer.api.render_video` (one video; that
process is rank 0 and spawns the others). Either first checks the whole request with `check_request`, on
JSON alone, before any weight loads or process starts; then every rank runs `run_rank`. Rank 0 owns the
output directory and writes each JSON sidecar; the decode rank (rank 0 unless --decode-on last) writes the MP4.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ddm import UsageError
from ddm.checks import check_range
from ddm.io import atomic_write_json, check_owned, claim_dir, output_lock
from parallel_infer.balance import choose_topology
from parallel_infer.distributed import fail, join_group, ready, torchrun_rank
from parallel_infer.loader import ModelInfo, inspect_model, load_model
from parallel_infer.render import (
    Plan, Progress, Renderer, VideoSettings, check_prompts, complete_sidecar, plan_video, settings_record,
)
from parallel_infer.topology import ParallelOptions, check_options


@dataclass(frozen=True)
class Video:
    prompt: str
    seed: int
    path: Path  # the MP4 rank 0 writes; its sidecar is the same path with the suffix .json


@dataclass(frozen=True)
class Request:
    """A checked request: everything every rank needs (picklable, so spawned workers receive it as is)."""

    info: ModelInfo
    plan: Plan
    settings: VideoSettings
    videos: list[Video]
    timeout: float  # seconds a rank may stay silent while rendering
    threads: int | None = None  # torch threads per process; None = torch's default
    options: ParallelOptions = ParallelOptions()
    out_dir: Path | None = None  # a batch's folder: rank 0 creates and marks it once every rank has loaded


def check_request(model_dir, settings: VideoSettings, videos: list[Video], ranks: int, timeout: float = 60.0,
                  threads: int | None = None, options: ParallelOptions = ParallelOptions()) -> Request:
    """Every check of a render (UsageError, one line), from JSON alone: nothing loads, no process starts."""
    check_range("timeout", timeout, above=0)  # also refuses nan and inf
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    info = inspect_model(model_dir)
    plan = plan_video(info, settings)
    check_options(options, info.num_layers, ranks, plan.config.guided)
    check_prompts(info, plan, settings, [video.prompt for video in videos])
    return Request(info, plan, settings, videos, timeout, threads, options)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_rank(request: Request, rank: int, world: int, store_file: str | None = None, *, exit_on_error: bool,
             complete: list[bool] | None = None, progress: Progress | None = None) -> list[dict]:
    """This rank's whole part of the request; rank 0 returns the sidecar dict of each video it rendered.

    Joins the group (`store_file` for spawned ranks, else torchrun's environment; a world of one joins
    none), fixes every rank's role (balance.py: rank 0 measures and splits the layers unless the request gives
    the split), loads this rank's slice of the model (the VAE on the decode rank only), waits until every rank
    has loaded, and renders every
    video that rank 0 does not find `complete`. `progress(blocks done, blocks)` counts over the batch, on
    rank 0. On an error, `exit_on_error` leaves the process at once with one line `error: rank R: ...`
    (exit 2 for a UsageError, else 1): a collective teardown could wait forever on a dead peer. Otherwise
    the error is raised, and the caller tears the group down.
    """
    if request.threads:
        torch.set_num_threads(request.threads)
    start = time.perf_counter()
    records = []
    try:
        device = join_group(rank, world, request.timeout, store_file)
        todo = torch.tensor([not done for done in complete or [False] * len(request.videos)], dtype=torch.uint8)
        if world > 1:  # rank 0's view of the output directory decides, also across machines
            todo = todo.to(device)
            dist.broadcast(todo, 0)
        dtype = default_dtype(device)
        topology, costs = choose_topology(request.info, request.plan, request.options, rank, world, device, dtype)
        model = load_model(request.info, device, dtype, load_vae=rank == topology.decode_rank, layers=topology.layers(rank))
        ready()
        if rank == 0 and request.out_dir is not None:
            claim_dir(request.out_dir, "videos")  # so a model that fails to load leaves nothing behind
        loaded = time.perf_counter()
        renderer = Renderer(model, request.plan, request.settings, request.timeout, topology, request.options.decode_thread)
        videos = [video for video, needed in zip(request.videos, todo.tolist()) if needed]
        blocks, blocks_before = request.plan.config.num_blocks, 0

        def on_block(done: int, total: int) -> None:
            progress(blocks_before + done, len(videos) * blocks)

        for video in videos:
            record = renderer.render(video.prompt, video.seed, video.path, on_block if progress else None)
            blocks_before += blocks
            if rank == 0:
                record["timings_s"]["load"] = loaded - start
                if costs is not None:
                    record["parallel"]["measured_ms_per_block_step"] = costs.as_ms()
                atomic_write_json(video.path.with_suffix(".json"), record)
                records.append(record)
    except Exception as e:
        if not exit_on_error:
            raise
        fail(f"rank {rank}: {e}", 2 if isinstance(e, UsageError) else 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return records


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


def render_prompt_file(model_dir: Path, prompts_file: Path, out_dir: Path, settings: VideoSettings, *,
                       timeout: float = 60.0, threads: int | None = None,
                       options: ParallelOptions = ParallelOptions()) -> list[dict]:
    """One MP4 + sidecar per prompt line (video i: seed settings.seed + i, name NNNN-<prompt>.mp4), on this
    process's torchrun rank or alone. A video already complete with the same settings is skipped; one that
    exists with other settings is a UsageError. Everything is checked on every rank before any rank joins."""
    from tqdm import tqdm

    rank, world = torchrun_rank()
    check_owned(out_dir, "videos")
    prompts = read_prompts(prompts_file)
    videos = [Video(prompt, settings.seed + i, out_dir / video_name(i, prompt)) for i, prompt in enumerate(prompts)]
    request = replace(check_request(model_dir, settings, videos, world, timeout, threads, options), out_dir=out_dir)
    info, plan = request.info, request.plan
    complete = [complete_sidecar(v.path, settings_record(info, plan, settings, v.prompt, v.seed)) for v in videos]
    if rank == 0:
        for video, done in zip(videos, complete):
            if done:
                print(f"skip {video.path} (complete)", file=sys.stderr)
    bar = None  # opened at the first block, so an error before it (a bad model, a lock) stays one line

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="block", disable=rank != options.decode_rank(world))
        bar.total = total
        bar.update(done - bar.n)

    try:
        if rank != 0:
            return run_rank(request, rank, world, exit_on_error=world > 1, complete=complete, progress=progress)
        with output_lock(out_dir):  # rank 0 writes; a second batch on this folder stops here, naming the holder
            return run_rank(request, rank, world, exit_on_error=world > 1, complete=complete, progress=progress)
    finally:
        if bar is not None:
            bar.close()
