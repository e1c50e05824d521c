"""FSDP inside an island: FSDP2 (`torch.distributed.fsdp.fully_shard`, FULL_SHARD) over the island's processes.

Each transformer block is its own shard unit except the first (diffusers' DiT reads block 0's label embedding
before any block runs, so block 0 stays in the root unit, gathered with it), then the root. The EMA copy is
sharded the same way and updated shard by shard. Weights stay fp32: bf16 compute is autocast, as on the DDP path
(FSDP's own param_dtype would also round the timestep, up to 1000, to bf16).

Checkpoints hold full (unsharded) state dicts in exactly the layout an unsharded run writes, optimizer state
keyed by parameter index included, so a sharded run resumes unsharded and the other way round, on any number of
processes (ddm/training/checkpoint.py).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(network: nn.Module) -> None:
    """Shard a trainable network (its `denoiser`'s blocks, then the whole) in place over the default process group."""
    from torch.distributed.fsdp import fully_shard

    denoiser = network.denoiser
    blocks = getattr(denoiser, "transformer_blocks", None) or getattr(denoiser, "blocks", None) or []
    for block in list(blocks)[1:]:
        fully_shard(block)
    fully_shard(network)


def full_model_state(network: nn.Module) -> dict:
    """The full state dict on CPU on rank 0 (empty elsewhere); every rank must call it."""
    return get_model_state_dict(network, options=FULL_ON_CPU)


def _parameter_names(network: nn.Module) -> list[str]:
    return [name for name, _ in network.named_parameters()]  # the order the optimizer was given them in


def full_optimizer_state(network: nn.Module, optimizer) -> dict:
    """Rank 0: the optimizer's full state as an unsharded optimizer's `state_dict()` has it (keys = parameter
    index); empty elsewhere. Every rank must call it."""
    state = get_optimizer_state_dict(network, optimizer, options=FULL_ON_CPU)
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(network))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state(network: nn.Module, optimizer, state: dict) -> None:
    """Load a full, index-keyed optimizer state (as `full_optimizer_state` or an unsharded run wrote it)."""
    names = _parameter_names(network)
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(network, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
