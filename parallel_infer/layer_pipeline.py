"""The DualParal layer pipeline: block-wise denoising over a contiguous layer split across ranks.

"Layer pipeline" means the model's layers run as pipeline stages, one contiguous group per rank (not a
diffusers sampling pipeline such as router/pipeline.py). Rank 0 embeds and owns the queue; each rank runs
its own layers (with its own feature cache) and passes one block's hidden states to the next rank with
asynchronous point-to-point sends; the last rank runs the head, applies guidance and sends the block's
prediction back to rank 0. Conditioning is computed on every rank. `run_reference` computes the same
schedule in one process with no torch.distributed; on the same device and dtype, `run_layer_pipeline` with
any number of ranks gives the same latents bit for bit.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from parallel_infer.config import DualParalConfig
from parallel_infer.layer_split import split_layers
from parallel_infer.queue import BlockQueue, WorkItem, make_scheduler, own_frames, work_items
from parallel_infer.wan_adapter import WanAdapter

BlockCallback = Callable[[int, torch.Tensor], None]  # (block index, final latent [1, C, frames, H, W])
SEND_WINDOW = 2  # hidden states in flight per rank: enough to overlap, bounded memory


class PeerFailure(RuntimeError):
    """Another rank died or stopped answering within the timeout."""


class Conditioning:
    """Text and per-step timestep conditioning of one video, computed once on each rank."""

    def __init__(self, adapter: WanAdapter, config: DualParalConfig, prompt_embeds: torch.Tensor, scheduler_config=None):
        self.batch = prompt_embeds.shape[0]  # 2 with guidance: [cond, uncond]
        self.text = adapter.encode_text(prompt_embeds)
        timesteps = make_scheduler(config, scheduler_config).timesteps
        self.steps = [adapter.step_conditioning(t, self.batch) for t in timesteps]


def guide(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over the batched [cond, uncond] prediction, in float32."""
    prediction = prediction.float()
    if prediction.shape[0] == 1:
        return prediction
    cond, uncond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)


def forward_window(adapter: WanAdapter, config: DualParalConfig, cond: Conditioning, item: WorkItem, window: torch.Tensor) -> torch.Tensor:
    """One work item through every layer in this process: the model input [1, C, block + cat, H, W] of
    `item.block` -> its guided prediction for the block's own frames, float32 (the feature cache, installed
    on every layer, is read and filled as `item`'s place in the iteration says)."""
    adapter.cache.prepare(item, config.feature_cache)
    step = cond.steps[item.step]
    hidden = adapter.embed(window, cond.batch)
    for i in range(adapter.num_layers):
        hidden = adapter.run_block(i, hidden, cond.text, step)
    return guide(adapter.head(hidden, step, own_frames(config, item.block)), config.guidance_scale)


@torch.inference_mode()
def run_reference(adapter: WanAdapter, config: DualParalConfig, prompt_embeds: torch.Tensor, on_block: BlockCallback, scheduler_config=None) -> None:
    """The schedule of docs/design.md §3 as a plain loop in one process: what the layer pipeline must equal."""
    cond = Conditioning(adapter, config, prompt_embeds, scheduler_config)
    queue = BlockQueue(config, (adapter.channels, *adapter.latent_size), scheduler_config, adapter.device)
    adapter.install_feature_cache(range(adapter.num_layers))
    for item in work_items(config):
        if item.step == 0:
            queue.enter(item.block)
        final = queue.apply(item, forward_window(adapter, config, cond, item, queue.model_input(item.block)))
        if final is not None:
            on_block(item.block, final)


class _Links:
    """This rank's point-to-point traffic: async sends with a bounded window, waits with a timeout."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timedelta(seconds=timeout)
        self.sends: deque = deque()
        self.bytes_sent = 0

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.contiguous()
        with self.peer(peer):
            self.sends.append((dist.isend(tensor, peer), tensor, peer))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while len(self.sends) > SEND_WINDOW:
            work, _, peer = self.sends.popleft()
            self.wait(work, peer)

    def recv(self, buffer: torch.Tensor, peer: int):
        with self.peer(peer):
            return dist.irecv(buffer, peer), buffer, peer

    def wait(self, work, peer: int | str) -> None:
        with self.peer(peer):
            work.wait(self.timeout)

    @contextmanager
    def peer(self, peer: int | str):
        """Turn the backend's error for a dead or silent peer into one clear PeerFailure."""
        try:
            yield
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            who = f"rank {peer}" if isinstance(peer, int) else peer
            raise PeerFailure(
                f"rank {self.rank}: no answer from {who} within {self.timeout.total_seconds():g} s, "
                f"or it (or a rank it waits on) exited: {reason}"
            ) from None

    def flush(self) -> None:
        while self.sends:
            work, _, peer = self.sends.popleft()
            self.wait(work, peer)


@torch.inference_mode()
def run_layer_pipeline(
    adapter: WanAdapter,
    config: DualParalConfig,
    prompt_embeds: torch.Tensor,
    on_block: BlockCallback | None = None,
    scheduler_config=None,
    timeout: float = 60.0,
) -> int:
    """This rank's stage of the layer pipeline (torch.distributed initialised, or one process when it is not).

    `on_block` is called on rank 0 as each block leaves the queue. Returns the bytes all ranks sent.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    layers = split_layers(adapter.num_layers, world)[rank]
    first, last = rank == 0, rank == world - 1
    cond = Conditioning(adapter, config, prompt_embeds, scheduler_config)
    adapter.install_feature_cache(layers)
    links = _Links(rank, timeout)
    hidden_shape = (cond.batch, adapter.window * adapter.tokens_per_frame, adapter.dim)
    channels, (height, width) = adapter.channels, adapter.latent_size
    new_hidden = lambda: torch.empty(hidden_shape, dtype=adapter.dtype, device=adapter.device)  # noqa: E731

    queue = BlockQueue(config, (channels, height, width), scheduler_config, adapter.device) if first else None
    pending: deque = deque()  # rank 0: (item, posted receive of its prediction), in send order

    def apply(item: WorkItem, prediction: torch.Tensor) -> None:
        final = queue.apply(item, prediction)
        if final is not None and on_block is not None:
            on_block(item.block, final)

    def settle(item: WorkItem) -> None:
        """Apply every prediction that item's input depends on: up to (iteration - 1, block - 1)."""
        while pending and (
            pending[0][0].iteration < item.iteration - 1
            or (pending[0][0].iteration == item.iteration - 1 and pending[0][0].block >= item.block - 1)
        ):
            done, (work, buffer, peer) = pending.popleft()
            links.wait(work, peer)
            apply(done, buffer)

    num_items = config.num_blocks * config.steps  # the schedule is a generator: nothing grows with the video
    incoming = None if first else links.recv(new_hidden(), rank - 1)
    for index, item in enumerate(work_items(config)):
        adapter.cache.prepare(item, config.feature_cache)
        step = cond.steps[item.step]
        if first:
            settle(item)
            if item.step == 0:
                queue.enter(item.block)
            hidden = adapter.embed(queue.model_input(item.block), cond.batch)
        else:
            work, hidden, peer = incoming
            links.wait(work, peer)
            if index + 1 < num_items:  # post the next receive now, so it overlaps this block's compute
                incoming = links.recv(new_hidden(), rank - 1)
        for i in layers:
            hidden = adapter.run_block(i, hidden, cond.text, step)
        if not last:
            links.send(hidden, rank + 1)
            if first:
                frames = own_frames(config, item.block)
                buffer = torch.empty(1, channels, frames, height, width, device=adapter.device)
                pending.append((item, links.recv(buffer, world - 1)))
            continue
        prediction = guide(adapter.head(hidden, step, own_frames(config, item.block)), config.guidance_scale)
        if first:
            apply(item, prediction)
        else:
            links.send(prediction, 0)
    if first:
        while pending:
            done, (work, buffer, peer) = pending.popleft()
            links.wait(work, peer)
            apply(done, buffer)
    links.flush()
    if world == 1:
        return links.bytes_sent
    total = torch.tensor([links.bytes_sent], dtype=torch.float64, device=adapter.device)
    with links.peer("another rank"):
        work = dist.all_reduce(total, async_op=True)
    links.wait(work, "another rank")
    return int(total.item())
