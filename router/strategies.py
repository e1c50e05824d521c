"""Routing strategies: turn router probabilities p(k | x_t) into ensemble weights w (DESIGN.md section 2).

Spec strings: `full`, `top1` (= `topk:1`, the default), `topk:K`, `threshold:TAU`, `sample:K`.
Every strategy returns per-sample weights that sum to 1 over the experts it keeps; zero weight means the
expert is not run for that sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddm import UsageError

DEFAULT_STRATEGY = "top1"


@dataclass(frozen=True)
class Strategy:
    name: str  # "full" | "topk" | "threshold" | "sample"
    k: int = 0
    tau: float = 0.0

    def __str__(self) -> str:
        if self.name == "full":
            return "full"
        if self.name == "threshold":
            return f"threshold:{self.tau:g}"
        return f"{self.name}:{self.k}"

    def weights(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """probs (B, P) over the experts present, rows summing to 1 -> weights (B, P), rows summing to 1."""
        present = probs.shape[1]
        if self.name == "full":
            return probs
        if self.name == "topk":
            k = min(self.k, present)
            if k == 1:  # exact one-hot: the routed expert's velocity passes through unscaled
                return torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)
            top = probs.topk(k, dim=1)
            kept = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
        elif self.name == "threshold":
            keep = (probs >= self.tau).scatter_(1, probs.argmax(1, keepdim=True), True)  # never drop the argmax
            kept = probs * keep
        else:  # sample: draw k distinct experts with probability w, keep their renormalized weights
            k = min(self.k, present)
            drawn = torch.multinomial(probs.float(), k, replacement=False, generator=generator)
            if k == 1:
                return torch.zeros_like(probs).scatter_(1, drawn, 1.0)
            kept = torch.zeros_like(probs).scatter_(1, drawn, probs.gather(1, drawn))
        return kept / kept.sum(1, keepdim=True)


def parse_strategy(spec: str, num_experts: int) -> Strategy:
    """Validate a strategy string against the router's K (UsageError on anything unknown or out of range)."""
    spec = spec.strip().lower()
    name, _, arg = spec.partition(":")
    if name == "top1" and not arg:
        name, arg = "topk", "1"
    elif name.startswith("top") and name[3:].isdigit() and not arg:
        name, arg = "topk", name[3:]
    if name == "full" and not arg:
        return Strategy("full")
    if name in ("topk", "sample"):
        if not arg.isdigit() or not 1 <= int(arg) <= num_experts:
            raise UsageError(f"strategy {spec!r}: k must be an integer in 1..{num_experts} (the router's K)")
        return Strategy(name, k=int(arg))
    if name == "threshold":
        try:
            tau = float(arg)
        except ValueError:
            tau = -1.0
        if not 0.0 <= tau <= 1.0:
            raise UsageError(f"strategy {spec!r}: threshold must be a number in [0, 1]")
        return Strategy("threshold", tau=tau)
    raise UsageError(f"unknown strategy {spec!r}: use full, top1, topk:K, threshold:TAU or sample:K")
