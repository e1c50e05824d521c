"""Motion score: does each prompted digit move the way its prompt says, for the whole video?

The generator's world (ddm/data/moving_digits.py): a digit moves one pixel per frame along the prompt's axis
("right"/"left": x, "down"/"up": y, "bouncing": both, diagonally) and reverses only when it reaches a wall.
So a transition t -> t+1 of one digit is *correct* when, on every axis,

- the speed is plausible: |dx| in [0.5, 1.5] x the generator's speed (1 pixel per frame unless its data spec
  says `speed=N`) on a moving axis, |d| <= 0.5 on a still one;
- the direction persists: the same sign as the digit's last move on that axis, or the opposite sign right at
  the wall ahead (a bounce: the digit's ink within WALL_TOLERANCE pixels of that canvas edge);
- before its first bounce the digit goes the prompted way ("right" is +x); "bouncing" prompts leave it free.

A still video fails on speed, a shuffled one on speed and persistence, a jittering one (back and forth in
mid-canvas) on persistence, a digit going left for "moving right" on its first leg. Positions are ink
centroids: each digit is seeded at the 8x8 window holding the most ink (as the fidelity detector seeds it),
and its centroid taken over that window grown by a pixel; two digits are matched frame to frame by distance.
The score is the share of correct transitions, over the video and per tenth of it (the motion curve).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddm import UsageError
from ddm.data.moving_digits import DIGIT_SIZE

MOTION_AXES = {"right": ((1, 0), 1), "left": ((1, 0), -1), "down": ((0, 1), 1), "up": ((0, 1), -1)}  # (moving x, y), sign
INK = 0.25  # a pixel is ink above this brightness in [0, 1] (the embedded digits' faint edges are ~0.1-0.2)
WALL_TOLERANCE = 3.5  # pixels from ink to wall at a bounce: the digits' 8x8 boxes leave up to 3 blank columns
SPEED = (0.5, 1.5)  # share of the generator's speed (pixels per frame) that counts as that speed
STILL = 0.5  # pixels per frame an axis that should not move may drift


def prompt_motion(prompt: str) -> str | None:
    """The motion word of a prompt (right, left, down, up, bouncing), or None when it names none."""
    words = [w for w in prompt.lower().split() if w in (*MOTION_AXES, "bouncing")]
    if len(words) > 1:
        raise UsageError(f"prompt {prompt!r} names {len(words)} motions ({', '.join(words)}); the motion score checks one")
    return words[0] if words else None


def ink_seeds(frames: torch.Tensor, count: int) -> torch.Tensor:
    """(F, H, W) in [-1, 1] -> (F, count, 2) top-left (y, x) of the 8x8 windows with the most ink; a later seed may
    not overlap an earlier one by more than half a digit."""
    ink = F.avg_pool2d((frames.unsqueeze(1) + 1) / 2, DIGIT_SIZE, stride=1).squeeze(1)  # (F, H-7, W-7)
    _, gh, gw = ink.shape
    ys = torch.arange(gh).view(1, -1, 1)
    xs = torch.arange(gw).view(1, 1, -1)
    seeds = []
    for _ in range(count):
        best = ink.flatten(1).argmax(1)
        y, x = best // gw, best % gw
        seeds.append(torch.stack([y, x], 1))
        near = ((ys - y.view(-1, 1, 1)).abs() < DIGIT_SIZE // 2) & ((xs - x.view(-1, 1, 1)).abs() < DIGIT_SIZE // 2)
        ink = ink.masked_fill(near, -1.0)
    return torch.stack(seeds, 1)


def track_digits(frames: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ink centroids (F, count, 2) as (x, y) pixels, NaN where a digit has no ink, and ink extents (F, count, 4)
    as (min x, max x, min y, max y); digit k of frame t+1 is the one nearest digit k of frame t."""
    n, h, w = frames.shape
    ink = ((frames.float() + 1) / 2 - INK).clamp_min(0)  # (F, H, W)
    seeds = ink_seeds(frames.float(), count)  # (F, count, 2) as (y, x)
    ys = torch.arange(h).view(1, 1, -1, 1)
    xs = torch.arange(w).view(1, 1, 1, -1)
    top, left = seeds[..., 0].view(n, count, 1, 1) - 1, seeds[..., 1].view(n, count, 1, 1) - 1
    region = (ys >= top) & (ys < top + DIGIT_SIZE + 2) & (xs >= left) & (xs < left + DIGIT_SIZE + 2)
    weight = ink.unsqueeze(1) * region  # (F, count, H, W)
    mass = weight.sum((2, 3))
    x = (weight * xs).sum((2, 3)) / mass
    y = (weight * ys).sum((2, 3)) / mass
    positions = torch.stack([x, y], -1).masked_fill((mass < 0.5).unsqueeze(-1), math.nan)
    present = weight > 0
    big = max(h, w)
    extents = torch.stack([
        torch.where(present, xs, big).amin((2, 3)), torch.where(present, xs, -1).amax((2, 3)),
        torch.where(present, ys, big).amin((2, 3)), torch.where(present, ys, -1).amax((2, 3)),
    ], -1).float()
    if count == 2:  # keep each digit's identity: swap the pair where that brings them nearer their last places
        for t in range(1, n):
            kept = (positions[t] - positions[t - 1]).norm(dim=-1).nansum()
            swapped = (positions[t].flip(0) - positions[t - 1]).norm(dim=-1).nansum()
            if swapped < kept:
                positions[t], extents[t] = positions[t].flip(0), extents[t].flip(0)
    return positions, extents


def correct_transitions(positions: torch.Tensor, extents: torch.Tensor, size: tuple[int, int], motion: str,
                        speed: float = 1.0) -> torch.Tensor:
    """(F-1,) bool per transition of ONE digit: positions (F, 2), extents (F, 4), canvas (H, W), the data's speed."""
    steps = (positions[1:] - positions[:-1]).tolist()
    edges = extents.tolist()
    height, width = size
    moving, prompted = ((1, 1), 0) if motion == "bouncing" else MOTION_AXES[motion]
    last_sign = [prompted * m for m in moving]  # 0 = free (a bouncing digit's first move)
    bounced = [False, False]
    out = []
    for t, step in enumerate(steps):
        ok = True
        for axis in (0, 1):
            d = step[axis]
            if math.isnan(d):
                ok = False
                continue
            if not moving[axis]:
                ok &= abs(d) <= STILL
                continue
            if not SPEED[0] * speed <= abs(d) <= SPEED[1] * speed:
                ok = False
                continue
            sign = 1 if d > 0 else -1
            if last_sign[axis] and sign != last_sign[axis]:
                low, high = edges[t][2 * axis], edges[t][2 * axis + 1]
                gap = (width if axis == 0 else height) - 1 - high if last_sign[axis] > 0 else low
                at_wall = gap <= WALL_TOLERANCE
                ok &= at_wall
                bounced[axis] |= at_wall
            elif prompted and not bounced[axis]:
                ok &= sign == prompted  # the first leg goes the prompted way
            last_sign[axis] = sign
        out.append(ok)
    return torch.tensor(out, dtype=torch.bool)


def tenths(values: torch.Tensor) -> list[float]:
    """Means of 10 consecutive, near-equal slices (fewer when there are fewer than 10 values)."""
    return [chunk.float().mean().item() for chunk in torch.tensor_split(values, min(10, len(values)))]


def motion_scores(frames: torch.Tensor, digits: int, motion: str | None, speed: float = 1.0) -> dict:
    """motion (share of correct transitions over every digit), motion_curve (per tenth), first/last tenth, and
    the median speed along the moving axes in pixels per frame, for data moving `speed` pixels per frame.
    Empty when the prompt names no motion."""
    if motion is None:
        return {}
    positions, extents = track_digits(frames, digits)
    size = tuple(frames.shape[1:])
    correct = torch.stack([correct_transitions(positions[:, k], extents[:, k], size, motion, speed) for k in range(digits)]).float()
    per_transition = correct.mean(0)
    steps = (positions[1:] - positions[:-1]).abs()
    axes = [0, 1] if motion == "bouncing" else [MOTION_AXES[motion][0].index(1)]
    speed = steps[..., axes].flatten()
    speed = speed[~speed.isnan()]
    curve = tenths(per_transition)
    return {
        "motion": per_transition.mean().item(),
        "motion_curve": curve,
        "motion_first10": curve[0],
        "motion_last10": curve[-1],
        "speed": speed.median().item() if len(speed) else math.nan,
    }
