"""From user settings to an MP4 + JSON sidecar: planning (checks only, no weights), and rendering on each rank.

`plan_video` turns what a user asks for (frames or seconds, fps, size, steps, block, cat, ...) into the
DualParal latent layout and raises UsageError for anything that cannot work, before any process starts.
`Renderer` runs on every rank; the decode rank (topology.py) decodes blocks as they leave the queue and streams
them to disk (block_writer.py), rank 0 returns the sidecar.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from ddm import UsageError
from ddm.checks import check_range
from ddm.io import sha256_file
from parallel_infer.block_writer import BlockWriter
from parallel_infer.config import DualParalConfig, latent_frames_covering
from parallel_infer.layer_pipeline import run_layer_pipeline
from parallel_infer.loader import ModelInfo, VideoModel
from parallel_infer.stream import FrameDecoder, Mp4Stream, SegmentWriter
from parallel_infer.topology import Topology
from parallel_infer.wan_adapter import WanAdapter

Progress = Callable[[int, int], None]  # (blocks done, blocks in the video)


@dataclass(frozen=True)
class VideoSettings:
    """What a user asks for. Exactly one of `frames` (video frames) or `seconds`. A None setting is filled in
    from the model (its video_settings.json, else Wan's defaults) by parallel_infer.model_settings."""

    frames: int | None = None
    seconds: float | None = None
    fps: int | None = None
    height: int | None = None  # pixels
    width: int | None = None
    steps: int | None = None
    block: int | None = None  # latent frames
    cat: int | None = None
    cfg: float | None = None  # classifier-free guidance scale (--cfg), DualParalConfig.guidance_scale
    flow_shift: float | None = None
    sampler: str | None = None  # "euler" or "unipc"
    seed: int = 0
    negative_prompt: str = ""
    feature_cache: bool = True
    coordinated_noise: bool = True


@dataclass(frozen=True)
class Plan:
    config: DualParalConfig
    frames: int  # video frames written
    height: int
    width: int
    latent_size: tuple[int, int]

    def describe(self) -> dict:
        return {**self.config.to_dict(), "video_frames": self.frames, "height": self.height, "width": self.width}


def plan_video(info: ModelInfo, settings: VideoSettings) -> Plan:
    """Check every setting against the model (JSON only) and fix the latent layout."""
    if (settings.frames is None) == (settings.seconds is None):
        raise UsageError("give exactly one of --frames or --seconds")
    if not isinstance(settings.fps, int) or settings.fps <= 0:
        raise UsageError(f"fps must be a positive integer, got {settings.fps!r}")
    height, width = settings.height or info.size[0], settings.width or info.size[1]
    latent_size = info.latent_size(height, width)
    if settings.seconds is not None:
        check_range("seconds", settings.seconds, above=0)
        frames = max(1, round(settings.seconds * settings.fps))
        scale = info.temporal_scale
        wanted_latent = frames if scale == 1 else math.ceil((frames - 1) / scale) + 1
        latent = latent_frames_covering(wanted_latent, settings.block, settings.cat) if settings.block > 0 else wanted_latent
    else:
        if not isinstance(settings.frames, int) or settings.frames <= 0:
            raise UsageError(f"frames must be a positive integer, got {settings.frames!r}")
        frames, latent = settings.frames, info.latent_frames(settings.frames)
    config = DualParalConfig(
        frames=latent, steps=settings.steps, block=settings.block, cat=settings.cat, guidance_scale=settings.cfg,
        flow_shift=info.flow_shift if settings.flow_shift is None else settings.flow_shift, seed=settings.seed,
        sampler=settings.sampler,
        feature_cache=settings.feature_cache, coordinated_noise=settings.coordinated_noise,
    )
    return Plan(config, frames, height, width, latent_size)


def check_prompts(info: ModelInfo, plan: Plan, settings: VideoSettings, prompts: list[str]) -> None:
    """Every prompt (and the negative one, with guidance) must be one the model can encode."""
    info.check_prompts(prompts + ([settings.negative_prompt] if plan.config.guided else []))


# Settings that records gained after sidecars were first written, with the value a record without them was rendered
# at, so that a re-run still finds those videos complete.
SETTINGS_ADDED_LATER = {"sampler": "euler"}


def settings_record(info: ModelInfo, plan: Plan, settings: VideoSettings, prompt: str, seed: int) -> dict:
    """What makes a video what it is: compared when a batch is re-run."""
    return {"prompt": prompt, "model": str(info.path), **plan.describe(), "seed": seed, "fps": settings.fps,
            "negative_prompt": settings.negative_prompt}


def owned_sidecar(video: Path) -> dict | None:
    """The sidecar record of `video` when ddm rendered it, None when neither file exists. UsageError when either
    exists but is not ours (an MP4 without a sidecar, a JSON ddm did not write), or cannot be written."""
    from ddm.io import check_writable

    sidecar = video.with_suffix(".json")
    check_writable(video, "video")
    check_writable(sidecar, "video sidecar")
    if not video.exists() and not sidecar.exists():
        return None
    try:
        done = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        done = None
    if not isinstance(done, dict) or not isinstance(done.get("settings"), dict):
        raise UsageError(f"{video if video.exists() else sidecar} exists and was not rendered by ddm; refusing to overwrite it")
    return done


def complete_sidecar(video: Path, settings: dict) -> bool:
    """True when `video` was already rendered with these settings; UsageError if with others, if it was changed
    since, or if it is not ours (`owned_sidecar`): a video is never overwritten."""
    done = owned_sidecar(video)
    if done is None or not video.exists():
        return False  # nothing there, or a sidecar whose video was removed: render it
    if {**SETTINGS_ADDED_LATER, **done["settings"]} != settings:
        raise UsageError(f"{video} exists with other settings; choose another --out or delete it")
    if "sha256" in done and sha256_file(video) != done["sha256"]:
        raise UsageError(f"{video} differs from what its sidecar recorded (edited or damaged); delete it to render it again")
    return True


class Renderer:
    """One rank's renderer for a batch of videos sharing one plan (the model loads once)."""

    def __init__(self, model: VideoModel, plan: Plan, settings: VideoSettings, timeout: float = 60.0,
                 topology: Topology | None = None, decode: str = "auto"):
        self.model, self.plan, self.settings, self.timeout = model, plan, settings, timeout
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.topology = topology or Topology.even(model.info.num_layers, world)
        config = plan.config
        self.adapter = WanAdapter(model.transformer, config.block + config.cat, config.cat, *plan.latent_size,
                                  model_2=model.transformer_2, boundary_timestep=model.boundary_timestep)
        # auto: a thread on a GPU (its work goes to its own stream); inline on a CPU, where a thread would take
        # cores from the ranks (docs/BENCHMARKS.md, decode placement)
        self.decode_thread = decode == "thread" or (decode == "auto" and self.adapter.device.type == "cuda")

    def render(self, prompt: str, seed: int, out: Path | None, progress: Progress | None = None,
               segments: Path | None = None, on_segment: Callable[[Path, int], None] | None = None) -> dict | None:
        """Render on every rank; the decode rank writes the MP4 `out`, rank 0 returns the sidecar dict.
        `progress(blocks written, blocks)` is called on the decode rank. With a `segments` folder the decode rank
        also writes each block as a video segment there (stream.SegmentWriter), calling `on_segment(path,
        frames)`; the MP4 is the same either way (the record's decode_write counts the segments' encoding too)."""
        config = replace(self.plan.config, seed=seed)
        start = time.perf_counter()
        prompts = [prompt, self.settings.negative_prompt] if config.guided else [prompt]
        embeds = self.model.encode_prompts(prompts)
        encoded = time.perf_counter()
        writer = None
        if out is not None and self.rank == self.topology.decode_rank:
            stream = Mp4Stream(out, self.settings.fps, self.plan.height, self.plan.width, limit=self.plan.frames)
            on_written = (lambda block: progress(block + 1, config.num_blocks)) if progress else None
            segment_writer = None if segments is None else SegmentWriter(
                segments, self.settings.fps, self.plan.height, self.plan.width, on_segment)
            writer = BlockWriter(FrameDecoder(self.model.vae), stream, self.decode_thread, on_written, segment_writer)
        try:
            total_bytes = run_layer_pipeline(self.adapter, config, embeds, writer.put if writer else None,
                                             self.model.scheduler_config, self.timeout, self.topology)
            denoised = time.perf_counter()
            decode = writer.close() if writer else {"decode_write": 0.0, "decode_tail": 0.0}
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        done = time.perf_counter()
        report = [writer.stream.written if writer else 0, decode["decode_write"], decode["decode_tail"]]
        if self.topology.decode_rank != 0:  # rank 0 writes the sidecar: the decode rank's figures come to it
            shared = torch.tensor(report, dtype=torch.float64, device=self.adapter.device)
            torch.distributed.all_reduce(shared, async_op=True).wait(timedelta(seconds=self.timeout))
            report = shared.tolist()
        if out is None or self.rank != 0:
            return None
        written, decode_write, decode_tail = report
        inline = decode_write if self.topology.decode_rank == 0 and not self.decode_thread else 0.0
        block_steps = config.num_blocks * config.steps
        return {
            "settings": settings_record(self.model.info, self.plan, self.settings, prompt, seed),
            "sha256": sha256_file(out),  # eval-video and a re-run check the MP4 against it
            "ranks": self.topology.world,
            "parallel": {**self.topology.describe(), "decode": "thread" if self.decode_thread else "inline"},
            "device": str(self.adapter.device),
            "dtype": str(self.adapter.dtype).removeprefix("torch."),
            "frames_written": int(written),
            # denoise: rank 0 in the layer pipeline, less its own inline decoding; decode_tail: after the
            # pipeline, waiting for the decoder's last block (0 when decoding kept up)
            "timings_s": {"encode_prompt": encoded - start, "denoise": denoised - encoded - inline,
                          "decode_write": decode_write, "decode_tail": decode_tail, "total": done - start},
            "bytes_sent": total_bytes,
            "block_steps": block_steps,
            "bytes_sent_per_block_step": total_bytes / block_steps,
        }
