"""Pipeline folders that diffusers loads: DDMPipeline.save_pretrained → DDMPipeline.from_pretrained and
DiffusionPipeline.from_pretrained(custom_pipeline=...), with the flow shift carried by the scheduler config."""
import json

import pytest
import torch
from diffusers import DiffusionPipeline

import router.pipeline
from ddm import UsageError
from router.pipeline import DDMPipeline, ensemble_pipeline, load_pipeline
from test_router_fixtures import FLOW, make_expert, make_router

SHIFTED = {**FLOW, "shift": 2.5}


def images(pipe, seed=0):
    return pipe(torch.tensor([0, 3, 7]), 4, 1.5, torch.Generator().manual_seed(seed), output_type="pt").images


def test_ensemble_pipeline_folder_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    root = tmp_path / "models"
    fingerprint = "f" * 16
    experts = [make_expert(root / f"island_{i}", i, 3, fingerprint, flow=SHIFTED) for i in range(3)]

    router_dir = make_router(root / "router", 3, fingerprint, flow=SHIFTED, scale=5.0)
    pipe = ensemble_pipeline(router_dir, experts, "top1")
    assert pipe.scheduler.config.shift == 2.5
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDMPipeline"
    assert index["transformer"] == ["router.ensemble", "DDMEnsemble"]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 2.5
    assert not list(folder.rglob("*.bin")), "only safetensors on disk"

    expected = images(pipe)
    for loaded in (
        DDMPipeline.from_pretrained(folder),
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=router.pipeline.__file__, trust_remote_code=True),
        load_pipeline(folder),
    ):
        assert type(loaded).__name__ == "DDMPipeline"
        assert loaded.scheduler.config.shift == 2.5
        assert str(loaded.transformer.strategy) == str(pipe.transformer.strategy)
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(images(loaded), expected, rtol=0, atol=0)

    assert str(load_pipeline(folder, strategy="full").transformer.strategy) == "full"


def test_expert_and_monolith_load_the_same_way(tmp_path):
    expert = make_expert(tmp_path / "monolith", 0, 1, "f" * 16, flow=SHIFTED)
    pipe = load_pipeline(expert)
    assert pipe.scheduler.config.shift == 2.5
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_pipeline(tmp_path / "pipe")
    torch.testing.assert_close(images(again), images(pipe), rtol=0, atol=0)
    with pytest.raises(UsageError, match="needs an ensemble"):
        load_pipeline(tmp_path / "pipe", strategy="full")


def test_not_a_model_directory_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(UsageError, match="not a pipeline folder"):
        load_pipeline(tmp_path / "notes")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UsageError, match="StableDiffusionPipeline"):
        load_pipeline(tmp_path / "other")
