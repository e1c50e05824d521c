"""Moving digits: a seeded video data set that needs no download.

Each clip shows 1-2 digits from the embedded 8x8 set (`ddm.data.images.DigitsDataset`) moving one pixel per frame on
a small canvas and bouncing off its walls, with a short prompt ("a 3 moving right", "7 and 1 bouncing").
Clip i is computed on the fly from (seed, i) alone, so the set streams, never sits in memory, and is the same
on every machine. Clips are (C=1, F, H, W) in [-1, 1], the layout WanTransformer3DModel reads per sample.

A data spec names the set on the command line: `moving-digits` or `moving-digits:size=16,frames=12,clips=2048`;
`variants=N` draws each digit from the first N images of its class only (easier, for quick models).
`speed=N` moves digits N pixels per frame from start positions on a grid of N pixels, so they stay on that grid
and bounce without stalling (with N = 2 every move is one whole 2x2 patch of a Wan transformer).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from ddm import UsageError

GENERATOR_VERSION = "moving-digits/1"
DIGIT_SIZE = 8
MOTIONS = ("right", "left", "down", "up", "bouncing")
_DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (dx, dy) pixels per frame
# Every word a generated prompt can contain: the prompt encoder's vocabulary.
VOCABULARY = ("a", "and", "moving", *MOTIONS, *(str(d) for d in range(10)))


@dataclass(frozen=True)
class MovingDigitsConfig:
    clips: int = 4096
    frames: int = 16
    size: int = 32
    max_digits: int = 2
    seed: int = 0
    variants: int = 0  # source images per digit class (the first ones of the embedded set); 0 = all ~180
    speed: int = 1  # pixels per frame


    def __post_init__(self):
        if self.clips < 1:
            raise UsageError(f"moving digits: clips must be >= 1, got {self.clips}")
        if not 2 <= self.frames <= 1024:
            raise UsageError(f"moving digits: frames must be in 2..1024, got {self.frames}")
        if not DIGIT_SIZE + 2 <= self.size <= 256:
            raise UsageError(f"moving digits: canvas size must be in {DIGIT_SIZE + 2}..256, got {self.size}")
        if self.max_digits not in (1, 2):
            raise UsageError(f"moving digits: max_digits must be 1 or 2, got {self.max_digits}")
        if self.variants < 0:
            raise UsageError(f"moving digits: variants must be >= 0 (0 = all images of a class), got {self.variants}")
        if self.speed < 1 or (self.size - DIGIT_SIZE) % self.speed:
            raise UsageError(f"moving digits: speed must be >= 1 and divide size - {DIGIT_SIZE} = {self.size - DIGIT_SIZE}, got {self.speed}")

    @classmethod
    def parse(cls, spec: str) -> "MovingDigitsConfig":
        """`moving-digits[:key=value,...]` with keys clips, frames, size, max_digits, seed, variants, speed."""
        name, _, options = spec.partition(":")
        if name != "moving-digits":
            raise UsageError(f"not a moving-digits spec: {spec!r}")
        known = {f.name for f in fields(cls)}
        values = {}
        for item in filter(None, options.split(",")):
            key, eq, value = item.partition("=")
            if key not in known or not eq:
                raise UsageError(f"bad option {item!r} in {spec!r}: use key=value with keys {', '.join(sorted(known))}")
            try:
                values[key] = int(value)
            except ValueError:
                raise UsageError(f"option {key} in {spec!r} must be an integer, got {value!r}") from None
        return cls(**values)

    def spec(self) -> str:
        return "moving-digits:" + ",".join(f"{k}={v}" for k, v in self.identity().items())

    def identity(self) -> dict:
        """The fields that define the clips; speed 1 (the original generator) is left out, so the specs and
        fingerprints of sets made before speed existed stay as they were."""
        return {k: v for k, v in asdict(self).items() if not (k == "speed" and v == 1)}


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, span: int) -> np.ndarray:
    """Positions (..., F) of points moving at `velocity` reflected inside [0, span] (a triangle wave)."""
    t = np.arange(frames)
    raw = start[..., None] + velocity[..., None] * t
    if span == 0:
        return np.zeros_like(raw)
    m = np.mod(raw, 2 * span)
    return span - np.abs(m - span)


@functools.lru_cache(maxsize=1)
def embedded_digits():
    """The 8x8 digits, loaded once per process (clips only read them)."""
    from ddm.data.images import DigitsDataset

    return DigitsDataset()


def make_prompt(labels: list[int], motion: str) -> str:
    subject = f"a {labels[0]}" if len(labels) == 1 else " and ".join(str(d) for d in labels)
    return f"{subject} {motion}" if motion == "bouncing" else f"{subject} moving {motion}"


class MovingDigitsDataset(Dataset):
    """Item i: (clip (1, F, H, W) float32 in [-1, 1], prompt str, labels (2,) int64 padded with -1, i)."""

    name = "moving-digits"
    channels = 1
    num_classes = 10

    def __init__(self, config: MovingDigitsConfig | str = MovingDigitsConfig(), digits=None):
        self.config = MovingDigitsConfig.parse(config) if isinstance(config, str) else config
        self.digits = digits if digits is not None else embedded_digits()
        self.frames, self.size = self.config.frames, self.config.size
        labels = self.digits.labels.numpy()
        self._by_class = [np.flatnonzero(labels == c) for c in range(10)]
        h = hashlib.sha256(GENERATOR_VERSION.encode())
        h.update(json.dumps(self.config.identity(), sort_keys=True).encode())
        h.update(self.digits.fingerprint.encode())
        self.fingerprint = h.hexdigest()[:16]

    def __len__(self):
        return self.config.clips

    def params(self, i: int) -> dict:
        """The random choices behind clip i: digits, source images, start, velocity, motion."""
        if not 0 <= i < len(self):
            raise IndexError(f"clip {i} outside 0..{len(self) - 1}")
        rng = np.random.default_rng((self.config.seed, i))
        n = int(rng.integers(1, self.config.max_digits + 1))
        labels = rng.integers(0, 10, n)
        sources = np.array([rng.choice(self._by_class[c][: self.config.variants or None]) for c in labels])
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        span = self.size - DIGIT_SIZE
        speed = self.config.speed
        start = rng.integers(0, span // speed + 1, (n, 2)) * speed  # (x, y)
        if motion == "bouncing":
            velocity = rng.choice([-1, 1], (n, 2)) * speed
        else:
            velocity = np.tile(np.array(_DIRECTIONS[motion]), (n, 1)) * speed
        return dict(labels=labels.tolist(), sources=sources, start=start, velocity=velocity, motion=motion,
                    prompt=make_prompt(labels.tolist(), motion))

    def render(self, p: dict, frames: int | None = None) -> torch.Tensor:
        """The clip of params `p` as (1, F, H, W); `frames` may exceed the configured length (long references)."""
        frames = frames or self.frames
        span = self.size - DIGIT_SIZE
        pos = bounce(p["start"], p["velocity"], frames, span)  # (n, 2, F)
        canvas = torch.full((frames, self.size, self.size), -1.0)
        offs = torch.arange(DIGIT_SIZE)
        t = torch.arange(frames).view(-1, 1, 1)
        for k, src in enumerate(p["sources"]):
            x, y = torch.from_numpy(pos[k, 0]), torch.from_numpy(pos[k, 1])
            rows = (y.view(-1, 1) + offs).view(-1, DIGIT_SIZE, 1)
            cols = (x.view(-1, 1) + offs).view(-1, 1, DIGIT_SIZE)
            digit = self.digits.images[src, 0]
            canvas[t, rows, cols] = torch.maximum(canvas[t, rows, cols], digit)
        return canvas.unsqueeze(0)

    def __getitem__(self, i):
        p = self.params(i)
        labels = torch.full((2,), -1, dtype=torch.int64)
        labels[: len(p["labels"])] = torch.tensor(p["labels"])
        return self.render(p), p["prompt"], labels, i

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        """(N,) the first digit of each clip (a partition summary shows the label mix of each island)."""
        return torch.tensor([self.params(i)["labels"][0] for i in range(len(self))], dtype=torch.int64)

    def features(self, indices=None) -> torch.Tensor:
        """Per-clip features for partitioning into islands (N, 17): digit histogram (10), motion one-hot (5),
        mean start position / canvas (2). Computed from each clip's parameters, without rendering it."""
        indices = range(len(self)) if indices is None else indices
        out = torch.zeros(len(indices), 17)
        for row, i in enumerate(indices):
            p = self.params(int(i))
            for d in p["labels"]:
                out[row, d] += 1.0
            out[row, 10 + MOTIONS.index(p["motion"])] = 1.0
            out[row, 15:] = torch.from_numpy(p["start"].mean(0) / self.size)
        return out


def load_video_dataset(spec: str) -> MovingDigitsDataset:
    if spec.partition(":")[0] != "moving-digits":
        raise UsageError(f"unknown video data {spec!r}: use moving-digits[:clips=N,frames=F,size=S,max_digits=D,seed=X]")
    return MovingDigitsDataset(MovingDigitsConfig.parse(spec))
