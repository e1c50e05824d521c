"""DualParal in one process: settings checks, the schedule, coordinated noise, the feature cache, and the
adapter against diffusers' own WanTransformer3DModel forward."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ddm import UsageError
from parallel_infer.config import DualParalConfig
from parallel_infer.layer_split import balanced_split, split_layers
from parallel_infer.layer_pipeline import guide, run_reference
from parallel_infer.noise import NoiseSource
from parallel_infer.queue import work_items
from parallel_infer.tiny import tiny_transformer
from parallel_infer.wan_adapter import WanAdapter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_transformer(layers=3)


def denoise(model, config, text, size=8):
    finals = {}
    adapter = WanAdapter(model, config.block + config.cat, config.cat, size, size)
    run_reference(adapter, config, text, lambda b, x: finals.__setitem__(b, x.clone()))
    return torch.cat([finals[b] for b in sorted(finals)], dim=2)


TEXT = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(frames=27, block=4, cat=2), "do not fit the block layout.*nearest valid: 26, 30"),
        (dict(frames=5, block=4, cat=2), "nearest valid: 6"),
        (dict(frames=26, block=4, cat=4), "cat=4 must be smaller than the block size"),
        (dict(frames=26, block=4, cat=0), "cat must be a positive integer, got 0"),
        (dict(frames=26, block=-4, cat=2), "block must be a positive integer, got -4"),
        (dict(frames=26, block=4, cat=2, steps=0), "steps must be a positive integer, got 0"),
        (dict(frames=26, block=4, cat=2, guidance_scale=0.0), "cfg 0.0 is out of range: must be a finite number > 0"),
        (dict(frames=26, block=4, cat=2, flow_shift=-1.0), "flow_shift -1.0 is out of range"),
        (dict(frames=26, block=4, cat=2, sampler="ddim"), "sampler 'ddim' is not one of euler, unipc"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        DualParalConfig(**kwargs)


def test_layer_split_is_contiguous_with_the_remainder_on_the_lowest_ranks():
    assert [len(r) for r in split_layers(30, 4)] == [8, 8, 7, 7]
    assert [list(r) for r in split_layers(5, 3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(UsageError, match="4 ranks but the model has only 3 layers"):
        split_layers(3, 4)


def test_balanced_split_minimises_the_slowest_stage():
    import itertools

    assert balanced_split(8, 1.0, [0.5, 0.0]) == (4, 4)  # half a layer of extra work: not worth a layer
    assert balanced_split(8, 1.0, [2.5, 0.0]) == (3, 5)
    for layers, extras in [(30, [3.2, 0.0, 0.0, 1.1]), (9, [0.4, 2.0, 0.7]), (12, [5.0, 0.1])]:
        best = min(max(n + e for n, e in zip(sizes, extras))
                   for sizes in itertools.product(range(1, layers + 1), repeat=len(extras)) if sum(sizes) == layers)
        sizes = balanced_split(layers, 1.0, extras)
        assert sum(sizes) == layers and min(sizes) >= 1
        assert max(n + e for n, e in zip(sizes, extras)) == pytest.approx(best), (layers, extras, sizes)


def test_topology_roles_with_cfg_parallel_groups():
    from parallel_infer.topology import Topology

    t = Topology((3, 2), groups=2, decode_on="last")
    assert t.world == 4 and [t.group(r) for r in range(4)] == [0, 0, 1, 1]
    assert [list(t.layers(r)) for r in range(4)] == [[0, 1, 2], [3, 4], [0, 1, 2], [3, 4]]
    assert (t.entry(1), t.head(0), t.head(1), t.decode_rank) == (2, 1, 3, 3)
    assert Topology.even(5, 3).sizes == (2, 2, 1) and Topology.even(5, 2, decode_on="first").decode_rank == 0


def test_feature_cache_is_not_shared_across_an_expert_switch():
    """Wan2.2 A14B: block b reads block b+1's keys only when both steps ran on the same transformer."""
    from parallel_infer.feature_cache import FeatureCache
    from parallel_infer.queue import WorkItem

    cache, experts = FeatureCache(slice(0, 1), (None, None)), [0, 0, 1, 1]
    middle = dict(iteration=5, block=3, first_in_iteration=False, last_in_iteration=False)
    for step, use, store in [(1, True, False), (2, False, True), (3, True, True)]:
        cache.prepare(WorkItem(step=step, **middle), True, experts)
        assert (cache.use, cache.store) == (use, store), step


def test_schedule_one_step_per_queued_block_newest_first():
    config = DualParalConfig(frames=6 + 4 * 6, steps=3, block=4, cat=2)  # 7 blocks, 3 steps
    items = list(work_items(config))
    assert config.num_iterations == 3 + 7 - 1 and items[-1].iteration == config.num_iterations - 1
    for it in range(config.num_iterations):
        blocks = [i.block for i in items if i.iteration == it]
        assert blocks == sorted(blocks, reverse=True) and len(blocks) <= min(7, 3)
        assert blocks == list(range(blocks[0], blocks[0] - len(blocks), -1))  # neighbours, one step apart
    for b in range(7):
        assert [i.step for i in items if i.block == b] == [0, 1, 2]


@pytest.mark.parametrize("coordinated", [True, False])
def test_coordinated_noise_permutes_one_pool(coordinated):
    config = DualParalConfig(frames=6 + 4 * 5, steps=2, block=4, cat=2, coordinated_noise=coordinated)
    source = NoiseSource(config, (3, 4, 4))
    blocks = [source.next_block() for _ in range(config.num_blocks)]
    assert blocks[0].shape[2] == 6 and all(b.shape[2] == 4 for b in blocks[1:])
    pool = sorted(blocks[0][0].transpose(0, 1).flatten(1).tolist())
    windows = [torch.cat([blocks[b - 1][:, :, -2:], blocks[b]], dim=2) for b in range(1, config.num_blocks)]
    same = [sorted(w[0].transpose(0, 1).flatten(1).tolist()) == pool for w in windows]
    assert all(same) if coordinated else not any(same)


DIFFUSERS_SCHEDULERS = {  # the sampler as diffusers' own loop would run it
    "euler": lambda shift: FlowMatchEulerDiscreteScheduler(shift=shift),
    "unipc": lambda shift: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift),
}


@pytest.mark.parametrize("sampler", DIFFUSERS_SCHEDULERS)
def test_one_block_equals_the_diffusers_model_loop_bit_for_bit(model, sampler):
    config = DualParalConfig(frames=6, steps=5, block=4, cat=2, guidance_scale=3.0, seed=1, sampler=sampler)
    ours = denoise(model, config, TEXT)
    scheduler = DIFFUSERS_SCHEDULERS[sampler](config.flow_shift)
    scheduler.set_timesteps(config.steps)
    x = torch.randn(1, 3, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for t in scheduler.timesteps:
            v = model(x.expand(2, -1, -1, -1, -1), t.expand(2), TEXT, return_dict=False)[0]
            x = scheduler.step(guide(v, config.guidance_scale), t, x, return_dict=False)[0]
    assert torch.equal(ours, x)


def test_the_samplers_give_different_videos(model):
    config = DualParalConfig(frames=6, steps=5, block=4, cat=2, guidance_scale=3.0, seed=1)
    assert not torch.equal(denoise(model, config, TEXT), denoise(model, replace(config, sampler="unipc"), TEXT))


def test_feature_cache_links_each_block_to_the_next(model):
    base = dict(frames=6 + 4 * 3, steps=3, block=4, cat=2, guidance_scale=3.0, seed=2)
    cached = denoise(model, DualParalConfig(**base), TEXT)
    plain = denoise(model, DualParalConfig(**base, feature_cache=False), TEXT)
    assert cached.shape == plain.shape == (1, 3, 18, 8, 8)
    assert not torch.equal(cached[:, :, :6], plain[:, :, :6])  # block 0 attended to block 1's first frames
    # With the cache off, block 0 cannot see later blocks: the same as a one-block video with the same seed.
    alone = denoise(model, DualParalConfig(**{**base, "frames": 6}, feature_cache=False), TEXT)
    assert torch.equal(plain[:, :, :6], alone)


def test_rotary_table_continues_after_the_window(model):
    adapter = WanAdapter(model, window=6, cat=2, height=8, width=8)
    longer = adapter.rotary_table(8, offset=0)
    start = 6 * adapter.tokens_per_frame
    for table, ctx, own in zip(longer, adapter.cache.context_rotary, adapter.rotary):
        assert torch.equal(table[:, start:], ctx) and torch.equal(table[:, :start], own)
    with torch.inference_mode():
        assert torch.equal(model.rope(torch.zeros(1, 3, 6, 8, 8))[0], adapter.rotary[0])


def test_adapter_rejects_models_it_cannot_split(model):
    with pytest.raises(UsageError, match="not divisible by the patch size"):
        WanAdapter(model, window=6, cat=2, height=7, width=8)

