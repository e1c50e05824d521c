"""From user settings to an MP4 + JSON sidecar: planning (checks only, no weights), and rendering on each rank.

`plan_video` turns what a user asks for (frames or seconds, fps, size, steps, block, cat, ...) into the
DualParal latent layout and raises UsageError for anything that cannot work, before any process starts.
`Renderer` runs on every rank; rank 0 decodes blocks as they leave the queue and streams them to disk.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ddm import UsageError
from parallel_infer.config import DualParalConfig, latent_frames_covering
from parallel_infer.layer_split import split_layers
from parallel_infer.loader import ModelInfo, VideoModel
from parallel_infer.layer_pipeline import run_layer_pipeline
from parallel_infer.stream import FrameDecoder, Mp4Stream
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


def plan_video(info: ModelInfo, settings: VideoSettings, ranks: int = 1) -> Plan:
    """Check every setting against the model (JSON only) and fix the latent layout."""
    if (settings.frames is None) == (settings.seconds is None):
        raise UsageError("give exactly one of --frames or --seconds")
    if not isinstance(settings.fps, int) or settings.fps <= 0:
        raise UsageError(f"fps must be a positive integer, got {settings.fps!r}")
    split_layers(info.num_layers, ranks)
    height, width = settings.height or info.size[0], settings.width or info.size[1]
    latent_size = info.latent_size(height, width)
    if settings.seconds is not None:
        if not settings.seconds > 0:
            raise UsageError(f"seconds must be > 0, got {settings.seconds}")
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
        feature_cache=settings.feature_cache, coordinated_noise=settings.coordinated_noise,
    )
    return Plan(config, frames, height, width, latent_size)


def check_prompts(info: ModelInfo, plan: Plan, settings: VideoSettings, prompts: list[str]) -> None:
    """Every prompt (and the negative one, with guidance) must be one the model can encode."""
    info.check_prompts(prompts + ([settings.negative_prompt] if plan.config.guided else []))


def settings_record(info: ModelInfo, plan: Plan, settings: VideoSettings, prompt: str, seed: int) -> dict:
    """What makes a video what it is: compared when a batch is re-run."""
    return {"prompt": prompt, "model": str(info.path), **plan.describe(), "seed": seed, "fps": settings.fps,
            "negative_prompt": settings.negative_prompt}


def complete_sidecar(video: Path, settings: dict) -> bool:
    """True when `video` was already rendered with these settings; UsageError if with others."""
    sidecar = video.with_suffix(".json")
    if not (video.is_file() and sidecar.is_file()):
        return False
    try:
        done = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return False
    if done.get("settings") != settings:
        raise UsageError(f"{video} exists with other settings; choose another --out or delete it")
    return True


class Renderer:
    """One rank's renderer for a batch of videos sharing one plan (the model loads once)."""

    def __init__(self, model: VideoModel, plan: Plan, settings: VideoSettings, timeout: float = 60.0):
        self.model, self.plan, self.settings, self.timeout = model, plan, settings, timeout
        config = plan.config
        self.adapter = WanAdapter(model.transformer, config.block + config.cat, config.cat, *plan.latent_size)

    def render(self, prompt: str, seed: int, out: Path | None, progress: Progress | None = None) -> dict | None:
        """Render on every rank; rank 0 (the one given `out`) writes the MP4 and returns the sidecar dict."""
        config = replace(self.plan.config, seed=seed)
        start = time.perf_counter()
        prompts = [prompt, self.settings.negative_prompt] if config.guided else [prompt]
        embeds = self.model.encode_prompts(prompts)
        encoded = time.perf_counter()
        decode_seconds = 0.0
        stream = decoder = None
        if out is not None:
            decoder = FrameDecoder(self.model.vae)
            stream = Mp4Stream(out, self.settings.fps, self.plan.height, self.plan.width, limit=self.plan.frames)

        def on_block(block: int, latent: torch.Tensor) -> None:
            nonlocal decode_seconds
            t = time.perf_counter()
            stream.write(decoder.decode(latent))
            decode_seconds += time.perf_counter() - t
            if progress is not None:
                progress(block + 1, config.num_blocks)

        try:
            total_bytes = run_layer_pipeline(self.adapter, config, embeds, on_block if out else None, self.model.scheduler_config, self.timeout)
            if stream is not None:
                stream.close()
        except BaseException:
            if stream is not None:
                stream.abort()
            raise
        done = time.perf_counter()
        if out is None:
            return None
        block_steps = config.num_blocks * config.steps
        return {
            "settings": settings_record(self.model.info, self.plan, self.settings, prompt, seed),
            "ranks": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "device": str(self.adapter.device),
            "dtype": str(self.adapter.dtype).removeprefix("torch."),
            "frames_written": stream.written,
            "timings_s": {"encode_prompt": encoded - start, "denoise": done - encoded - decode_seconds,
                          "decode_write": decode_seconds, "total": done - start},
            "bytes_sent": total_bytes,
            "block_steps": block_steps,
            "bytes_sent_per_block_step": total_bytes / block_steps,
        }

