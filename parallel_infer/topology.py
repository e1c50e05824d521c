"""How the ranks share one render: the layer split, CFG-parallel groups, and which rank decodes.

None of these options changes what a video is (the sidecar's settings): the layer pipeline equals the reference
bit for bit for any split and either decode rank. CFG-parallel runs the conditional and the unconditional branch
as two forwards of batch 1 instead of one of batch 2, so it equals the reference that splits the batch the same
way (`run_reference(..., split_batch=True)`) bit for bit, and the batched one to float rounding.

Ranks are numbered group by group: with G groups of S stages, rank g*S + s is stage s of group g. Group 0 runs
the conditional branch (or both, batched, without CFG-parallel) and its stage 0 (rank 0) owns the queue; group 1
runs the unconditional branch. Every group holds the same layer ranges per stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from ddm import UsageError
from parallel_infer.layer_split import check_layer_split, layer_ranges, split_layers

DECODE_RANKS = ("first", "last")
DECODE_MODES = ("auto", "thread", "inline")


@dataclass(frozen=True)
class ParallelOptions:
    """What the user chooses about placement (--layer-split, --cfg-parallel, --decode-on, --decode)."""

    layer_split: tuple[int, ...] | None = None  # layers per pipeline stage; None = balanced by measured cost
    cfg_parallel: bool = False  # two rank groups: conditional and unconditional branch
    decode_on: str = "first"  # "first": rank 0 decodes; "last": the last rank (rank 0 sends it each final block)
    decode: str = "auto"  # "thread": beside denoising (own CUDA stream), "inline", "auto": thread on a GPU, inline on a CPU

    def groups(self) -> int:
        return 2 if self.cfg_parallel else 1

    def decode_rank(self, world: int) -> int:
        return 0 if self.decode_on == "first" else world - 1


def check_options(options: ParallelOptions, num_layers: int, ranks: int, guided: bool) -> None:
    """UsageError (one line) for options that cannot work with this model, rank count and guidance."""
    if options.decode_on not in DECODE_RANKS:
        raise UsageError(f"--decode-on {options.decode_on!r}: choose first or last")
    if options.decode not in DECODE_MODES:
        raise UsageError(f"--decode {options.decode!r}: choose auto, thread or inline")
    if options.cfg_parallel:
        if not guided:
            raise UsageError("--cfg-parallel needs guidance (--cfg other than 1): without it there is no unconditional branch")
        if ranks % 2:
            raise UsageError(f"--cfg-parallel needs an even number of ranks (two equal groups), got {ranks}")
    stages = ranks // options.groups()
    split_layers(num_layers, stages)  # at most one stage per layer
    if options.layer_split is not None:
        check_layer_split(options.layer_split, num_layers, stages)


@dataclass(frozen=True)
class Topology:
    """Every rank's role in one render."""

    sizes: tuple[int, ...]  # layers per stage, in stage order
    groups: int = 1
    decode_on: str = "first"

    @classmethod
    def even(cls, num_layers: int, world: int, groups: int = 1, decode_on: str = "first") -> "Topology":
        return cls(tuple(len(r) for r in split_layers(num_layers, world // groups)), groups, decode_on)

    @property
    def stages(self) -> int:
        return len(self.sizes)

    @property
    def world(self) -> int:
        return self.groups * self.stages

    def group(self, rank: int) -> int:
        return rank // self.stages

    def stage(self, rank: int) -> int:
        return rank % self.stages

    def layers(self, rank: int) -> range:
        return layer_ranges(self.sizes)[self.stage(rank)]

    def entry(self, group: int) -> int:
        """The rank that embeds the group's input."""
        return group * self.stages

    def head(self, group: int) -> int:
        """The rank that runs the group's head."""
        return group * self.stages + self.stages - 1

    @property
    def decode_rank(self) -> int:
        return 0 if self.decode_on == "first" else self.world - 1

    def describe(self) -> dict:
        return {"layer_split": list(self.sizes), "groups": self.groups, "decode_rank": self.decode_rank}
