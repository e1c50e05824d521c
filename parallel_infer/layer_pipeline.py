"""The DualParal layer pipeline: block-wise denoising over a contiguous layer split across ranks.

"Layer pipeline" means the model's layers run as pipeline stages, one contiguous group per rank (not a
diffusers sampling pipeline such as router/pipeline.py). Rank 0 embeds and owns the queue; each rank runs
its own layers (with its own feature cache) and passes one block's hidden states to the next rank with
asynchronous point-to-point sends; the last rank runs the head, applies guidance and sends the block's
prediction back to rank 0. Conditioning is computed on every rank. With CFG-parallel (topology.py) a second
group of ranks runs the unconditional branch from the same latents, and its head output joins the first
group's at the head. `run_reference` computes the same schedule in one process with no torch.distributed; on
the same device and dtype, `run_layer_pipeline` with any number of ranks and any split gives the same latents
bit for bit (CFG-parallel: the same as `run_reference(..., split_batch=True)`).
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from parallel_infer.config import DualParalConfig
from parallel_infer.feature_cache import FeatureCache
from parallel_infer.queue import BlockQueue, WorkItem, make_scheduler, own_frames, work_items
from parallel_infer.topology import Topology
from parallel_infer.wan_adapter import WanAdapter

BlockCallback = Callable[[int, torch.Tensor], None]  # (block index, final latent [1, C, frames, H, W])
SEND_WINDOW = 2  # hidden states in flight per rank: enough to overlap, bounded memory
HIDDEN, FINAL = 0, 1  # message tags: a rank's input, and a finished block for the decode rank (gloo matches by tag)


class PeerFailure(RuntimeError):
    """Another rank died or stopped answering within the timeout."""


class Conditioning:
    """Text and per-step timestep conditioning of one video, computed once on each rank, per expert."""

    def __init__(self, adapter: WanAdapter, config: DualParalConfig, prompt_embeds: torch.Tensor, scheduler_config=None):
        self.batch = prompt_embeds.shape[0]  # 2 with guidance: [cond, uncond]; 1 per CFG-parallel group
        timesteps = make_scheduler(config, scheduler_config).timesteps
        self.experts = [adapter.expert_of(t) for t in timesteps]
        texts = {e: adapter.encode_text(prompt_embeds, e) for e in sorted(set(self.experts))}
        self.steps = [adapter.step_conditioning(t, self.batch, texts[e], e) for t, e in zip(timesteps, self.experts)]

    def prepare_cache(self, cache: FeatureCache, item: WorkItem, enabled: bool, slot: int = 0) -> None:
        cache.prepare(item, enabled, self.experts, slot)


def guide(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over the batched [cond, uncond] prediction, in float32."""
    prediction = prediction.float()
    if prediction.shape[0] == 1:
        return prediction
    cond, uncond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)


def branch_output(adapter: WanAdapter, config: DualParalConfig, cond: Conditioning, item: WorkItem, window: torch.Tensor,
                  slot: int = 0) -> torch.Tensor:
    """One work item through every layer in this process, unguided: [B, C, own frames, H, W] (model dtype).
    The feature cache, installed on every layer, is read and filled in `slot` as `item`'s place says."""
    cond.prepare_cache(adapter.cache, item, config.feature_cache, slot)
    step = cond.steps[item.step]
    hidden = adapter.embed(window, cond.batch, step.expert)
    for i in range(adapter.num_layers):
        hidden = adapter.run_block(i, hidden, step)
    return adapter.head(hidden, step, own_frames(config, item.block))


def forward_window(adapter: WanAdapter, config: DualParalConfig, conds: list[Conditioning], item: WorkItem,
                   window: torch.Tensor) -> torch.Tensor:
    """The model input [1, C, block + cat, H, W] of `item.block` -> its guided prediction for the block's own
    frames, float32. `conds`: [batched cond/uncond], or [cond, uncond] run one after the other (CFG-parallel)."""
    outputs = [branch_output(adapter, config, cond, item, window, slot) for slot, cond in enumerate(conds)]
    return guide(torch.cat(outputs) if len(outputs) > 1 else outputs[0], config.guidance_scale)


@torch.inference_mode()
def run_reference(adapter: WanAdapter, config: DualParalConfig, prompt_embeds: torch.Tensor, on_block: BlockCallback,
                  scheduler_config=None, split_batch: bool = False) -> None:
    """The schedule of docs/design.md §3 as a plain loop in one process: what the layer pipeline must equal.
    `split_batch`: the conditional and unconditional branch as two forwards of batch 1 (what CFG-parallel runs)."""
    rows = prompt_embeds.split(1) if split_batch else [prompt_embeds]
    conds = [Conditioning(adapter, config, embeds, scheduler_config) for embeds in rows]
    queue = BlockQueue(config, (adapter.channels, *adapter.latent_size), scheduler_config, adapter.device)
    adapter.install_feature_cache(range(adapter.num_layers))
    for item in work_items(config):
        if item.step == 0:
            queue.enter(item.block)
        final = queue.apply(item, forward_window(adapter, config, conds, item, queue.model_input(item.block)))
        if final is not None:
            on_block(item.block, final)


class _Links:
    """This rank's point-to-point traffic: async sends with a bounded window, waits with a timeout."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timedelta(seconds=timeout)
        self.sends: deque = deque()
        self.bytes_sent = 0

    def send(self, tensor: torch.Tensor, peer: int, tag: int = HIDDEN) -> None:
        tensor = tensor.contiguous()
        with self.peer(peer):
            self.sends.append((dist.isend(tensor, peer, tag=tag), tensor, peer))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while len(self.sends) > SEND_WINDOW:
            work, _, peer = self.sends.popleft()
            self.wait(work, peer)

    def recv(self, buffer: torch.Tensor, peer: int, tag: int = HIDDEN):
        with self.peer(peer):
            return dist.irecv(buffer, peer, tag=tag), buffer, peer

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
    topology: Topology | None = None,
) -> int:
    """This rank's part of the render (torch.distributed initialised, or one process when it is not).

    `topology` (default: one group, the even split, rank 0 decodes) says which layers this rank runs and whom
    it talks to. `on_block` is called on the decode rank as each block leaves the queue, in order. Returns
    the bytes all ranks sent.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    topology = topology or Topology.even(adapter.num_layers, world)
    if topology.world != world:
        raise ValueError(f"topology for {topology.world} ranks, but {world} ranks joined")
    group, stage, layers = topology.group(rank), topology.stage(rank), topology.layers(rank)
    owner, entry, head = rank == 0, stage == 0, stage == topology.stages - 1
    split = topology.groups == 2  # CFG-parallel: this group runs one row of [cond, uncond]
    cond = Conditioning(adapter, config, prompt_embeds[group : group + 1] if split else prompt_embeds, scheduler_config)
    adapter.install_feature_cache(layers)
    links = _Links(rank, timeout)
    channels, (height, width) = adapter.channels, adapter.latent_size
    window_shape = (1, channels, adapter.window, height, width)
    hidden_shape = (cond.batch, adapter.window * adapter.tokens_per_frame, adapter.dim)

    def new_input() -> torch.Tensor:  # a group's entry receives latents (CFG-parallel group 1), others hidden states
        if entry:
            return torch.empty(window_shape, device=adapter.device)
        return torch.empty(hidden_shape, dtype=adapter.dtype, device=adapter.device)

    def block_buffer(block: int, dtype=torch.float32) -> torch.Tensor:
        return torch.empty(1, channels, own_frames(config, block), height, width, dtype=dtype, device=adapter.device)

    queue = BlockQueue(config, (channels, height, width), scheduler_config, adapter.device) if owner else None
    pending: deque = deque()  # rank 0: (item, posted receive, its own branch's head output or None), in order
    finals: deque = deque()  # rank 0, when another rank decodes: finished blocks not yet sent
    decoding = topology.decode_rank == rank and not owner
    incoming_final = None  # the decode rank's posted receive of a finished block

    def apply(item: WorkItem, prediction: torch.Tensor) -> None:
        final = queue.apply(item, prediction)
        if final is None:
            return
        if topology.decode_rank != 0:
            finals.append(final)
        elif on_block is not None:
            on_block(item.block, final)

    def resolve() -> None:
        """Apply the oldest pending prediction: received whole, or (CFG-parallel, rank 0 running the conditional
        head) guided from rank 0's head output and the unconditional one received."""
        done, (work, buffer, peer), own = pending.popleft()
        links.wait(work, peer)
        apply(done, buffer if own is None else guide(torch.cat([own, buffer]), config.guidance_scale))

    def settle(item: WorkItem) -> None:
        """Apply every prediction that item's input depends on: up to (iteration - 1, block - 1)."""
        while pending and (
            pending[0][0].iteration < item.iteration - 1
            or (pending[0][0].iteration == item.iteration - 1 and pending[0][0].block >= item.block - 1)
        ):
            resolve()

    def final_due(item: WorkItem) -> bool:
        """Block b - 1 left the queue in the previous iteration: rank 0 sends it to the decode rank right after
        its sends of this item, and the decode rank posts the receive right before its next input's, so the
        two ranks' messages stay in one order (NCCL matches point-to-point messages by order alone)."""
        return item.step == config.steps - 1 and item.block > 0

    num_items = config.num_blocks * config.steps  # the schedule is a generator: nothing grows with the video
    incoming = None if owner else links.recv(new_input(), rank - 1 if not entry else 0)
    for index, item in enumerate(work_items(config)):
        cond.prepare_cache(adapter.cache, item, config.feature_cache)
        step = cond.steps[item.step]
        frames = own_frames(config, item.block)
        if owner:
            settle(item)
            if item.step == 0:
                queue.enter(item.block)
            window = queue.model_input(item.block)
            if split:
                links.send(window, topology.entry(1))
            hidden = adapter.embed(window, cond.batch, step.expert)
        else:
            work, hidden, peer = incoming
            links.wait(work, peer)
            if decoding and final_due(item):
                incoming_final = (item.block - 1, links.recv(block_buffer(item.block - 1), 0, FINAL))
            if index + 1 < num_items:  # post the next receive now, so it overlaps this block's compute
                incoming = links.recv(new_input(), peer)
            if entry:
                hidden = adapter.embed(hidden, cond.batch, step.expert)
        if split and head and group == 0:  # post the receive of the other branch's head output early
            uncond = links.recv(block_buffer(item.block, adapter.dtype), topology.head(1))
        for i in layers:
            hidden = adapter.run_block(i, hidden, step)
        if not head:
            links.send(hidden, rank + 1)
            if owner:
                pending.append((item, links.recv(block_buffer(item.block), topology.head(0)), None))
        else:
            output = adapter.head(hidden, step, frames)
            if group == 1:
                links.send(output, topology.head(0))
            elif split and owner:  # guided when a later input needs it: the other branch need not have finished
                pending.append((item, uncond, output))
            else:
                if split:
                    links.wait(uncond[0], uncond[2])
                    output = torch.cat([output, uncond[1]])
                prediction = guide(output, config.guidance_scale)
                if owner:
                    apply(item, prediction)
                else:
                    links.send(prediction, 0)
        if owner and finals and final_due(item):
            links.send(finals.popleft(), topology.decode_rank, FINAL)
        if incoming_final is not None:  # sent right after this item's input: already here or on its way
            block, (work, buffer, peer) = incoming_final
            links.wait(work, peer)
            if on_block is not None:
                on_block(block, buffer)
            incoming_final = None
    if owner:
        while pending:
            resolve()
        while finals:  # the last block (any other is sent during the loop)
            links.send(finals.popleft(), topology.decode_rank, FINAL)
    if decoding:
        last = config.num_blocks - 1
        work, buffer, peer = links.recv(block_buffer(last), 0, FINAL)
        links.wait(work, peer)
        if on_block is not None:
            on_block(last, buffer)
    links.flush()
    if world == 1:
        return links.bytes_sent
    total = torch.tensor([links.bytes_sent], dtype=torch.float64, device=adapter.device)
    with links.peer("another rank"):
        work = dist.all_reduce(total, async_op=True)
    links.wait(work, "another rank")
    return int(total.item())
