"""`DEMO_FAST=1 make demo` end to end in a fresh directory: every stage runs, the page shows what they wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio

REPO = Path(__file__).resolve().parents[1]


def test_fast_demo_builds_the_page(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_FAST": "1", "DEMO_OUT": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "scripts/demo.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    page = (out / "index.html").read_text()
    for asset in ("grid.png", "video.mp4", "training.png", "motion.png"):
        assert asset in page and (out / asset).stat().st_size > 0
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["island-0", "island-1", "island-2", "island-3", "monolith"]
    fids = [json.loads((out / f"eval-{m}.json").read_text())["fid"] for m in ("ensemble", "monolith")]
    assert all(f > 0 for f in fids) and f"{fids[0]:.1f}" in page
    frames = sum(1 for _ in iio.imiter(out / "video.mp4"))
    record = json.loads((out / "video.json").read_text())
    assert frames == record["frames_written"] == 4 * record["settings"]["fps"] and record["ranks"] == 2
    scores = json.loads((out / "video-scores.json").read_text())["results"][0]
    assert "motion score" in page and f"{scores['motion']:.3f}" in page and len(scores["motion_curve"]) == 10
    assert f"first tenth {scores['motion_first10']:.2f}, last {scores['motion_last10']:.2f}" in page
    assert 'src="motion.png"' in page and "frame strips" in page.lower()
    text = out / "text"  # the text-to-image stage: prompted grid, ensemble beside monolith
    assert "text/grid.png" in page and (text / "grid.png").stat().st_size > 0 and (text / "ensemble" / "model_index.json").is_file()
    for tag in ("ensemble", "monolith"):
        scores = json.loads((text / f"eval-{tag}.json").read_text())
        assert f"{scores['fid']:.1f}" in page and len(list((text / f"grids-{tag}").glob("*.png"))) == 10
        assert f"text/grids-{tag}/00-a-handwritten-zero.png" in page
    # A second run reuses every stage: nothing is retrained or re-rendered.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "video.mp4", out / "experts" / "monolith" / "expert.json",
                                                 text / "experts" / "monolith" / "expert.json")}
    again = subprocess.run([sys.executable, "scripts/demo.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
