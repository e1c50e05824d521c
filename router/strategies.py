"""Routing strategies: turn router probabilities p(k | x_t) into ensemble weights w (docs/design.md §2).

Spec strings: `full`, `top1` (= `topk:1`), `topk:K`, `threshold:TAU`, `sample:K`, `trajectory`
(each sample draws one expert at the first step and keeps it) and the hybrid `trajectory:SIGMA:THEN` (trajectory
while σ >= SIGMA, then strategy THEN, e.g. `trajectory:0.5:top1`, the default). Every strategy returns per-sample weights that
sum to 1 over the experts it keeps; zero weight means the expert is not run for that sample. How the two rows of
one sample are routed under classifier-free guidance is `GUIDANCE_ROUTING`, chosen per pipeline call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddm import UsageError

# The hybrid beat top-1 on FID at the same cost in 8 of 9 (K, seed) runs of the digit reproduction (docs/ddm.md).
DEFAULT_STRATEGY = "trajectory:0.5:top1"
# "conditional": a sample's null-label row uses its conditional row's weights; "per-row": each row is routed alone.
GUIDANCE_ROUTING = ("conditional", "per-row")
DEFAULT_GUIDANCE_ROUTING = "conditional"
SPECS = "full, top1, topk:K, threshold:TAU, sample:K, trajectory or trajectory:SIGMA:THEN"


@dataclass(frozen=True)
class Strategy:
    name: str  # "full" | "topk" | "threshold" | "sample" | "trajectory"
    k: int = 0
    tau: float = 0.0
    handover: float = 0.0  # trajectory: below this σ `then` routes (0: the drawn expert to the end)
    then: Strategy | None = None

    def __str__(self) -> str:
        if self.name == "full":
            return "full"
        if self.name == "threshold":
            return f"threshold:{self.tau:g}"
        if self.name == "trajectory":
            return "trajectory" if self.then is None else f"trajectory:{self.handover:g}:{self.then}"
        return f"{self.name}:{self.k}"

    def experts_per_row(self, present: int) -> int | None:
        """How many experts a row can use at most, fixed before routing (None: it depends on the weights)."""
        if self.name == "full":
            return present
        if self.name in ("topk", "sample"):
            return min(self.k, present)
        if self.name == "trajectory":
            return 1 if self.then is None else self.then.experts_per_row(present)
        return None

    def weights(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """probs (B, P) over the experts present, rows summing to 1 -> weights (B, P), rows summing to 1.

        `trajectory` is stateful and routed by the ensemble; here it means one draw per row, as at its first step.
        """
        present = probs.shape[1]
        if self.name == "full":
            return probs
        if self.name == "trajectory":
            return draw_one(probs, generator)
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


def draw_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One expert per row with probability probs (inverse CDF of one uniform per row), as one-hot weights.

    Shapes are fixed, so nothing waits for the device (unlike `multinomial`'s checks).
    """
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], 1, generator=generator, device=device).to(probs.device)
    cdf = probs.cumsum(1)
    index = (cdf < u * cdf[:, -1:]).sum(1, keepdim=True).clamp_(max=probs.shape[1] - 1)
    return torch.zeros_like(probs).scatter_(1, index, 1.0)


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
        tau = parse_number(arg)
        if not 0.0 <= tau <= 1.0:
            raise UsageError(f"strategy {spec!r}: threshold must be a number in [0, 1]")
        return Strategy("threshold", tau=tau)
    if name == "trajectory":
        if not arg:
            return Strategy("trajectory")
        sigma, _, then_spec = arg.partition(":")
        handover = parse_number(sigma)
        if not 0.0 < handover < 1.0:
            raise UsageError(f"strategy {spec!r}: the hand-over sigma {sigma!r} must be a number in (0, 1)")
        if not then_spec:
            raise UsageError(f"strategy {spec!r}: name the strategy after the hand-over, e.g. trajectory:{sigma}:top1")
        try:
            then = parse_strategy(then_spec, num_experts)
        except UsageError as e:
            raise UsageError(f"strategy {spec!r}, after the hand-over: {e}") from None
        if then.name == "trajectory":
            raise UsageError(f"strategy {spec!r}: the strategy after the hand-over cannot be trajectory")
        return Strategy("trajectory", handover=handover, then=then)
    raise UsageError(f"unknown strategy {spec!r}: use {SPECS}")


def parse_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")  # fails every range check, so the caller's message names the text


def check_guidance_routing(rule: str) -> str:
    if rule not in GUIDANCE_ROUTING:
        raise UsageError(f"guidance routing {rule!r}: use {' or '.join(GUIDANCE_ROUTING)}")
    return rule
