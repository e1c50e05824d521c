"""The Video tab's actions (app.py): model settings and prompt hints, and renders through DualParal ranks kept warm
between renders (parallel_infer/pool.py), streamed block by block into a live player where Gradio can.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import uuid
from pathlib import Path

import gradio as gr

from ddm import UsageError
from frontends.app_inputs import MAX_STEPS, AllowedRoots, UserError, float_in_range, friendly, int_in_range

APP_DIR = Path(__file__).resolve().parents[1]
MAX_SECONDS = 600
MAX_PIXELS = 1280
MAX_WORKERS = max(1, os.cpu_count() or 1)
# Gradio's streaming video output probes and re-muxes each segment with the ffmpeg and ffprobe on PATH (the
# imageio-ffmpeg binary that writes our MP4s is not there); without them the Video tab shows only the complete MP4.
STREAMING = all(shutil.which(tool) for tool in ("ffmpeg", "ffprobe"))


class VideoActions:
    """The Video tab's actions, bound to the folders the app may read and the scratch folder renders go to."""

    def __init__(self, roots: AllowedRoots, scratch: Path):
        self.roots = roots
        # Rendered MP4s land here (app.py removes the folder when the app exits); Gradio serves copies of them.
        self.scratch = Path(scratch)
        # The Video tab's DualParal ranks, kept warm while the model folder and the worker count stay the same.
        self.video_pool = None
        self.video_pool_lock = threading.Lock()

    def close(self) -> None:
        """Let the video ranks go (the app calls this as it exits)."""
        with self.video_pool_lock:
            if self.video_pool is not None:
                self.video_pool.close()
                self.video_pool = None

    def warm_pool(self, model_path: Path, workers: int):
        """The pool for this model and worker count: the warm one, or a new one (the old one closed)."""
        from parallel_infer.pool import RenderPool, model_key

        pool = self.video_pool
        if pool is not None and pool.alive and pool.key == model_key(model_path, workers, None):
            return pool
        if pool is not None:
            pool.close()
        self.video_pool = RenderPool(model_path, ranks=workers)
        return self.video_pool

    def video_model_settings(self, model_dir: str):
        """The settings a video model carries (to fill the Video tab's fields) and a note on its prompts; a folder
        that is not a video model leaves the fields as they are and says why."""
        from parallel_infer.loader import inspect_model
        from parallel_infer.model_settings import describe_sources, prompt_hints, resolve_settings
        from parallel_infer.render import VideoSettings

        keep = [gr.update()] * 7
        try:
            info = inspect_model(self.roots.dir(model_dir, "Video model directory"))
            settings, sources = resolve_settings(info, VideoSettings(seconds=1))
        except (gr.Error, UsageError) as e:
            return *keep, f"*{getattr(e, 'message', None) or e}*"
        root = str(APP_DIR)
        note = describe_sources(settings, sources).replace(root + os.sep, "")
        values = (settings.fps, settings.height, settings.width, settings.steps, settings.block, settings.cat, settings.cfg)
        return *values, f"**Prompts**: {prompt_hints(info)}.  \n**Settings** below: " + note.replace("\n", "; ")

    def video_request(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers,
    ) -> tuple[Path, int, dict]:
        """The Video tab's fields, checked: (model folder, worker count, `RenderPool.render`'s keyword arguments)."""
        model_path = self.roots.dir(model_dir, "Video model directory")
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("Prompt: please enter a prompt.")
        seconds = float_in_range(seconds, "Length (seconds)", 0.05, MAX_SECONDS)
        fps = int_in_range(fps, "fps", 1, 60)
        # 0 = the model's own size
        height = int_in_range(height, "Height (pixels, 0 = the model's)", 0, MAX_PIXELS) or None
        width = int_in_range(width, "Width (pixels, 0 = the model's)", 0, MAX_PIXELS) or None
        steps = int_in_range(steps, "Steps", 1, MAX_STEPS)
        block = int_in_range(block, "Block size", 1, 64)
        cat = int_in_range(cat, "Context size", 1, 63)
        if cat >= block:
            raise UserError(f"Context size ({cat}) must be smaller than the block size ({block}).")
        cfg = float_in_range(cfg, "CFG scale", 1.0, 20.0)
        seed = int_in_range(seed, "Seed", 0, 2**31 - 1)
        workers = int_in_range(workers, "Worker processes", 1, MAX_WORKERS)
        settings = dict(prompt=prompt, seconds=seconds, fps=fps, height=height, width=width, steps=steps, block=block,
                        cat=cat, cfg=cfg, seed=seed, negative_prompt=(negative_prompt or "").strip())
        return model_path, workers, settings

    @friendly
    def render_video(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers, progress=gr.Progress(),
    ):
        """One MP4 from `prompt` through DualParal on `workers` local processes kept warm between renders
        (parallel_infer/pool.py); progress = blocks done / total. Returns (MP4 path, record) once complete."""
        fields = (model_dir, prompt, negative_prompt, seconds, fps, height, width, steps, block, cat, cfg, seed, workers)
        *_, (_, video, record) = self.render_steps(fields, progress, live=False)  # its only item: the result
        return video, record

    @friendly
    def render_video_live(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers, progress=gr.Progress(),
    ):
        """As `render_video`, showing the video as it grows: yields (segment, skip, skip) as each block's segment
        is written, for the streaming player, then (skip, MP4 path, record); only the latter without STREAMING."""
        fields = (model_dir, prompt, negative_prompt, seconds, fps, height, width, steps, block, cat, cfg, seed, workers)
        yield from self.render_steps(fields, progress, live=STREAMING)

    def render_steps(self, fields: tuple, progress, live: bool):
        """Check the fields, render on the warm pool, yield each segment (`live` only) and then the result.

        The pool renders on a thread of its own, so that this generator can hand each segment to Gradio while later
        blocks render; progress is reported from here, the thread Gradio runs the event on. Gradio has read a
        segment once the generator resumes, so the segments are removed when the render is over (one whose client
        went away leaves them to the run folder's removal at exit)."""
        model_path, workers, settings = self.video_request(*fields)
        self.scratch.mkdir(parents=True, exist_ok=True)
        out = self.scratch / f"video-{uuid.uuid4().hex[:12]}.mp4"
        segments = out.with_name(f"{out.stem}-live") if live else None
        events: queue.Queue = queue.Queue()

        def render() -> None:
            try:
                with self.video_pool_lock:
                    pool = self.warm_pool(model_path, workers)
                    events.put(("start", "rendering" if pool.ready else "loading the model"))
                    record = pool.render(
                        out_path=out, segments=segments, segment_callback=lambda path, _: events.put(("segment", path)),
                        progress_callback=lambda done, total: events.put(("block", (done, total))), **settings,
                    )
                events.put(("done", record))
            except BaseException as e:  # noqa: BLE001 - raised again below, in Gradio's thread
                events.put(("error", e))

        threading.Thread(target=render, name="video-render", daemon=True).start()
        while (event := events.get())[0] not in ("done", "error"):
            kind, payload = event
            if kind == "start":
                progress(0, desc=payload)
            elif kind == "block":
                progress(payload, desc="blocks", unit="blocks")
            else:
                yield str(payload), gr.skip(), gr.skip()
        if segments is not None:
            shutil.rmtree(segments, ignore_errors=True)  # the render is over: no segment comes any more
        kind, payload = event
        if kind == "error":
            raise payload
        yield gr.skip(), str(out), payload
