"""Coordinated initial noise for the blocks of one video (docs/design.md §3).

Blocks enter the queue one at a time, each as pure noise. Rather than unrelated noise per block,
FreeNoise-style shuffled reuse makes every [context | block] model window a permutation of the same
block + cat frames of noise, so neighbouring blocks start from consistent noise.
"""
from __future__ import annotations

import torch

from parallel_infer.config import DualParalConfig


class NoiseSource:
    """Initial noise per block, drawn in block order from `config.seed` on the CPU (the same on every device).

    Coordinated: one pool of block + cat frames; block 0 takes it whole; for each next block the pool
    becomes [its last cat frames | a permutation of the other block frames] and the block takes the last
    `block` frames. With `config.coordinated_noise` off (the ablation), i.i.d. Gaussian noise per block.
    """

    def __init__(self, config: DualParalConfig, shape: tuple[int, int, int]):
        self.config, self.shape = config, shape
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pool = None

    def next_block(self) -> torch.Tensor:
        """[1, C, frames, H, W] float32 noise for the next block."""
        config, (c, h, w) = self.config, self.shape
        if self.pool is None:
            self.pool = torch.randn(1, c, config.block + config.cat, h, w, generator=self.generator)
            return self.pool
        if not config.coordinated_noise:
            return torch.randn(1, c, config.block, h, w, generator=self.generator)
        perm = torch.randperm(config.block, generator=self.generator)
        self.pool = torch.cat([self.pool[:, :, config.block :], self.pool[:, :, perm]], dim=2)
        return self.pool[:, :, config.cat :]
