"""One DualParal rank's life: join the group, load the model, wait for every rank, render, leave.

Both front ends go through here: `scripts/render_videos.py` (`render_prompt_file`: one video per prompt
line, on torchrun's ranks or one plain process) and `parallel_infer.api.render_video` (one video; that
process is rank 0 and spawns the others). Either first checks the whole request with `check_request`, on
JSON alone, before any weight loads or process starts; then every rank runs `run_rank`. Rank 0 owns the
output directory and writes each JSON sidecar; the decode rank (rank 0 unless --decode-on last) writes the MP4.
"""
from __future__ import annotations

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
from parallel_infer.model_settings import describe_sources, resolve_settings
from parallel_infer.prompt_file import expand, read_prompt_file
from parallel_infer.render import (
    Plan, Progress, Renderer, VideoSettings, check_prompts, complete_sidecar, plan_video, settings_record,
)
from parallel_infer.topology import ParallelOptions, check_options


@dataclass(frozen=True)
class Video:
    prompt: str
    seed: int
    path: Path  # the MP4 rank 0 writes; its sidecar is the same path with the suffix .json
    settings: VideoSettings | None = None  # its own (a prompt line's seconds or negative prompt); None: the request's
    plan: Plan | None = None  # filled in by check_request
    source: str = ""  # where it was asked for ("prompts.jsonl line 3"), for error messages


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
    sources: dict | None = None  # where each setting came from (parallel_infer/model_settings.py)


def check_request(model_dir, settings: VideoSettings, videos: list[Video], ranks: int, timeout: float = 60.0,
                  threads: int | None = None, options: ParallelOptions = ParallelOptions()) -> Request:
    """Every check of a render (UsageError, one line), from JSON alone: nothing loads, no process starts."""
    check_range("timeout", timeout, above=0)  # also refuses nan and inf
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    info = inspect_model(model_dir)
    settings, sources = resolve_settings(info, settings)
    plan = plan_video(info, settings)
    check_options(options, info.num_layers, ranks, plan.config.guided)
    checked = []
    for video in videos:
        own = settings if video.settings is None else resolve_settings(info, video.settings)[0]
        try:
            own_plan = plan if video.settings is None else plan_video(info, own)
            check_prompts(info, own_plan, own, [video.prompt])
        except UsageError as e:
            raise UsageError(f"{video.source}: {e}" if video.source else str(e)) from None
        checked.append(replace(video, settings=own, plan=own_plan))
    return Request(info, plan, settings, checked, timeout, threads, options, sources=sources)


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
        videos = [video for video, needed in zip(request.videos, todo.tolist()) if needed]
        blocks, blocks_before = sum(video.plan.config.num_blocks for video in videos), 0

        def on_block(done: int, total: int) -> None:
            progress(blocks_before + done, blocks)

        for video in videos:
            renderer = Renderer(model, video.plan, video.settings, request.timeout, topology,
                                request.options.decode)  # cheap: wraps the loaded model
            record = renderer.render(video.prompt, video.seed, video.path, on_block if progress else None)
            blocks_before += video.plan.config.num_blocks
            if rank == 0:
                record["timings_s"]["load"] = loaded - start
                record["settings_from"] = request.sources
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


def render_prompt_file(model_dir: Path, prompts_file: Path, out_dir: Path, settings: VideoSettings, *,
                       seeds_per_prompt: int = 1, timeout: float = 60.0, threads: int | None = None,
                       options: ParallelOptions = ParallelOptions()) -> list[dict]:
    """One MP4 + sidecar per prompt line and seed (parallel_infer/prompt_file.py: plain or JSON lines, names
    `<name>-seed<seed>.mp4`), on this process's torchrun rank or alone. A video already complete with the same
    settings is skipped; one that exists with other settings is a UsageError. Every line is checked on every
    rank before any rank joins."""
    from tqdm import tqdm

    rank, world = torchrun_rank()
    check_owned(out_dir, "videos")
    videos = []
    for line, seed, name in expand(read_prompt_file(prompts_file), settings.seed, seeds_per_prompt, prompts_file):
        own = {}  # what the line sets for itself
        if line.seconds is not None:
            own.update(seconds=line.seconds, frames=None)
        if line.negative_prompt is not None:
            own.update(negative_prompt=line.negative_prompt)
        own = replace(settings, **own) if own else None
        videos.append(Video(line.prompt, seed, out_dir / name, own, source=f"{prompts_file} line {line.line}"))
    request = replace(check_request(model_dir, settings, videos, world, timeout, threads, options), out_dir=out_dir)
    complete = [complete_sidecar(v.path, settings_record(request.info, v.plan, v.settings, v.prompt, v.seed))
                for v in request.videos]
    if rank == 0:
        print(describe_sources(request.settings, request.sources))  # information, on stdout: stderr is for the one-line error
        for video, done in zip(request.videos, complete):
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
