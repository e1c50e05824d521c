"""Rendered video quality: an 8-second DualParal video of the shipped quick video model (trained by our own
`ddm train --modality video`, see docs/video.md) shows the prompted digit and no block seams."""
import json
from pathlib import Path

import pytest

import ddm
from frontends.cli import main

QUICK_MODEL = Path(ddm.__file__).parent / "assets" / "video" / "quick"


@pytest.mark.parametrize("prompt", ["a 3 moving right", "a 7 bouncing"])
def test_eight_second_video_shows_the_prompted_digit_without_seams(tmp_path, prompt):
    from parallel_infer.api import render_video

    video = tmp_path / "v.mp4"
    record = render_video(QUICK_MODEL, prompt, video, seconds=8, seed=0)  # at the settings the model carries
    assert record["frames_written"] == 128
    out = tmp_path / "metrics.json"
    assert main(["eval-video", str(video), "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert (r["block"], r["first_block"]) == (5, 8)
    assert r["fidelity"] >= 0.8, r
    assert r["seam"] <= 1.5, r
