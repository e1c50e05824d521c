"""Quality measures for long digit videos: `ddm eval-video PATH... --prompts ...`.

- digit fidelity: share of frames in which the prompted digit(s) are recognized. A detector finds the 8x8
  window(s) holding the most ink (a sliding-window sum; for two digits the second window is the best one not
  overlapping the first by more than half) and classifies each with a small CNN trained on the embedded
  digits with +-1 pixel shifts and noise (`python -m evaluation.video_metrics --train-detector OUT`); a frame counts
  when the multiset of classes equals the prompted digits.
- flicker: mean |frame[t+1] - frame[t]|, beside the same measure on real clips from the generator.
- seam score: mean frame difference across block boundaries / mean difference inside blocks (~1 = no seams).
- drift: fidelity over the first 10% of frames minus fidelity over the last 10% (> 0: the video degrades).
- motion: share of frame transitions in which each digit moves as its prompt says (direction, speed, bounces
  only at walls; evaluation/motion.py), over the video and per tenth of it (`motion_curve`).

Inputs: MP4 files (gray-scaled and area-resized to the canvas), or .safetensors (key `video`) / .npy arrays
of frames in [-1, 1] shaped (F, H, W), (1, F, H, W) or (F, 1, H, W).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm import UsageError, first_line
from ddm.data.moving_digits import DIGIT_SIZE
from evaluation.motion import ink_seeds, motion_scores, prompt_motion

DETECTOR_PATH = Path(__file__).parent / "assets" / "digit_detector.safetensors"
RESULTS_FORMAT = "ddm-eval-video/1"  # in --out: marks the file as ours, so a re-run may replace it
MAX_CANVAS = 1024


class DigitWindowClassifier(nn.Module):
    """Classifies one 8x8 window in [-1, 1] into 10 digits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.GELU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.GELU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_detector(out: Path, steps: int = 1500, seed: int = 0) -> float:
    """Train the window classifier on all embedded digits, shifted by up to 1 pixel and noised; returns the
    accuracy on shifted copies of a held-out fifth. Deterministic for `seed` on one thread."""
    from ddm.data.images import DigitsDataset
    from ddm.io import atomic_save_tensors

    g = torch.Generator().manual_seed(seed)
    ds = DigitsDataset()
    order = torch.randperm(len(ds), generator=g)
    held, train = order[: len(ds) // 5], order[len(ds) // 5:]

    def augment(idx):
        padded = F.pad(ds.images[idx, 0], (1, 1, 1, 1), value=-1.0)
        dx, dy = torch.randint(0, 3, (2, len(idx)), generator=g)
        rows = (dy.view(-1, 1) + torch.arange(DIGIT_SIZE)).view(-1, DIGIT_SIZE, 1)
        cols = (dx.view(-1, 1) + torch.arange(DIGIT_SIZE)).view(-1, 1, DIGIT_SIZE)
        x = padded[torch.arange(len(idx)).view(-1, 1, 1), rows, cols].unsqueeze(1)
        return (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1), ds.labels[idx]

    torch.manual_seed(seed)
    model = DigitWindowClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        x, y = augment(train[torch.randint(len(train), (128,), generator=g)])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.inference_mode():
        x, y = augment(held)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    atomic_save_tensors(out, model.state_dict(), metadata={"heldout_accuracy": f"{accuracy:.4f}", "steps": str(steps), "seed": str(seed)})
    return accuracy


def load_detector(path: Path = DETECTOR_PATH) -> DigitWindowClassifier:
    from safetensors.torch import load_file

    model = DigitWindowClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


def find_digits(frames: torch.Tensor, count: int, detector: nn.Module, search: int = 1) -> torch.Tensor:
    """(F, H, W) in [-1, 1] -> (F, count) detected classes.

    The window with the most ink seeds each digit (the next seed may not overlap an earlier one by more than
    half a digit); the class probabilities are averaged over the seed and its neighbours within `search`
    pixels, which steadies seeds pulled off-centre by a nearby digit."""
    n = len(frames)
    gh, gw = frames.shape[1] - DIGIT_SIZE + 1, frames.shape[2] - DIGIT_SIZE + 1
    seeds = ink_seeds(frames, count)  # (F, count, 2)
    shift = torch.arange(-search, search + 1)
    shifts = torch.stack(torch.meshgrid(shift, shift, indexing="ij"), -1).view(-1, 2)  # (S, 2)
    limit = torch.tensor([gh - 1, gw - 1])
    corners = torch.minimum((seeds.unsqueeze(2) + shifts).clamp_min(0), limit)  # (F, count, S, 2)
    offs = torch.arange(DIGIT_SIZE)
    rows = (corners[..., 0:1] + offs).unsqueeze(-1)  # (F, count, S, 8, 1)
    cols = (corners[..., 1:2] + offs).unsqueeze(-2)  # (F, count, S, 1, 8)
    windows = frames[torch.arange(n).view(-1, 1, 1, 1, 1), rows, cols]  # (F, count, S, 8, 8)
    with torch.inference_mode():
        probs = detector(windows.flatten(0, 2).unsqueeze(1)).softmax(1).view(n, count, len(shifts), 10)
    return probs.mean(2).argmax(-1)


def prompt_digits(prompt: str) -> list[int]:
    digits = [int(w) for w in prompt.split() if w.isdigit() and len(w) == 1]
    if not 1 <= len(digits) <= 2:
        raise UsageError(f"prompt {prompt!r} names {len(digits)} digits; the detector checks 1 or 2")
    return digits


def frame_hits(frames: torch.Tensor, digits: list[int], detector: nn.Module) -> torch.Tensor:
    """(F,) bool: the detected classes equal the prompted digits (as a multiset)."""
    classes = find_digits(frames, len(digits), detector)
    return (classes.sort(1).values == torch.tensor(sorted(digits))).all(1)


def mean_step(frames: torch.Tensor) -> torch.Tensor:
    """(F-1,) mean |frame[t+1] - frame[t]| per transition."""
    return (frames[1:] - frames[:-1]).abs().flatten(1).mean(1)


def seam_score(frames: torch.Tensor, block: int, first_block: int | None = None) -> float:
    """Mean difference across block boundaries / inside blocks. Boundaries at frames first_block + k*block."""
    first_block = first_block or block
    steps = mean_step(frames)
    boundary = torch.zeros(len(steps), dtype=torch.bool)
    boundary[first_block - 1:: block] = True  # transition t -> t+1 crosses a boundary when t+1 starts a block
    if not boundary.any() or boundary.all():
        raise UsageError(f"{len(frames)} frames with block {block} (first {first_block}) have no block boundary to score")
    return (steps[boundary].mean() / steps[~boundary].mean().clamp_min(1e-8)).item()


@functools.lru_cache(maxsize=8)
def real_flicker(size: int, frames: int, digits: int, clips: int = 64) -> float:
    """Flicker of real generator clips with this canvas size and number of digits (the reference)."""
    from ddm.data.moving_digits import MovingDigitsConfig, MovingDigitsDataset

    ds = MovingDigitsDataset(MovingDigitsConfig(clips=4 * clips, frames=min(frames, 64), size=size, max_digits=digits, seed=1234))
    chosen = [i for i in range(len(ds)) if len(ds.params(i)["labels"]) == digits][:clips]
    return torch.stack([mean_step(ds[i][0][0]).mean() for i in chosen]).mean().item()


def evaluate_frames(frames: torch.Tensor, prompt: str, block: int | None = None, first_block: int | None = None,
                    detector: nn.Module | None = None, speed: float = 1.0) -> dict:
    """All measures for one video, (F, H, W) in [-1, 1]; `speed` is the data's pixels per frame."""
    if frames.dim() != 3 or len(frames) < 2:
        raise UsageError(f"a video needs shape (F >= 2, H, W), got {tuple(frames.shape)}")
    if min(frames.shape[1:]) < DIGIT_SIZE:
        raise UsageError(f"frames of {tuple(frames.shape[1:])} are smaller than a {DIGIT_SIZE}x{DIGIT_SIZE} digit")
    detector = detector or load_detector()
    frames = frames.float()
    digits = prompt_digits(prompt)
    hits = frame_hits(frames, digits, detector).float()
    tenth = max(1, len(frames) // 10)
    steps = mean_step(frames)
    out = {
        "prompt": prompt,
        "frames": len(frames),
        "fidelity": hits.mean().item(),
        "fidelity_first10": hits[:tenth].mean().item(),
        "fidelity_last10": hits[-tenth:].mean().item(),
        "flicker": steps.mean().item(),
        "flicker_real": real_flicker(frames.shape[-1], len(frames), len(digits)),
    }
    out["drift"] = out["fidelity_first10"] - out["fidelity_last10"]
    out["flicker_ratio"] = out["flicker"] / out["flicker_real"]
    out["seam"] = seam_score(frames, block, first_block) if block else None
    out.update(motion_scores(frames, len(digits), prompt_motion(prompt), speed))
    return out


def load_frames(path: Path, canvas: int | None) -> torch.Tensor:
    """A video file -> (F, H, W) float in [-1, 1], area-resized to `canvas` x `canvas` when given.

    An MP4 with a sidecar is checked against it first: the SHA-256 the renderer recorded, and the frame count."""
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".safetensors", ".npy"):
        raise UsageError(f"{path}: unsupported video file (use .mp4, .safetensors or .npy)")
    if suffix == ".mp4":
        check_against_sidecar(path)
    try:
        frames = read_frames(path, suffix)
    except UsageError:
        raise
    except Exception as e:  # each reader (ffmpeg/pyav, safetensors, numpy) has its own errors for a bad file
        raise UsageError(f"cannot read video {path}: {type(e).__name__}: {first_line(e)}") from None
    if frames.dim() == 4 and 1 in frames.shape[:2]:
        frames = frames.squeeze(0 if frames.shape[0] == 1 else 1)
    if frames.dim() != 3:
        raise UsageError(f"{path}: expected frames shaped (F, H, W), got {tuple(frames.shape)}")
    if not torch.isfinite(frames).all():
        raise UsageError(f"{path}: frames hold non-finite values (nan or inf)")
    written = sidecar_record(path).get("frames_written")
    if suffix == ".mp4" and isinstance(written, int) and len(frames) != written:
        raise UsageError(f"{path} has {len(frames)} frames but its sidecar says {written} were written: the file is incomplete")
    if canvas and frames.shape[1:] != (canvas, canvas):
        frames = F.interpolate(frames.unsqueeze(1), size=(canvas, canvas), mode="area").squeeze(1)
    return frames


def read_frames(path: Path, suffix: str) -> torch.Tensor:
    if suffix == ".mp4":
        import imageio.v3 as iio

        rgb = torch.from_numpy(np.asarray(iio.imread(path, plugin="pyav" if _has_pyav() else "FFMPEG")))
        return rgb.float().mean(-1) / 127.5 - 1.0 if rgb.dim() == 4 else rgb.float() / 127.5 - 1.0
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "video" not in tensors:
            raise UsageError(f"{path}: no 'video' tensor (keys: {', '.join(tensors)})")
        return tensors["video"].float()
    array = np.load(path, allow_pickle=False)
    if not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"{path}: holds {array.dtype} values, not numbers")
    return torch.from_numpy(array.astype(np.float32))


def check_against_sidecar(path: Path) -> None:
    """An MP4 whose bytes differ from what the renderer recorded is damaged or was replaced."""
    from ddm.io import sha256_file

    expected = sidecar_record(path).get("sha256")
    if isinstance(expected, str) and sha256_file(path) != expected:
        raise UsageError(f"{path} does not match the SHA-256 its sidecar recorded: the file is damaged or incomplete")


def _has_pyav() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="videos: .mp4, .safetensors (key 'video') or .npy frames")
    p.add_argument("--prompts", nargs="+", help="one prompt per video, or one for all (default: each MP4's JSON sidecar)")
    p.add_argument("--block", type=int, default=None, help="frames per DualParal block, for the seam score (default: the sidecar's)")
    p.add_argument("--first-block", type=int, default=None, help="frames in the first block (default: block + cat from the sidecar, else --block)")
    p.add_argument("--canvas", type=int, default=None, help="resize frames to this square canvas (an upscaled MP4)")
    p.add_argument("--speed", type=float, default=None,
                   help="pixels per frame the digits should move (default: the speed of the data the sidecar's model was trained on, else 1)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON (a new file, or one ddm wrote)")


def sidecar_record(path: Path) -> dict:
    """The render record beside a video (the renderer writes `<video>.json`), or {}."""
    sidecar = path.with_suffix(".json")
    try:
        record = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def sidecar_settings(path: Path) -> dict:
    """The render settings of a video's sidecar, or {}."""
    settings = sidecar_record(path).get("settings", {})
    return settings if isinstance(settings, dict) else {}


def model_speed(settings: dict) -> float:
    """The speed of the moving-digits data the sidecar's model (an expert folder) was trained on, else 1."""
    from ddm.data.moving_digits import MovingDigitsConfig

    try:
        spec = json.loads((Path(settings["model"]) / "expert.json").read_text())["data"]
        return float(MovingDigitsConfig.parse(spec).speed)
    except (KeyError, OSError, TypeError, ValueError):  # no sidecar, not an expert, not moving digits
        return 1.0


def video_jobs(args) -> list[tuple[Path, str, int | None, int | None, float]]:
    """(path, prompt, block, first block, speed) per video, all checked before any video is read."""
    if args.prompts is not None and len(args.prompts) not in (1, len(args.paths)):
        raise UsageError(f"got {len(args.prompts)} prompts for {len(args.paths)} videos: give one per video or one for all")
    if args.speed is not None and not args.speed > 0:
        raise UsageError(f"--speed must be > 0, got {args.speed}")
    for name in ("block", "first_block", "canvas"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.canvas is not None and args.canvas > MAX_CANVAS:
        raise UsageError(f"--canvas {args.canvas} is larger than {MAX_CANVAS} pixels (the digit videos are a few dozen)")
    if args.out is not None:
        from ddm.io import check_json_output

        check_json_output(args.out, RESULTS_FORMAT)
    jobs = []
    for i, path in enumerate(args.paths):
        if not path.is_file():
            raise UsageError(f"video not found: {path}")
        settings = sidecar_settings(path)
        prompt = args.prompts[i if len(args.prompts) > 1 else 0] if args.prompts else settings.get("prompt")
        if not isinstance(prompt, str):
            raise UsageError(f"no prompt for {path}: pass --prompts (it has no JSON sidecar naming one)")
        prompt_digits(prompt)
        prompt_motion(prompt)
        block, first = args.block, args.first_block
        # Pixel space: one latent frame per video frame (a VAE packs several), the layout maybe cut at the end.
        frames, video_frames = settings.get("frames"), settings.get("video_frames")
        pixel_space = isinstance(frames, int) and isinstance(video_frames, int) and frames >= video_frames
        if block is None and pixel_space and isinstance(settings.get("block"), int) and isinstance(settings.get("cat"), int):
            block, first = settings["block"], first or settings["block"] + settings["cat"]
        jobs.append((path, prompt, block, first, args.speed or model_speed(settings)))
    return jobs


def run(args) -> int:
    jobs = video_jobs(args)
    detector = load_detector()
    results = []
    for path, prompt, block, first, speed in jobs:
        r = evaluate_frames(load_frames(path, args.canvas), prompt, block, first, detector, speed)
        results.append({"path": str(path), **r, "block": block, "first_block": first or block, "expected_speed": speed})
    print(format_table(results))
    if args.out:
        from ddm.io import atomic_write_json, output_lock

        with output_lock(args.out, folder=False):
            atomic_write_json(args.out, {"format": RESULTS_FORMAT, "results": results})
    return 0


def format_table(results: list[dict]) -> str:
    head = (f"{'video':<32} {'frames':>6} {'fidelity':>8} {'first10':>7} {'last10':>7} {'drift':>6} {'flicker':>7} "
            f"{'real':>6} {'seam':>6} {'motion':>6}")
    rows = [head, "-" * len(head)]
    for r in results:
        seam = f"{r['seam']:.2f}" if r["seam"] is not None else "-"
        motion = f"{r['motion']:.3f}" if "motion" in r else "-"
        rows.append(
            f"{Path(r['path']).name[-32:]:<32} {r['frames']:>6} {r['fidelity']:>8.3f} {r['fidelity_first10']:>7.3f} "
            f"{r['fidelity_last10']:>7.3f} {r['drift']:>6.3f} {r['flicker']:>7.4f} {r['flicker_real']:>6.4f} {seam:>6} {motion:>6}"
        )
    curves = [f"{Path(r['path']).name[-32:]:<32} motion per tenth: {' '.join(f'{v:.2f}' for v in r['motion_curve'])}"
              for r in results if "motion_curve" in r]
    return "\n".join(rows + curves)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train the digit detector that digit fidelity uses")
    parser.add_argument("--train-detector", type=Path, required=True, metavar="OUT")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(f"held-out accuracy (shifted, noised): {train_detector(a.train_detector, a.steps, a.seed):.4f}")
