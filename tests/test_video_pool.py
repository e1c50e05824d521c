"""The warm render pool the app keeps: the model loads once, later renders only render, and the pool ends cleanly."""
from __future__ import annotations

import json

import imageio_ffmpeg
import pytest
import torch

from ddm import UsageError
from parallel_infer.api import render_video
from parallel_infer.pool import RenderPool, model_key
from parallel_infer.tiny import write_tiny_model

torch.set_num_threads(1)
SMALL = dict(frames=14, steps=2, block=4, cat=2, height=16, width=16, cfg=3.0)


def test_a_warm_pool_renders_as_one_process_does_and_shuts_down(tmp_path):
    model = write_tiny_model(tmp_path / "m", layers=3, prompts=("a cat runs", "a dog jumps", ""))
    render_video(model, "a cat runs", tmp_path / "ref.mp4", seed=1, threads=1, **SMALL)
    pool = RenderPool(model, ranks=2, threads=1, timeout=30)
    try:
        events = []
        first = pool.render("a cat runs", tmp_path / "a.mp4", seed=1, progress_callback=lambda d, t: events.append((d, t)),
                            segments=tmp_path / "live", segment_callback=lambda p, n: events.append((p, n)), **SMALL)
        second = pool.render("a dog jumps", tmp_path / "b.mp4", seed=2, **SMALL)
        # 14 latent frames = block + cat, then two blocks (pixel space: one frame each): each block's segment is
        # reported, complete, before its progress
        segments = [tmp_path / "live" / f"block-{i:04d}.ts" for i in range(3)]
        assert events == [(segments[0], 6), (1, 3), (segments[1], 4), (2, 3), (segments[2], 4), (3, 3)]
        assert [imageio_ffmpeg.count_frames_and_secs(p)[0] for p in segments] == [6, 4, 4]
        assert sorted(p.name for p in (tmp_path / "live").iterdir()) == [p.name for p in segments]  # no partial left
        meta, *frames = imageio_ffmpeg.read_frames(segments[0])
        assert meta["size"] == (16, 16) and len(frames) == 6
        # segments cost the MP4 nothing: byte for byte the one-process render's (which wrote none)
        assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "ref.mp4").read_bytes() and first["ranks"] == 2
        assert first["sha256"] == json.loads((tmp_path / "ref.json").read_text())["sha256"]
        assert pool.load_seconds > 0 and second["timings_s"]["load"] < 0.05  # loaded once, by the first render
        assert second["settings"]["prompt"] == "a dog jumps" and pool.alive
        with pytest.raises(UsageError, match="'a cow' has no precomputed embedding"):  # checked here, pool untouched
            pool.render("a cow", tmp_path / "c.mp4", **SMALL)
        assert pool.alive and pool.key == model_key(model, 2, 1) != model_key(model, 1, 1)
        processes = list(pool.processes)
    finally:
        pool.close()
    assert all(p.exitcode == 0 for p in processes) and not pool.alive


def test_a_dead_rank_fails_the_render_and_closes_the_pool(tmp_path):
    model = write_tiny_model(tmp_path / "m", layers=2, prompts=("a cat runs", ""))
    pool = RenderPool(model, ranks=2, threads=1, timeout=5)
    try:
        pool.wait_ready()
        pool.processes[1].kill()
        with pytest.raises(RuntimeError, match="rank"):
            pool.render("a cat runs", tmp_path / "b.mp4", **SMALL)
        assert not pool.alive and not (tmp_path / "b.mp4").exists()
    finally:
        pool.close()
