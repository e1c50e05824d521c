"""The DualParal analysis scripts in their fast modes: gpu_check.py --tiny (forwards + the real render path on
CPU) and dualparal_scaling.py --tiny (prediction + a measured N = 1-2 validation), and the scaling model's
pipeline simulation against what it must give by construction."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parents[1] / "scripts"
torch.set_num_threads(1)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scaling():
    return load("dualparal_scaling")


def test_simulation_of_the_schedule(scaling):
    # One stage: every block-step one after the other.
    assert scaling.simulate(5, 4, [0.5]) == pytest.approx(5 * 4 * 0.5)
    # Two equal stages on a long video: close to half the work, never below it; a one-block video cannot overlap
    # (each step waits for the previous one to come back).
    long = scaling.simulate(40, 8, [0.25, 0.25])
    assert 40 * 8 * 0.25 <= long <= 1.05 * 40 * 8 * 0.25
    assert scaling.simulate(1, 4, [0.25, 0.25], link_s=0.1, back_s=0.1) == pytest.approx(4 * (0.5 + 0.1 + 0.1) - 0.1)
    # The slowest stage sets the pace.
    assert scaling.simulate(40, 8, [0.1, 0.4]) >= 40 * 8 * 0.4


def test_scaling_tiny_mode_predicts_and_validates(scaling, tmp_path):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    one, two = (row["dualparal"] for row in result["prediction"]["models"]["1.3B"])
    assert two["latency_s"] < one["latency_s"] and max(two["memory_gib"]) < max(one["memory_gib"])
    assert two["layer_split"][0] <= two["layer_split"][1]  # rank 0 also decodes: it gets no more layers
    rows = result["validation"]["rows"]
    assert [r["ranks"] for r in rows] == [1, 2] and all(math.isfinite(r["error"]) and r["measured_s"] > 0 for r in rows)


def test_gpu_check_tiny_runs_the_forwards_and_the_render_path(tmp_path):
    out = tmp_path / "gpu_check.json"
    load("gpu_check").main(["--tiny", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["layer_pipeline_equals_reference"] is True
    assert [r["frames"] for r in result["render"]] == [11, 11, 27, 27]
    assert all(r["wall_s"] >= r["denoise_s"] > 0 for r in result["render"])
