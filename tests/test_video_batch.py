"""Model-carried settings (video_settings.json) and batch prompt files (plain or JSON lines, seeds, names)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ddm import UsageError
from parallel_infer.batch import Video, check_request
from parallel_infer.model_settings import WAN_DEFAULTS, describe_sources
from parallel_infer.render import VideoSettings
from parallel_infer.tiny import write_tiny_model

torch.set_num_threads(1)
QUICK = Path(__file__).parents[1] / "ddm" / "assets" / "video" / "quick"


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("pixel"), layers=2, prompts=("a cat runs", "a dog jumps", "", "blur"))


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("render_videos", Path(__file__).parents[1] / "scripts" / "render_videos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(model, prompt="a 3 moving right", **settings):
    return check_request(model, VideoSettings(seconds=2, **settings), [Video(prompt, 0, Path("unused.mp4"))], 1)


def test_the_shipped_model_carries_its_settings_and_a_flag_wins():
    carried = json.loads((QUICK / "video_settings.json").read_text())
    r = request(QUICK)
    assert (r.settings.steps, r.settings.block, r.settings.cat, r.settings.cfg) == tuple(carried[k] for k in ("steps", "block", "cat", "cfg"))
    assert r.plan.height == r.plan.width == carried["size"] and r.plan.config.flow_shift == carried["flow_shift"]
    assert set(r.sources.values()) == {str(QUICK / "video_settings.json")}
    r = request(QUICK, steps=3)
    assert r.settings.steps == 3 and r.sources["steps"] == "given"
    assert "settings steps 3 (as given)\nsettings block 4, cat 3" in describe_sources(r.settings, r.sources)


def test_a_wan_folder_without_the_file_falls_back_to_wan_defaults(pixel_model):
    r = request(pixel_model, "a cat runs", height=16, width=16)
    assert r.settings.steps == WAN_DEFAULTS["steps"] and r.settings.block == 8 and r.settings.cat == 4
    assert r.settings.cfg == 5.0 and r.settings.fps == 16 and r.sources["steps"] == "Wan2.1 default"
    assert r.plan.config.sampler == "unipc" and r.sources["sampler"] == "Wan2.1 default"


@pytest.mark.parametrize("scheduler, sampler", [("FlowMatchEulerDiscreteScheduler", "euler"), ("UniPCMultistepScheduler", "unipc")])
def test_a_wan_folders_scheduler_class_names_its_sampler(tmp_path, scheduler, sampler):
    model = write_tiny_model(tmp_path / "m", layers=2)
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler, "shift": 2.0}))
    r = request(model, "a cat runs", height=16, width=16)
    assert r.plan.config.sampler == sampler and r.sources["sampler"] == str(model / "scheduler" / "scheduler_config.json")
    assert request(model, "a cat runs", height=16, width=16, sampler="euler").plan.config.sampler == "euler"


@pytest.mark.parametrize("content, message", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"cfg": "high"}, "cfg must be a number > 0, got 'high'"),
    ({"block": 4, "cat": 4}, "cat 4 must be smaller than block 4"),
    ({"size": [16]}, "size must be a positive integer or [height, width]"),
    ({"stpes": 10}, "unknown key 'stpes'"),
    ({"sampler": "heun"}, "sampler must be one of euler, unipc, got 'heun'"),
])
def test_a_bad_carried_settings_file_is_one_line_before_anything_loads(tmp_path, content, message):
    model = write_tiny_model(tmp_path / "m", layers=2)
    (model / "video_settings.json").write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message.replace("[", r"\[")) as e:
        request(model, "a cat runs")
    assert "video_settings.json" in str(e.value) and "\n" not in str(e.value)


def args_for(model, prompts, out, **change):
    options = {"model": model, "prompts": prompts, "frames": 10, "steps": 2, "block": 4, "cat": 2, "height": 16,
               "width": 16, "out": out, **change}
    return [a for k, v in options.items() for a in (f"--{k}", str(v))]


def test_jsonl_seeds_names_and_per_line_settings(cli, pixel_model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("a cat runs\n"
                       '{"prompt": "a dog jumps", "seed": 7, "negative_prompt": "blur", "seconds": 1, "name": "dog"}\n')
    out = tmp_path / "out"
    assert cli.main(args_for(pixel_model, prompts, out, **{"seeds-per-prompt": 2, "fps": 8})) == 0
    told = capsys.readouterr().out  # where each setting came from: information, so on stdout
    assert "steps 2" in told and "as given" in told and "Wan2.1 default" in told  # cfg and flow shift were not given
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert names == ["a-cat-runs-seed0.mp4", "a-cat-runs-seed1.mp4", "dog-seed7.mp4", "dog-seed8.mp4"]
    dog = json.loads((out / "dog-seed8.json").read_text())
    assert dog["settings"]["negative_prompt"] == "blur" and dog["settings"]["seed"] == 8 and dog["frames_written"] == 8
    assert json.loads((out / "a-cat-runs-seed1.json").read_text())["frames_written"] == 10
    assert cli.main(args_for(pixel_model, prompts, out, **{"seeds-per-prompt": 2, "fps": 8})) == 0
    assert capsys.readouterr().err.count("skip") == 4


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat runs", "sed": 3}', "line 2: unknown key 'sed'"),
    ('{"prompt": "a cat runs", "seed": 1.5}', "line 2: seed must be an integer, got 1.5"),
    ('{"prompt": "a cat runs", "seed": "3"}', 'line 2: seed must be an integer, got "3"'),
    ('{"prompt": "a cat runs", "seconds": true}', "line 2: seconds must be a number, got true"),
    ('{"seed": 3}', 'line 2: needs a non-empty "prompt"'),
    ('{"prompt": "a cat runs",}', "line 2: not valid JSON"),
    ('{"prompt": "a cow"}', "line 2: prompt 'a cow' has no precomputed embedding"),
    ("a dog jumps", "lines 1 and 2 both make a-dog-jumps-seed0.mp4"),
])
def test_every_line_is_checked_before_any_model_loads(cli, pixel_model, tmp_path, capsys, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(f"a dog jumps\n{line}\n")
    assert cli.main(args_for(pixel_model, prompts, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and not (tmp_path / "out").exists()


def test_seeds_per_prompt_zero_is_refused_before_the_model_is_read(cli, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat runs\n")
    assert cli.main(args_for(tmp_path / "no-model", prompts, tmp_path / "out", **{"seeds-per-prompt": 0})) == 2
    assert "--seeds-per-prompt must be >= 1, got 0" in capsys.readouterr().err
