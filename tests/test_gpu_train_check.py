"""scripts/gpu_train_check.py --tiny: the GPU check's own code (cache, plain loop, `ddm train`, report) on CPU."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_mode_measures_both_loops_and_writes_the_report(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_train_check", REPO / "scripts" / "gpu_train_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--tiny", "--out", str(tmp_path / "check.json")]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    (row,) = result["rows"]
    assert row["preset"] == "tiny" and row["latents"] == "4x8x8" and row["forward_gflops_per_sample"] > 0
    assert row["plain_samples_per_s"] > 0 and row["ours_samples_per_s"] > 0
    # the report rounds the rates to one decimal, so the ratio of the rounded rates is only close to the ratio
    assert abs(row["ratio"] / (row["ours_samples_per_s"] / row["plain_samples_per_s"]) - 1) < 0.02
    assert "| tiny |" in capsys.readouterr().out
