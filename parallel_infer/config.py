"""DualParal settings, their validation, and the frame layout they imply (docs/design.md §3).

Everything here is checked before any model loads or any process starts, so a bad value costs nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ddm import UsageError
from ddm.checks import check_range, check_seed

SAMPLERS = ("euler", "unipc")


@dataclass(frozen=True)
class DualParalConfig:
    frames: int  # latent frames F = block + cat + (num_blocks - 1) * block
    steps: int = 50
    block: int = 8
    cat: int = 4
    guidance_scale: float = 5.0  # classifier-free guidance (--cfg); 1.0 runs the conditional branch alone
    flow_shift: float = 3.0
    seed: int = 0
    sampler: str = "euler"  # each block's ODE solver: "euler" (first order) or "unipc" (UniPC, Wan's own)
    feature_cache: bool = True  # False: blocks do not attend to the next block's keys/values (ablation)
    coordinated_noise: bool = True  # False: i.i.d. Gaussian noise per block (ablation)

    def __post_init__(self):
        for name in ("frames", "steps", "block", "cat"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.cat >= self.block:
            raise UsageError(f"context size cat={self.cat} must be smaller than the block size block={self.block}")
        check_range("cfg", self.guidance_scale, above=0)  # also refuses nan and inf
        check_range("flow_shift", self.flow_shift, above=0)
        check_seed(self.seed, "seed")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        extra = self.frames - self.block - self.cat
        if extra < 0 or extra % self.block:
            raise UsageError(
                f"{self.frames} latent frames do not fit the block layout block + cat + n*block "
                f"(block={self.block}, cat={self.cat}); nearest valid: {', '.join(map(str, fitting_frames(self.frames, self.block, self.cat)))}"
            )

    @property
    def num_blocks(self) -> int:
        return 1 + (self.frames - self.block - self.cat) // self.block

    @property
    def num_iterations(self) -> int:
        return self.steps + self.num_blocks - 1

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def fitting_frames(frames: int, block: int, cat: int) -> list[int]:
    """The valid latent frame counts nearest to `frames` (the layout is block + cat + n * block)."""
    first = block + cat
    if frames < first:
        return [first]
    below = first + (frames - first) // block * block
    return [below, below + block]


def latent_frames_covering(frames: int, block: int, cat: int) -> int:
    """The smallest valid latent layout with at least `frames` latent frames."""
    n = max(0, -(-(frames - block - cat) // block))
    return block + cat + n * block

