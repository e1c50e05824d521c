"""Rendered video quality: an 8-second DualParal video of the shipped video model (trained by our own
`ddm train --modality video`, see docs/video.md) shows the prompted digit and no block seams, and its digit moves at
the training clips' speed; "moving right" moves as prompted far more often than a still (0) or a shuffled real
clip (0.26 at 16x16, speed 2) would. The diagonal "bouncing" moves less well (0.43, docs/video.md)."""
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
    assert (r["block"], r["first_block"]) == (4, 7)
    assert r["fidelity"] >= 0.9, r
    assert r["seam"] <= 1.3, r
    if "right" in prompt:
        assert r["motion"] >= 0.7, r  # measured 0.827 (docs/video.md)
    assert 1.5 <= r["speed"] <= 2.5, r  # the training clips move 2 px per frame (speed=2)


def test_the_benchmark_times_frames_at_the_settings_the_model_carries(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "scripts/bench_video_model.py", "--seconds", "1", "--ranks", "1", "--rounds", "2",
                          "--json", str(out)], cwd=QUICK_MODEL.parents[3], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    carried = json.loads((QUICK_MODEL / "video_settings.json").read_text())
    assert figures["settings"]["steps"] == carried["steps"] and figures["settings"]["height"] == carried["size"]
    assert figures["settings"]["sampler"] == carried["sampler"]
    (row,) = figures["results"]
    assert row["ranks"] == 1 and row["frames"] == carried["fps"] and len(row["rounds"]) == 2
    assert 0 < row["denoise_ms_per_frame"] <= row["render_ms_per_frame"]
    assert f"{row['denoise_ms_per_frame']:.2f}" in run.stdout
