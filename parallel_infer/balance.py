"""Balanced stages: measure what one work item (one block-step) costs on this device, and split the layers so
that no stage waits for another (docs/design.md §3, docs/dualparal.md "Balanced stages").

Besides its layers, stage 0 embeds and does the queue's work (model input, scheduler step), the last stage runs
the head and guidance, and the decode rank decodes: one block of `block` latent frames leaves the queue every
`steps` block-steps on average, so decoding costs decode(block) / steps per work item. Rank 0 measures these
with random weights of the model's shapes (the time does not depend on the weights' values) before any rank
loads its slice, so every rank then loads only its own layers.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from parallel_infer.layer_split import balanced_split
from parallel_infer.loader import ModelInfo
from parallel_infer.render import Plan
from parallel_infer.topology import ParallelOptions, Topology

TEXT_TOKENS = 512


@dataclass(frozen=True)
class StageCosts:
    """Seconds per work item."""

    layer: float  # one transformer layer
    entry: float  # embed + the queue's work (stage 0)
    head: float  # head + guidance (last stage)
    decode: float  # decode, amortised over the block's steps (the decode rank)

    def extras(self, stages: int, decode_stage: int) -> list[float]:
        """What each stage does besides its layers."""
        extra = [0.0] * stages
        extra[0] += self.entry
        extra[-1] += self.head
        extra[decode_stage] += self.decode
        return extra

    def split(self, num_layers: int, stages: int, decode_stage: int) -> tuple[int, ...]:
        return balanced_split(num_layers, self.layer, self.extras(stages, decode_stage))

    def as_ms(self) -> dict:
        return {k: 1000 * v for k, v in asdict(self).items()}


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def transformer_config(info: ModelInfo) -> dict:
    folder = info.path if info.kind == "expert" else info.path / "transformer"
    return json.loads((folder / "config.json").read_text())


@torch.inference_mode()
def measure_costs(info: ModelInfo, plan: Plan, device: torch.device, dtype: torch.dtype, batch: int,
                  repeats: int = 5) -> StageCosts:
    """Per-work-item costs on `device`, from one random layer of the model's shapes (and a random VAE)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from parallel_infer.layer_pipeline import Conditioning, guide
    from parallel_infer.queue import BlockQueue, WorkItem
    from parallel_infer.stream import FrameDecoder
    from parallel_infer.wan_adapter import WanAdapter

    config = plan.config
    model_config = {k: v for k, v in transformer_config(info).items() if not k.startswith("_")}
    with torch.device(device):
        model = WanTransformer3DModel.from_config({**model_config, "num_layers": 1}).eval()
    if dtype != torch.float32:  # cast as from_pretrained(torch_dtype=...) does: some modules stay float32
        model.to(dtype)
        for name, module in model.named_modules():
            if any(part in model._keep_in_fp32_modules for part in name.split(".")):
                module.float()
    adapter = WanAdapter(model, config.block + config.cat, config.cat, *plan.latent_size)
    adapter.install_feature_cache(range(1))
    text = torch.randn(batch, TEXT_TOKENS, model_config["text_dim"], device=device)
    cond = Conditioning(adapter, config, text, info.scheduler)
    step = cond.steps[0]
    queue = BlockQueue(config, (adapter.channels, *plan.latent_size), info.scheduler, device)
    queue.enter(0)
    queue.enter(1)
    newest = WorkItem(iteration=1, block=1, step=0, first_in_iteration=True, last_in_iteration=False)
    middle = WorkItem(iteration=1, block=1, step=0, first_in_iteration=False, last_in_iteration=False)
    frames = config.block
    hidden = adapter.embed(queue.model_input(1), batch)
    cond.prepare_cache(adapter.cache, newest, True)
    adapter.run_block(0, hidden, step)  # stores the keys the timed (middle) forwards read
    prediction = torch.randn(1, adapter.channels, frames, *plan.latent_size, device=device)

    def entry():
        adapter.embed(queue.model_input(1), batch)
        scheduler = queue.schedulers[1]
        scheduler._step_index = None  # one step from the start each time: the cost, not the trajectory
        scheduler.step(prediction, scheduler.timesteps[0], queue.latents[1], return_dict=False)

    def layer():
        cond.prepare_cache(adapter.cache, middle, True)  # read block b+1's keys and store for b-1: the usual case
        adapter.run_block(0, hidden, step)

    def head():
        guide(adapter.head(hidden, step, frames), config.guidance_scale)

    costs = {name: _timed(fn, device, repeats) for name, fn in (("entry", entry), ("layer", layer), ("head", head))}
    vae = None
    if info.vae is not None:
        vae_config = {k: v for k, v in info.vae.items() if not k.startswith("_")}
        with torch.device(device):
            vae = AutoencoderKLWan.from_config(vae_config).eval()
    decoder = FrameDecoder(vae)
    latent = torch.randn(1, adapter.channels, 1, *plan.latent_size, device=device)
    decoder.decode(latent)  # the first chunk differs; later frames each cost the same
    per_frame = _timed(lambda: decoder.decode(latent), device, max(1, repeats // 2))
    return StageCosts(layer=costs["layer"], entry=costs["entry"], head=costs["head"], decode=per_frame * frames / config.steps)


def choose_topology(info: ModelInfo, plan: Plan, options: ParallelOptions, rank: int, world: int,
                    device: torch.device, dtype: torch.dtype) -> tuple[Topology, StageCosts | None]:
    """Every rank's roles for this render. Without a user's --layer-split and with more than one stage, rank 0
    measures the costs and splits by them, and every rank receives the split (torch.distributed initialised)."""
    groups = options.groups()
    stages = world // groups
    sizes, costs = options.layer_split, None
    if sizes is None and stages == 1:
        sizes = (info.num_layers,)
    if sizes is None:
        roles = Topology((1,) * stages, groups, options.decode_on)
        shared = torch.zeros(stages, dtype=torch.int64, device=device)
        if rank == 0:
            batch = 1 if options.cfg_parallel or not plan.config.guided else 2
            costs = measure_costs(info, plan, device, dtype, batch)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the probe's memory goes back before the slices load
            shared[:] = torch.tensor(costs.split(info.num_layers, stages, roles.stage(roles.decode_rank)))
        if world > 1:
            dist.broadcast(shared, 0)
        sizes = tuple(shared.tolist())
    return Topology(tuple(sizes), groups, options.decode_on), costs
