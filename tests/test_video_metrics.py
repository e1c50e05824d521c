"""Long-video measures: fidelity with the digit detector, flicker, seams at block boundaries, drift; the CLI."""
import json

import numpy as np
import pytest
import torch

from frontends.cli import main
from ddm.data.moving_digits import MovingDigitsConfig, MovingDigitsDataset
from evaluation.video_metrics import evaluate_frames, load_detector, seam_score


@pytest.fixture(scope="module")
def detector():
    return load_detector()


@pytest.fixture(scope="module")
def clips():
    ds = MovingDigitsDataset(MovingDigitsConfig(clips=40, frames=40, size=16, max_digits=1, seed=7))
    return [ds[i] for i in range(40)]


def test_detector_recognizes_real_moving_digits(clips, detector):
    right = [evaluate_frames(c[0], p, detector=detector)["fidelity"] for c, p, _, _ in clips]
    wrong = [evaluate_frames(c[0], f"a {(int(p.split()[1]) + 1) % 10} bouncing", detector=detector)["fidelity"] for c, p, _, _ in clips]
    assert np.mean(right) >= 0.9
    assert np.mean(wrong) <= 0.1


def test_flicker_of_real_clips_matches_the_reference_and_a_still_video_has_none(clips, detector):
    clip, prompt = clips[0][0][0], clips[0][1]
    r = evaluate_frames(clip, prompt, detector=detector)
    assert 0.5 < r["flicker_ratio"] < 2.0
    still = evaluate_frames(clip[:1].expand(10, -1, -1), prompt, detector=detector)
    assert still["flicker"] == 0.0 and still["fidelity"] == r["fidelity_first10"]


def test_seam_score_sees_jumps_at_block_boundaries(clips):
    smooth = clips[1][0][0]
    assert 0.7 < seam_score(smooth, block=4) < 1.4
    seamed = smooth.clone()
    for start in range(8, len(seamed), 4):  # each block after the first is displaced by 3 more pixels
        seamed[start:] = torch.roll(seamed[start:], (3, 3), dims=(-2, -1))
    assert seam_score(seamed, block=4, first_block=8) > 1.5
    assert seam_score(seamed, block=4, first_block=8) > seam_score(seamed, block=4, first_block=6)


def test_drift_is_fidelity_lost_from_the_first_to_the_last_tenth(clips, detector):
    clip, prompt = clips[2][0][0].clone(), clips[2][1]
    clip[-4:] = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = evaluate_frames(clip, prompt, detector=detector)
    assert r["fidelity_first10"] == 1.0 and r["fidelity_last10"] <= 0.5
    assert r["drift"] == r["fidelity_first10"] - r["fidelity_last10"]


def test_cli_on_numpy_frames_and_an_upscaled_mp4(tmp_path, clips, capsys):
    import imageio.v3 as iio

    clip, prompt = clips[3][0][0], clips[3][1]
    np.save(tmp_path / "v.npy", clip.numpy())
    big = ((clip.repeat_interleave(8, 1).repeat_interleave(8, 2) + 1) * 127.5).round().to(torch.uint8)
    iio.imwrite(tmp_path / "v.mp4", big.unsqueeze(-1).expand(-1, -1, -1, 3).numpy(), fps=16, codec="libx264", quality=10)
    out = tmp_path / "r.json"
    rc = main(["eval-video", str(tmp_path / "v.npy"), str(tmp_path / "v.mp4"), "--prompts", prompt,
               "--canvas", "16", "--block", "4", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [r["frames"] for r in results] == [40, 40]
    assert results[0]["fidelity"] >= 0.95 and results[1]["fidelity"] >= 0.9  # MP4 compression costs a little
    assert results[0]["motion"] >= 0.95 and results[1]["motion"] >= 0.9 and len(results[1]["motion_curve"]) == 10
    printed = capsys.readouterr().out
    assert "fidelity" in printed and "motion per tenth" in printed


@pytest.mark.parametrize("args, message", [
    (["missing.npy", "--prompts", "a 3 bouncing"], "not found"),
    (["{npy}", "--prompts", "a cat"], "names 0 digits"),
    (["{npy}", "--prompts", "a 3 moving up left"], "names 2 motions"),
    (["{npy}", "{npy}", "--prompts", "a 1 bouncing", "a 2 bouncing", "a 3 bouncing"], "3 prompts for 2 videos"),
    (["{npy}", "--prompts", "a 1 bouncing", "--block", "0"], "--block must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    npy = tmp_path / "v.npy"
    np.save(npy, np.zeros((4, 16, 16), np.float32))
    out = tmp_path / "r.json"
    rc = main(["eval-video", *[a.format(npy=npy) for a in args], "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
