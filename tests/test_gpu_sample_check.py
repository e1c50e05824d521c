"""scripts/gpu_sample_check.py --tiny: the GPU check's code path on a CPU (no GPU is assumed anywhere in the tests)."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_sample_check", ROOT / "scripts/gpu_sample_check.py")
gpu_sample_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_sample_check)


def test_tiny_run_times_every_configuration_and_checks_grouped_against_gather(tmp_path):
    out, fragment = tmp_path / "gpu.json", tmp_path / "bench.md"
    fragment.write_text("# Benchmarks\n\nkept\n")
    assert gpu_sample_check.main(["--tiny", "--batches", "6", "--out", str(out), "--fragment", str(fragment)]) == 0
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["results"]}
    expected = {"one expert", "full (vmap)"} | {f"{s} ({d})" for s in gpu_sample_check.STRATEGIES for d in ("gather", "grouped")}
    assert set(rows) == expected and all(r["batch"] == 6 for r in rows.values())
    assert result["command"] == "python scripts/gpu_sample_check.py --tiny --batches 6"
    assert rows["one expert"]["vs_one_expert"] == 1.0 and all(r["ms"] > 0 for r in rows.values())
    for name, r in rows.items():
        if name.endswith("(grouped)") or name == "full (vmap)":
            assert r["max_abs_diff_vs_gather"] < 1e-4, name
    text = fragment.read_text()
    assert text.startswith("# Benchmarks\n\nkept") and "<!-- cpu-step:start -->" in text and "| tiny | 1x8x8 | 6 | top1 (grouped) |" in text


def test_bad_input_and_no_gpu(capsys):
    assert gpu_sample_check.main(["--tiny", "--batches", "1"]) == 2
    assert "--batches" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_sample_check.main([]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "--tiny" in err and "\n" not in err
