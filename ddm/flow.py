"""The flow-matching noise path shared by experts and router (docs/design.md §2).

x_t = (1 - σ) x0 + σ ε, target velocity v = ε - x0, σ in [0, 1], the model sees timestep = 1000 σ.
Training σ is drawn from `FlowConfig` and optionally SD3-shifted; the router reads the same config from
the experts so that it learns p(k | x_t) on exactly their noise distribution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ddm import UsageError

NUM_TRAIN_TIMESTEPS = 1000  # diffusers FlowMatchEulerDiscreteScheduler default


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift, identical to FlowMatchEulerDiscreteScheduler(shift=...)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowConfig:
    shift: float = 1.0
    sigma_sampling: str = "logit_normal"  # "logit_normal" (SD3) or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.sigma_sampling not in ("logit_normal", "uniform"):
            raise UsageError(f"unknown sigma_sampling {self.sigma_sampling!r}: use 'logit_normal' or 'uniform'")
        if not self.shift > 0:
            raise UsageError(f"flow shift must be > 0, got {self.shift}")
        if not self.logit_std > 0:
            raise UsageError(f"logit_std must be > 0, got {self.logit_std}")

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """n training noise levels σ in (0, 1), float32."""
        if self.sigma_sampling == "uniform":
            sigma = torch.rand(n, generator=generator, device=device)
        else:
            z = torch.randn(n, generator=generator, device=device)
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift_sigma(sigma, self.shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        return cls(**d)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - σ) x0 + σ ε, with one σ per sample broadcast over the remaining dims."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS
