"""A warm DualParal render pool: N rank processes that load a model once and render one video per request.

`parallel_infer.api.render_video` starts its ranks, loads the model and tears everything down in every call;
an app that renders again and again wants the ranks to stay. A `RenderPool` spawns all N ranks (rank 0
included, so the caller's process never joins a process group), each joins the group and loads the model,
then waits for requests on its own queue. A request is checked on JSON alone by `check_request` in the
caller, sent to every rank, and rendered by the same `Renderer` as a batch; rank 0 reports progress per
block, then the sidecar record, on one event queue. Asked for a segments folder, rank 0 also writes each block
as a small video segment there (stream.SegmentWriter) and reports its path before the block's progress, so an
app can show the video as it grows; only the render that asks pays for it. A failed render closes the pool
(the next one starts afresh); `close()` asks the ranks to leave and kills any that does not within the
timeout. Ranks also leave by themselves when the process that made the pool is gone.
"""
from __future__ import annotations

import os
import queue
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddm import UsageError
from ddm.io import atomic_write_json
from parallel_infer.batch import Request, Video, check_request, default_dtype
from parallel_infer.distributed import STARTUP_TIMEOUT, join_group, ready
from parallel_infer.loader import inspect_model, load_model
from parallel_infer.render import Progress, Renderer, VideoSettings

POLL_S = 1.0  # how often a waiting rank checks that its parent is alive, and the caller that its ranks are


def model_key(model_dir: str | Path, ranks: int, threads: int | None) -> tuple:
    """What a warm pool is good for: the same folder with the same files (by modification time), rank count and
    thread count. A retrained model in the same folder changes the key."""
    path = Path(model_dir).resolve()
    files = sorted(p for pattern in ("*.json", "*.safetensors", "*/*.json", "*/*.safetensors") for p in path.glob(pattern))
    return (str(path), tuple((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in files), ranks, threads)


class RenderPool:
    def __init__(self, model_dir: str | Path, ranks: int = 1, threads: int | None = None, timeout: float = 60.0):
        if not isinstance(ranks, int) or ranks < 1:
            raise UsageError(f"ranks must be a positive integer, got {ranks!r}")
        self.model_dir, self.ranks, self.threads, self.timeout = Path(model_dir), ranks, threads, timeout
        self.key = model_key(model_dir, ranks, threads)
        info = inspect_model(model_dir)  # a folder that is no model fails here, before any process starts
        context = mp.get_context("spawn")
        self.jobs = [context.Queue() for _ in range(ranks)]
        self.events = context.Queue()
        self.scratch = tempfile.TemporaryDirectory(prefix="dualparal-pool-")
        store = str(Path(self.scratch.name) / "store")
        self.processes = [
            context.Process(target=_serve, args=(rank, ranks, store, info, threads, timeout, os.getpid(), self.jobs[rank], self.events), daemon=True)
            for rank in range(ranks)
        ]
        for p in self.processes:
            p.start()
        self.ready = False
        self.load_seconds = None
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.jobs, timeout, self.scratch)

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(p.is_alive() for p in self.processes)

    def render(self, prompt: str, out_path: str | Path, *, frames: int | None = None, seconds: float | None = None,
               progress_callback: Progress | None = None, segments: str | Path | None = None,
               segment_callback: Callable[[Path, int], None] | None = None, **settings) -> dict:
        """As `api.render_video`, on the warm ranks; record["timings_s"]["load"] is the time this call waited
        for the ranks to load (0 once they have). With a `segments` folder, each block is also written there as
        `block-NNNN.ts` and `segment_callback(path, frames)` is called as each is complete, before that block's
        `progress_callback`; the MP4 is the same as without."""
        video = VideoSettings(frames=frames, seconds=seconds, **settings)
        request = check_request(self.model_dir, video, [Video(prompt, video.seed, Path(out_path))], self.ranks, self.timeout, self.threads)
        start = time.perf_counter()
        self.wait_ready()
        waited = time.perf_counter() - start
        job = (request, None if segments is None else str(segments))
        for jobs in self.jobs:
            jobs.put(job)
        record = self._wait("done", self.timeout * (request.plan.config.num_iterations + 1), progress_callback,
                            segment_callback)
        record["timings_s"]["load"] = waited
        return record

    def wait_ready(self) -> None:
        """Until every rank has loaded the model (at once when they have)."""
        if not self.ready:
            self.load_seconds = self._wait("ready", STARTUP_TIMEOUT)
            self.ready = True

    def _wait(self, wanted: str, limit: float, progress: Progress | None = None,
              on_segment: Callable[[Path, int], None] | None = None):
        """The payload of the next `wanted` event; progress and segment events go to `progress` and `on_segment`.
        An error, a rank that exits, or silence longer than `limit` closes the pool and raises."""
        deadline = time.monotonic() + limit
        while True:
            try:
                kind, payload = self.events.get(timeout=POLL_S)
            except queue.Empty:
                if not all(p.is_alive() for p in self.processes) or time.monotonic() > deadline:
                    codes = [p.exitcode for p in self.processes]
                    self.close()
                    raise RuntimeError(f"the render pool stopped (rank exit codes {codes}) or was silent for {limit:.0f} s")
                continue
            if kind == "error":
                self.close()
                message, usage = payload
                raise (UsageError if usage else RuntimeError)(message)
            if kind == "block":
                deadline = time.monotonic() + limit
                if progress is not None:
                    progress(*payload)
            elif kind == "segment":
                if on_segment is not None:
                    path, frames = payload
                    on_segment(Path(path), frames)
            elif kind == wanted:
                return payload

    def close(self) -> None:
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shutdown(processes, jobs, timeout: float, scratch) -> None:
    for q in jobs:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + min(timeout, 10.0)
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    scratch.cleanup()


def _next_job(jobs, parent: int):
    """The next (request, segments folder or None), None to leave; also None once the parent process is gone."""
    while True:
        try:
            return jobs.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _serve(rank: int, world: int, store: str, info, threads, timeout: float, parent: int, jobs, events) -> None:
    """One rank: join, load, then render each request until told to leave. Errors go to the event queue."""
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        device = join_group(rank, world, timeout, store)
        model = load_model(info, device, default_dtype(device), load_vae=rank == 0)
        ready()
        if rank == 0:
            events.put(("ready", time.perf_counter() - start))
        while (job := _next_job(jobs, parent)) is not None:
            _render(*job, model, rank, events)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the caller, which then closes the pool
        message = str(e) if str(e).startswith(f"rank {rank}:") else f"rank {rank}: {e}"  # PeerFailure names it
        events.put(("error", (message, isinstance(e, UsageError))))
        events.close()
        events.join_thread()
        os._exit(2 if isinstance(e, UsageError) else 1)  # a peer may be gone: no collective teardown that could hang
    if dist.is_initialized():
        dist.destroy_process_group()
    events.close()
    events.join_thread()  # what rank 0 reported is in the pipe
    os._exit(0)  # a normal interpreter exit can hang in native thread pools' teardown after torch ran here


def _render(request: Request, segments: str | None, model, rank: int, events) -> None:
    for video in request.videos:
        renderer = Renderer(model, video.plan, video.settings, request.timeout)
        progress = (lambda done, total: events.put(("block", (done, total)))) if rank == 0 else None
        on_segment = (lambda path, frames: events.put(("segment", (str(path), frames)))) if rank == 0 else None
        record = renderer.render(video.prompt, video.seed, video.path if rank == 0 else None, progress,
                                 Path(segments) if segments is not None and rank == 0 else None, on_segment)
        if rank == 0:
            record["settings_from"] = request.sources
            atomic_write_json(video.path.with_suffix(".json"), record)
            events.put(("done", record))
