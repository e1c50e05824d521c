"""Moving-digits clips: deterministic, streamed, consistent with their prompts and labels."""
import numpy as np
import pytest
import torch

from ddm import UsageError
from ddm.data.moving_digits import DIGIT_SIZE, MOTIONS, MovingDigitsConfig, MovingDigitsDataset, bounce


@pytest.fixture(scope="module")
def digits():
    from ddm.data.moving_digits import embedded_digits

    return embedded_digits()


def test_deterministic_for_a_seed_and_different_across_seeds(digits):
    a = MovingDigitsDataset(MovingDigitsConfig(clips=8, frames=6, size=20, seed=3), digits)
    b = MovingDigitsDataset(MovingDigitsConfig(clips=8, frames=6, size=20, seed=3), digits)
    c = MovingDigitsDataset(MovingDigitsConfig(clips=8, frames=6, size=20, seed=4), digits)
    for i in (0, 5, 7):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(8))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_streams_clips_computed_on_the_fly(digits):
    huge = MovingDigitsDataset(MovingDigitsConfig(clips=10**9, frames=4, size=16), digits)
    clip, prompt, labels, index = huge[10**9 - 1]  # instant: nothing is materialized
    assert clip.shape == (1, 4, 16, 16) and index == 10**9 - 1
    with pytest.raises(IndexError):
        huge[10**9]


def test_clip_shape_range_prompt_and_labels(digits):
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=64, frames=16, size=32), digits)
    seen_two = False
    for i in range(64):
        clip, prompt, labels, _ = ds[i]
        assert clip.shape == (1, 16, 32, 32) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1 and (clip[0] > 0).flatten(1).any(1).all()  # ink in every frame
        named = [int(w) for w in prompt.split() if w.isdigit()]
        assert named == [d for d in labels.tolist() if d >= 0]
        assert prompt.split()[-1] in MOTIONS
        seen_two |= len(named) == 2
    assert seen_two


def test_moving_right_moves_right_until_the_wall(digits):
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=400, frames=2, size=32, max_digits=1), digits)
    checked = 0
    for i in range(400):
        p = ds.params(i)
        if p["motion"] != "right" or p["start"][0, 0] >= 32 - DIGIT_SIZE:
            continue
        clip = ds.render(p)[0]
        assert torch.equal(clip[1, :, 1:], clip[0, :, :-1])  # frame 1 = frame 0 shifted right by one pixel
        checked += 1
    assert checked >= 5


def test_bounce_stays_inside_the_canvas():
    import numpy as np

    pos = bounce(np.array([0, 5, 24]), np.array([-1, 1, 1]), 100, 24)
    assert pos.min() == 0 and pos.max() == 24
    assert np.abs(np.diff(pos, axis=-1)).max() == 1  # one pixel per frame, reflected, never jumping


def test_features_follow_the_clip_parameters(digits):
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=32), digits)
    f = ds.features(range(32))
    assert f.shape == (32, 17)
    for i in range(32):
        p = ds.params(i)
        assert torch.equal(f[i, :10], torch.bincount(torch.tensor(p["labels"]), minlength=10).float())
        assert f[i, 10 + MOTIONS.index(p["motion"])] == 1


@pytest.mark.parametrize("spec", ["moving-digits:size=4", "moving-digits:frames=1", "moving-digits:max_digits=3",
                                  "moving-digits:fps=3", "moving-digits:size=big", "moving-digits:clips=0"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError, match="moving"):
        MovingDigitsConfig.parse(spec)


def test_spec_round_trips():
    c = MovingDigitsConfig.parse("moving-digits:size=16,frames=8,max_digits=1")
    assert (c.size, c.frames, c.max_digits) == (16, 8, 1)
    assert MovingDigitsConfig.parse(c.spec()) == c


def test_speed_moves_on_a_grid_and_leaves_older_specs_alone():
    old = MovingDigitsDataset("moving-digits:size=12,frames=8,max_digits=1,variants=1,clips=8192")
    assert old.fingerprint == "a302ac25a7f52483" and "speed" not in old.config.spec()  # the shipped quick model's data
    fast = MovingDigitsDataset("moving-digits:size=16,frames=24,clips=20,speed=2")
    for i in range(len(fast)):
        p = fast.params(i)
        steps = np.abs(np.diff(bounce(p["start"], p["velocity"], 24, 8), axis=-1))
        moving = p["velocity"] != 0
        assert (p["start"] % 2 == 0).all() and (steps[moving] == 2).all() and (steps[~moving] == 0).all()  # never stalls
    assert "speed=2" in fast.config.spec() and fast.fingerprint != MovingDigitsDataset("moving-digits:size=16,frames=24,clips=20").fingerprint
    with pytest.raises(UsageError, match="speed must be >= 1 and divide size - 8 = 8, got 3"):
        MovingDigitsConfig.parse("moving-digits:size=16,speed=3")
