"""`render_video`: one call for the app and the demo, on one process or on N local DualParal ranks.

With ranks > 1 this process is rank 0 (it owns the queue, decodes and writes, and calls the progress
callback) and N - 1 worker processes are spawned for the other layer groups; they exit with the call.
Every rank runs `parallel_infer.batch.run_rank`, as the ranks of `scripts/render_videos.py` do.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from ddm.io import output_lock
from parallel_infer.batch import Request, Video, check_request, run_rank
from parallel_infer.layer_split import parse_layer_split
from parallel_infer.model_settings import describe_sources
from parallel_infer.render import Progress, VideoSettings, owned_sidecar
from parallel_infer.topology import ParallelOptions


def render_video(
    model_dir: str | Path,
    prompt: str,
    out_path: str | Path,
    *,
    frames: int | None = None,
    seconds: float | None = None,
    ranks: int = 1,
    threads: int | None = None,
    timeout: float = 60.0,
    progress_callback: Progress | None = None,
    layer_split: str | tuple[int, ...] | None = None,
    cfg_parallel: bool = False,
    decode_on: str = "first",
    decode: str = "auto",
    **settings,
) -> dict:
    """Render `prompt` to the MP4 `out_path` (+ a `.json` sidecar beside it) and return the sidecar dict.

    `settings` are the fields of `VideoSettings` (fps, height, width, steps, block, cat, cfg, flow_shift, sampler, seed,
    negative_prompt, feature_cache, coordinated_noise); one not given (or None) comes from the model's
    video_settings.json, else Wan's defaults, and stdout gets a line saying where each came from (also in the
    record's "settings_from"). `progress_callback(blocks_done, blocks)` is called
    as each block is written (with `decode_on="last"` and ranks > 1 a worker decodes, and it is not called).
    `threads` sets torch's thread count in this process and each worker. Placement (the video is the same):
    `layer_split` ("auto"/None: balanced by measured cost, or "14,16" / (14, 16) layers per stage),
    `cfg_parallel` (two rank groups, conditional and unconditional), `decode_on` ("first" or "last" rank),
    `decode` ("thread": beside denoising, "inline": on the critical path, "auto": thread on a GPU, inline on a CPU).
    Every setting is checked (UsageError) before any weight loads or process starts, as the CLI checks it.
    """
    video = VideoSettings(frames=frames, seconds=seconds, **settings)
    out_path = Path(out_path)
    split = parse_layer_split(layer_split) if isinstance(layer_split, str) else layer_split
    options = ParallelOptions(split, cfg_parallel, decode_on, decode)
    request = check_request(model_dir, video, [Video(prompt, video.seed, out_path)], ranks, timeout, threads, options)
    print(describe_sources(request.settings, request.sources))  # information, on stdout: stderr is for the one-line error
    owned_sidecar(out_path)  # an MP4 or sidecar there that ddm did not render is never overwritten
    with output_lock(out_path, "video", folder=False):
        return _render(request, ranks, timeout, progress_callback)


def _render(request: Request, ranks: int, timeout: float, progress_callback: Progress | None) -> dict:
    workers = store = None
    with tempfile.TemporaryDirectory(prefix="dualparal-") as tmp:
        if ranks > 1:
            store = str(Path(tmp) / "store")
            workers = mp.start_processes(_worker, args=(ranks, store, request), nprocs=ranks - 1, join=False, start_method="spawn")
        try:
            [record] = run_rank(request, 0, ranks, store, exit_on_error=False, progress=progress_callback)
        finally:
            if workers:
                _finish(workers, timeout)
    return record


def _worker(index: int, world: int, store: str, request: Request) -> None:
    run_rank(request, index + 1, world, store, exit_on_error=True)


def _finish(workers, timeout: float) -> None:
    """Tear down: workers exit by themselves (after an error too, within the timeout); stragglers are killed."""
    if dist.is_initialized():
        dist.destroy_process_group()
    deadline = time.monotonic() + timeout
    for p in workers.processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
