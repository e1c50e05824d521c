"""The DualParal block queue (docs/design.md §3): the schedule every rank follows, and rank 0's state.

Blocks enter one per iteration as pure noise; every queued block takes ONE step per iteration, newest
(noisiest) first; a block leaves after its last step. Block 0 carries block + cat frames, so the model
input of every block has block + cat frames: [last cat frames of block b-1 | block b].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin, UniPCMultistepScheduler

from parallel_infer.config import DualParalConfig
from parallel_infer.noise import NoiseSource


@dataclass(frozen=True)
class WorkItem:
    """One forward of the model: block `block` at its step `step` (0-based) in iteration `iteration`."""

    iteration: int
    block: int
    step: int
    first_in_iteration: bool  # newest queued block: no block b+1 ran before it, nothing cached to attend to
    last_in_iteration: bool  # oldest queued block: nobody after it reads what it would cache


def work_items(config: DualParalConfig) -> Iterator[WorkItem]:
    """The order of forwards, the same on every rank."""
    for it in range(config.num_iterations):
        newest, oldest = min(it, config.num_blocks - 1), max(0, it - config.steps + 1)
        for b in range(newest, oldest - 1, -1):
            yield WorkItem(it, b, it - b, b == newest, b == oldest)


def own_frames(config: DualParalConfig, block: int) -> int:
    """Frames a block denoises (the model input also holds cat context frames, except for block 0)."""
    return config.block + config.cat if block == 0 else config.block


def make_scheduler(config: DualParalConfig, scheduler_config: dict | None = None) -> SchedulerMixin:
    """One block's sampler at `config.steps` steps. Euler takes the folder's scheduler config (its shift is replaced by
    ours); UniPC is set up as Wan's pipelines set it up for flow matching (second order, flow sigmas), from the
    folder's config where that names UniPC. Both keep their state in the object, so every block has its own."""
    scheduler_config = scheduler_config or {}
    if config.sampler == "unipc":
        own = scheduler_config if scheduler_config.get("_class_name") == "UniPCMultistepScheduler" else {}
        scheduler = UniPCMultistepScheduler.from_config(own, prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        flow_shift=config.flow_shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, shift=config.flow_shift)
    scheduler.set_timesteps(config.steps)
    return scheduler


class BlockQueue:
    """Rank 0's state: the latents and one scheduler per queued block.

    `model_input(b)` reads block b-1 as it stands after the previous iteration, which holds in the layer pipeline
    too because rank 0 applies every prediction before it embeds a block that depends on it.
    """

    def __init__(self, config: DualParalConfig, shape: tuple[int, int, int], scheduler_config: dict | None = None, device=None):
        self.config, self.device = config, device
        self.noise = NoiseSource(config, shape)
        self.scheduler_config = scheduler_config
        self.latents: dict[int, torch.Tensor] = {}
        self.schedulers: dict[int, SchedulerMixin] = {}
        self.finished_context: torch.Tensor | None = None  # last cat frames of a block that already left

    def enter(self, block: int) -> None:
        self.latents[block] = self.noise.next_block().to(self.device)
        self.schedulers[block] = make_scheduler(self.config, self.scheduler_config)

    def model_input(self, block: int) -> torch.Tensor:
        if block == 0:
            return self.latents[0]
        prev = self.latents.get(block - 1)
        context = prev[:, :, -self.config.cat :] if prev is not None else self.finished_context
        return torch.cat([context, self.latents[block]], dim=2)

    def apply(self, item: WorkItem, prediction: torch.Tensor) -> torch.Tensor | None:
        """One scheduler step of block `item.block`; returns its final latent when the block leaves."""
        b = item.block
        scheduler = self.schedulers[b]
        latent = scheduler.step(prediction, scheduler.timesteps[item.step], self.latents[b], return_dict=False)[0]
        if item.step < self.config.steps - 1:
            self.latents[b] = latent
            return None
        del self.latents[b], self.schedulers[b]
        self.finished_context = latent[:, :, -self.config.cat :]
        return latent
