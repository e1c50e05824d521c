"""Which transformer layers each stage of the layer pipeline runs (docs/design.md §3).

Three ways to get the sizes (layers per stage, in stage order): the even split (`split_layers`), one the user
gives (`parse_layer_split` + `check_layer_split`: `--layer-split 14,16`), and the balanced split from measured
costs (`balanced_split`, fed by parallel_infer.balance), which gives the stages with extra work fewer layers.
"""
from __future__ import annotations

from ddm import UsageError


def split_layers(num_layers: int, world_size: int) -> list[range]:
    """Contiguous layer ranges per rank, the remainder on the lowest ranks (30 on 4 ranks -> 8/8/7/7)."""
    if world_size <= 0:
        raise UsageError(f"the number of ranks must be positive, got {world_size}")
    if world_size > num_layers:
        raise UsageError(f"{world_size} ranks but the model has only {num_layers} layers: use at most {num_layers} ranks")
    base, rest = divmod(num_layers, world_size)
    return layer_ranges([base + (r < rest) for r in range(world_size)])


def layer_ranges(sizes) -> list[range]:
    """Layers per stage -> contiguous ranges (4,3 -> 0..3, 4..6)."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def parse_layer_split(text: str) -> tuple[int, ...] | None:
    """'14,16' -> (14, 16); 'auto' -> None (balance by measured cost)."""
    if text.strip() == "auto":
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--layer-split {text!r}: give 'auto' or layers per stage as integers, e.g. 14,16") from None


def check_layer_split(sizes: tuple[int, ...], num_layers: int, stages: int) -> None:
    """A user's split must name every stage, give each at least one layer and cover the model's layers."""
    shown = ",".join(map(str, sizes))
    if len(sizes) != stages:
        raise UsageError(f"--layer-split {shown} has {len(sizes)} entries for {stages} pipeline stage{'s' * (stages != 1)}")
    empty = [r for r, n in enumerate(sizes) if n <= 0]
    if empty:
        raise UsageError(f"--layer-split {shown} gives stage {empty[0]} no layers ({sizes[empty[0]]})")
    if sum(sizes) != num_layers:
        raise UsageError(f"--layer-split {shown} sums to {sum(sizes)}, but the model has {num_layers} layers")


def balanced_split(num_layers: int, layer_cost: float, extra_costs: list[float]) -> tuple[int, ...]:
    """Layers per stage minimising the slowest stage, where stage r costs layers * layer_cost + extra_costs[r].

    Every stage gets one layer, then each next layer goes to the stage that would finish it soonest (ties: the
    lower stage); with equal layers this greedy order is optimal (each layer is one unit job on machines that
    start at their extra cost).
    """
    stages = len(extra_costs)
    if stages > num_layers:
        raise UsageError(f"{stages} pipeline stages but the model has only {num_layers} layers")
    sizes = [1] * stages
    for _ in range(num_layers - stages):
        costs = [(n + 1) * layer_cost + extra for n, extra in zip(sizes, extra_costs)]
        sizes[costs.index(min(costs))] += 1
    return tuple(sizes)
