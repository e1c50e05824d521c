"""Process groups for DualParal: from torchrun's environment, or for workers we spawn ourselves.

Two timeouts. Joining the group and loading the model may take minutes (imports, weights, a text encoder),
so the group's own timeout, which `ready()` waits under, is at least STARTUP_TIMEOUT. Once every rank is
ready, each wait in the layer pipeline (layer_pipeline.py) has the user's `timeout`: a rank that dies or hangs while rendering makes
the others raise within it instead of waiting forever.
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


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(timeout: float) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun; (0, 1, device) for a plain process, with no group."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, device_for(0)
    device = device_for(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend(), timeout=timedelta(seconds=max(timeout, STARTUP_TIMEOUT)),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def init_with_file(rank: int, world: int, store_file: str, timeout: float) -> torch.device:
    device = device_for(rank)
    dist.init_process_group(backend(), init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=max(timeout, STARTUP_TIMEOUT)))
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
