"""Process groups for DualParal: from torchrun's environment, or for ranks we spawn ourselves.

Two timeouts. Joining the group and loading the model may take minutes (imports, weights, a text encoder),
so the group's own timeout, which `ready()` waits under, is at least STARTUP_TIMEOUT. Once every rank is
ready, each wait in the layer pipeline (layer_pipeline.py) has the user's `timeout`: a rank that dies or
hangs while rendering makes the others raise within it instead of waiting forever.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


STARTUP_TIMEOUT = 600.0  # seconds


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def join_group(rank: int, world: int, timeout: float, store_file: str | None = None) -> torch.device:
    """Join the process group and return this rank's device. Ranks we spawn ourselves meet through
    `store_file`; without one, torchrun's environment says where. A world of one joins no group."""
    if world == 1:
        return device_for(0)
    group_timeout = timedelta(seconds=max(timeout, STARTUP_TIMEOUT))
    if store_file is not None:
        device = device_for(rank)
        dist.init_process_group(backend(), init_method=f"file://{store_file}", rank=rank, world_size=world, timeout=group_timeout)
        return device
    device = device_for(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend(), timeout=group_timeout, device_id=device if device.type == "cuda" else None)
    return device


def ready() -> None:
    """Wait until every rank has loaded its model (under the startup timeout), so rendering starts together."""
    if dist.is_initialized():
        dist.barrier()


def fail(message: str, code: int = 1) -> None:
    """Leave at once with one line: a peer may be gone, so no collective teardown that could hang."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
