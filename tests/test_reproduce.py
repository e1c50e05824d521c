"""scripts/reproduce_ddm.py --quick end to end (real trainer, router trainer, sampling, FID) in a subprocess."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_quick_writes_results(tmp_path):
    fragment = tmp_path / "ddm.md"
    fragment.write_text("# DDM\n\nprose that must survive\n")
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts/reproduce_ddm.py"), "--quick", "--jobs", "1",
           "--work-dir", str(tmp_path / "work"), "--json", str(out), "--fragment", str(fragment)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["wall_seconds"] > 0
    flops = result["flops"]
    assert flops["monolith_train_flops"] >= flops["ddm_train_flops"] > 0  # equal budget, router counted
    assert 0 < flops["router_over_expert_forward"] < 1
    models = {(r["model"], r["strategy"], r["guidance"]) for r in result["results"]}
    strategies = ("full", "top1", "top2", "sample:1", "threshold:0.1", "trajectory", "trajectory:0.5:top1", "trajectory:0.2:top1")
    for k in result["settings"]["ks"]:
        assert {(f"ddm-k{k}", s, "conditional") for s in strategies} <= models
        assert {(f"ddm-k{k}", s, "per-row") for s in ("top1", "trajectory")} <= models
    assert ("monolith", "monolith", "") in models and ("ddm-k4-random", "trajectory", "conditional") in models
    seeds = result["settings"]["seeds"]
    for r in result["results"]:
        assert len(r["fid_per_seed"]) == len(seeds) and all(math.isfinite(f) and f >= 0 for f in r["fid_per_seed"])
        assert math.isfinite(r["fid_std"]) and 0 <= r["accuracy_mean"] <= 1 and 0 <= r["class_error_mean"] <= 1
        assert (r["island_error_mean"] is None) == (r["model"] == "monolith")
        assert r["model"] == "monolith" or 0 <= r["island_error_mean"] <= 1
        if r["strategy"] in ("top1", "sample:1", "monolith", "trajectory") or r["strategy"].endswith(":top1"):
            assert r["experts_per_step"] == 1.0
        if r["strategy"] == "full":
            assert r["experts_per_step"] == int(r["model"].split("-k")[1][0])
    text = fragment.read_text()
    assert text.startswith("# DDM\n\nprose that must survive") and text.count("<!-- reproduce:start -->") == 1
    assert "| ddm-k2 | top1 | conditional |" in text and "| ddm-k4 | trajectory | per-row |" in text and "python scripts/reproduce_ddm.py --quick" in text
    # a second run into a used work dir refuses before doing anything
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("error:") and "not empty" in again.stderr
