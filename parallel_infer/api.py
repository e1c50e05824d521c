"""`render_video`: one call for the app and the demo, on one process or on N local DualParal ranks.

With ranks > 1 this process is rank 0 (it owns the queue, decodes and writes, and calls the progress
callback) and N - 1 worker processes are spawned for the other layer groups; they exit with the call.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddm import UsageError
from ddm.checks import check_range
from ddm.io import atomic_write_json, output_lock
from parallel_infer.distributed import device_for, fail, init_with_file, ready
from parallel_infer.loader import inspect_model, load_model
from parallel_infer.render import Progress, Renderer, VideoSettings, check_prompts, owned_sidecar, plan_video


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    **settings,
) -> dict:
    """Render `prompt` to the MP4 `out_path` (+ a `.json` sidecar beside it) and return the sidecar dict.

    `settings` are the fields of `VideoSettings` (fps, height, width, steps, block, cat, cfg, flow_shift, seed,
    negative_prompt, feature_cache, coordinated_noise). `progress_callback(blocks_done, blocks)` is called
    as each block is written. `threads` sets torch's thread count in this process and each worker.
    Every setting is checked (UsageError) before any weight loads or process starts.
    """
    check_range("timeout", timeout, above=0)
    out_path = Path(out_path)
    video = VideoSettings(frames=frames, seconds=seconds, **settings)
    info = inspect_model(model_dir)
    plan = plan_video(info, video, ranks)
    check_prompts(info, plan, video, [prompt])
    owned_sidecar(out_path)  # an MP4 or sidecar there that ddm did not render is never overwritten
    with output_lock(out_path, "video", folder=False):
        return _render(model_dir, prompt, out_path, info, plan, video, ranks, threads, timeout, progress_callback)


def _render(model_dir, prompt, out_path, info, plan, video, ranks, threads, timeout, progress_callback) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    workers = store = None
    with tempfile.TemporaryDirectory(prefix="dualparal-") as tmp:
        if ranks > 1:
            store = str(Path(tmp) / "store")
            args = (ranks, store, str(model_dir), asdict(video), prompt, threads, timeout)
            workers = mp.start_processes(_worker, args=args, nprocs=ranks - 1, join=False, start_method="spawn")
        try:
            device = init_with_file(0, ranks, store, timeout) if workers else device_for(0)
            model = load_model(info, device, default_dtype(device))
            ready()
            loaded = time.perf_counter()
            record = Renderer(model, plan, video, timeout).render(prompt, video.seed, out_path, progress_callback)
        finally:
            if workers:
                _finish(workers, timeout)
    record["timings_s"]["load"] = loaded - start
    atomic_write_json(out_path.with_suffix(".json"), record)
    return record


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


def _worker(index: int, world: int, store: str, model_dir: str, settings: dict, prompt: str, threads, timeout: float) -> None:
    rank = index + 1
    if threads:
        torch.set_num_threads(threads)
    try:
        video = VideoSettings(**settings)
        info = inspect_model(model_dir)
        device = init_with_file(rank, world, store, timeout)
        model = load_model(info, device, default_dtype(device), load_vae=False)
        ready()
        Renderer(model, plan_video(info, video, world), video, timeout).render(prompt, video.seed, None)
        dist.destroy_process_group()
    except Exception as e:  # one line, then leave: the peers see the broken link within their timeout
        fail(f"rank {rank}: {e}", 2 if isinstance(e, UsageError) else 1)
