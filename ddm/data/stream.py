"""The island's data order: one endless stream of seeded epoch permutations, cut into global batches.

Step s of a run with global batch B reads stream positions [s*B, (s+1)*B); within a step, micro-step a of
rank r reads the slice (a * world + r) * micro ... + micro. The position is a pure function of the step, so a
resumed run continues exactly where the checkpoint left off, and the union over ranks and micro-steps of one
step is the same global batch whatever the process count.
"""
from __future__ import annotations

import numpy as np
import torch

STREAM_DATA, STREAM_NOISE, STREAM_LATENT = 0, 1, 2


def derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class StreamSampler:
    """Micro-batches of one process, read from the island's endless stream of seeded epoch permutations."""

    def __init__(self, n: int, seed: int, batch_size: int, micro: int, grad_accum: int, rank: int, start_step: int, steps: int):
        self.n, self.seed, self.batch_size, self.micro = n, seed, batch_size, micro
        self.grad_accum, self.rank, self.start_step, self.steps = grad_accum, rank, start_step, steps
        self._epoch, self._perm = -1, None

    def positions(self, step: int, micro_step: int) -> torch.Tensor:
        world = self.batch_size // (self.micro * self.grad_accum)
        start = step * self.batch_size + (micro_step * world + self.rank) * self.micro
        return torch.arange(start, start + self.micro)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_DATA, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for a in range(self.grad_accum):
                pos = self.positions(step, a)
                epochs = pos // self.n
                yield torch.cat([self._permutation(int(e))[pos[epochs == e] % self.n] for e in epochs.unique()]).tolist()

    def __len__(self):
        return (self.steps - self.start_step) * self.grad_accum
