"""Which transformer layers each rank of the layer pipeline runs (docs/design.md §3)."""
from __future__ import annotations

from ddm import UsageError


def split_layers(num_layers: int, world_size: int) -> list[range]:
    """Contiguous layer ranges per rank, the remainder on the lowest ranks (30 on 4 ranks -> 8/8/7/7)."""
    if world_size <= 0:
        raise UsageError(f"the number of ranks must be positive, got {world_size}")
    if world_size > num_layers:
        raise UsageError(f"{world_size} ranks but the model has only {num_layers} layers: use at most {num_layers} ranks")
    base, rest = divmod(num_layers, world_size)
    sizes = [base + (r < rest) for r in range(world_size)]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]
