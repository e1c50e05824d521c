"""The motion score, calibrated: real generator clips score high; still, shuffled, jittering, wrong-axis and
wrong-direction clips score low; the per-tenth curve shows where motion stops."""
import numpy as np
import pytest
import torch

from ddm import UsageError
from ddm.data.moving_digits import MovingDigitsConfig, MovingDigitsDataset
from evaluation.motion import motion_scores, prompt_motion, track_digits

OTHER_AXIS = {"right": "up", "left": "down", "up": "left", "down": "right", "bouncing": "right"}


@pytest.fixture(scope="module")
def clips():
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=30, frames=48, size=16, max_digits=1, seed=3))
    return [(ds[i][0][0], ds.params(i)["motion"]) for i in range(len(ds))]


def score(frames, motion, digits=1):
    return motion_scores(frames, digits, motion)["motion"]


def test_real_clips_score_high_still_and_shuffled_clips_low(clips):
    g = torch.Generator().manual_seed(0)
    real = [score(f, m) for f, m in clips]
    still = [score(f[:1].expand(len(f), -1, -1), m) for f, m in clips]
    shuffled = [score(f[torch.randperm(len(f), generator=g)], m) for f, m in clips]
    other_axis = [score(f, OTHER_AXIS[m]) for f, m in clips]
    assert {m for _, m in clips} == {"right", "left", "up", "down", "bouncing"}
    assert min(real) >= 0.95
    assert max(still) == 0.0
    assert np.mean(shuffled) <= 0.2
    assert np.mean(other_axis) <= 0.05


def test_jitter_and_a_wrong_first_leg_score_low():
    canvas = torch.full((40, 24, 24), -1.0)
    canvas[:, 8:16, 4:12] = 1.0  # a square digit
    jitter = torch.stack([torch.roll(canvas[0], t % 2, dims=1) for t in range(40)])  # back and forth mid-canvas
    assert score(jitter, "right") <= 0.05
    leftward = torch.stack([torch.roll(canvas[0], 8 - t, dims=1) for t in range(5)])  # 4 steps left, far from walls
    assert score(leftward, "left") == 1.0 and score(leftward, "right") == 0.0


def test_the_curve_shows_motion_stopping_halfway(clips):
    frames, motion = next((f, m) for f, m in clips if m == "right")
    stopped = torch.cat([frames[:24], frames[23:24].expand(24, -1, -1)])
    s = motion_scores(stopped, 1, motion)
    assert len(s["motion_curve"]) == 10
    assert s["motion_first10"] == 1.0 and s["motion_last10"] == 0.0
    assert s["motion"] == pytest.approx(23 / 47)
    assert motion_scores(frames, 1, motion)["speed"] == 1.0


def test_two_digits_are_tracked_apart():
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=20, frames=48, size=32, max_digits=2, seed=5))
    pairs = [i for i in range(len(ds)) if len(ds.params(i)["labels"]) == 2]
    scores = [score(ds[i][0][0], ds.params(i)["motion"], 2) for i in pairs]
    assert len(pairs) >= 5 and np.mean(scores) >= 0.75  # crossing digits are sometimes confused
    positions, _ = track_digits(ds[pairs[0]][0][0], 2)
    assert positions.shape == (48, 2, 2) and not positions.isnan().any()


def test_prompts_name_at_most_one_motion():
    assert prompt_motion("a 3 moving right") == "right" and prompt_motion("7 and 1 bouncing") == "bouncing"
    assert prompt_motion("a 3") is None
    with pytest.raises(UsageError, match="names 2 motions"):
        prompt_motion("a 3 moving right up")


def test_faster_data_is_scored_at_its_own_speed():
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=12, frames=32, size=16, max_digits=1, seed=2, speed=2))
    clips = [(ds[i][0][0], ds.params(i)["motion"]) for i in range(len(ds))]
    assert min(motion_scores(f, 1, m, speed=2)["motion"] for f, m in clips) == 1.0
    assert max(motion_scores(f, 1, m, speed=1)["motion"] for f, m in clips) == 0.0  # 2 px a frame is not 1
