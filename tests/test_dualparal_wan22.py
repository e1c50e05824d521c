"""Wan2.2 folders through the one loader: A14B's two transformers switched at the boundary (one process here;
two ranks, each holding its slice of both, in test_dualparal_dist.py), TI2V-5B's VAE (patch size 2, 48
channels, spatial factor 16)."""
from __future__ import annotations

import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddm import UsageError
from parallel_infer.api import render_video
from parallel_infer.config import DualParalConfig
from parallel_infer.layer_pipeline import Conditioning, guide, run_reference
from parallel_infer.loader import inspect_model, load_model
from parallel_infer.stream import FrameDecoder
from parallel_infer.tiny import write_tiny_model
from parallel_infer.wan_adapter import WanAdapter

torch.set_num_threads(1)
SMALL = dict(steps=4, block=4, cat=2, height=16, width=16, threads=1)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("a14b"), layers=3, layout="a14b", boundary_ratio=0.8)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("ti2v"), layers=2, layout="ti2v")


def test_a14b_switches_transformers_at_the_boundary_as_wan_pipeline(a14b):
    """A one-block video equals diffusers' own loop that runs `transformer` while t >= boundary_ratio * 1000 and
    `transformer_2` below, bit for bit; and both transformers take part."""
    info = inspect_model(a14b)
    model = load_model(info)
    assert info.boundary_ratio == 0.8 and model.transformer_2 is not None and model.boundary_timestep == 800.0
    config = DualParalConfig(frames=6, steps=SMALL["steps"], block=4, cat=2, guidance_scale=3.0, seed=1)
    adapter = WanAdapter(model.transformer, 6, 2, 8, 8, model.transformer_2, model.boundary_timestep)
    text = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    assert set(Conditioning(adapter, config, text).experts) == {0, 1}
    finals = []
    run_reference(adapter, config, text, lambda b, x: finals.append(x))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.flow_shift)
    scheduler.set_timesteps(config.steps)
    x = torch.randn(1, 3, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for t in scheduler.timesteps:
            current = model.transformer if t >= model.boundary_timestep else model.transformer_2
            v = current(x.expand(2, -1, -1, -1, -1), t.expand(2), text, return_dict=False)[0]
            x = scheduler.step(guide(v, config.guidance_scale), t, x, return_dict=False)[0]
    assert torch.equal(finals[0], x)


def test_a14b_rank_loads_only_its_layers(a14b):
    model = load_model(inspect_model(a14b), layers=range(2, 3))
    for transformer in (model.transformer, model.transformer_2):
        kept = [type(block).__name__ for block in transformer.blocks]
        assert kept == ["DroppedBlock", "DroppedBlock", "WanTransformerBlock"]


def test_a_folder_naming_a_missing_transformer_2_is_a_usage_error(a14b, tmp_path):
    broken = shutil.copytree(a14b, tmp_path / "broken")
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(UsageError, match="model_index.json names transformer_2 but there is no transformer_2/config.json"):
        render_video(broken, "a cat runs", tmp_path / "x.mp4", frames=14, **SMALL)
    assert not (tmp_path / "x.mp4").exists()


def test_ti2v_folder_has_its_resolution_and_vae(ti2v, tmp_path):
    info = inspect_model(ti2v)
    assert (info.size, info.spatial_scale, info.temporal_scale, info.channels) == ((704, 1280), 16, 4, 48)
    with pytest.raises(UsageError, match="divisible by 32x32"):
        render_video(ti2v, "a cat runs", tmp_path / "x.mp4", frames=21, **{**SMALL, "height": 48})
    record = render_video(ti2v, "a cat runs", tmp_path / "v.mp4", frames=21, **{**SMALL, "height": 32, "width": 64})
    assert record["frames_written"] == 21 and iio.imread(tmp_path / "v.mp4").shape == (21, 32, 64, 3)


def test_ti2v_streaming_decode_equals_one_whole_decode(ti2v):
    """(At a 2x2 latent frame the one op vae.decode applies to the whole video at once, the 1x1 post_quant_conv,
    rounds differently with the video's length; from 2x4 up, and at real sizes, it does not.)"""
    vae = load_model(inspect_model(ti2v)).vae
    latents = torch.randn(1, 48, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    decoder = FrameDecoder(vae)
    streamed = np.concatenate([decoder.decode(latents[:, :, a:b]) for a, b in [(0, 2), (2, 4), (4, 6)]])
    with torch.inference_mode():
        whole = vae.decode(latents * decoder.std + decoder.mean).sample
    whole = ((whole.clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert streamed.shape == (21, 64, 64, 3) and np.array_equal(streamed, whole)
