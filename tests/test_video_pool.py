"""The warm render pool the app keeps: the model loads once, later renders only render, and the pool ends cleanly."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np
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
        blocks = []
        first = pool.render("a cat runs", tmp_path / "a.mp4", seed=1, progress_callback=lambda d, t: blocks.append((d, t)),
                            **SMALL)
        second = pool.render("a dog jumps", tmp_path / "b.mp4", seed=2, **SMALL)
        assert blocks == [(1, 3), (2, 3), (3, 3)] and first["ranks"] == 2
        assert np.array_equal(iio.imread(tmp_path / "a.mp4"), iio.imread(tmp_path / "ref.mp4"))
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
