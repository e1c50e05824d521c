"""The island trainer in-process: the expert directory, resume semantics, label dropout, data order, bad input.

Real processes (SIGKILL + exact resume, isolation, 2-process data parallel) are in test_train_processes.py.
"""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from frontends.cli import main
from ddm.data.stream import StreamSampler
from ddm.models.experts import load_expert

TINY = ["--preset", "tiny", "--batch-size", "16", "--log-every", "3", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "m"
    assert main(["partition", "--k", "2", "--random", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(digits_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("expert") / "island-0"
    argv = ["train", "--manifest", str(digits_manifest), "--island", "0", "--out", str(out), *TINY,
            "--steps", "6", "--grad-accum", "2", "--flow-shift", "2", "--sigma-sampling", "uniform"]
    assert main(argv) == 0
    return out, argv


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_expert_directory_is_complete_and_loadable(trained, digits_manifest):
    out, _ = trained
    meta = json.loads((out / "expert.json").read_text())
    assert meta["island"] == 0 and meta["k"] == 2 and meta["num_classes"] == 10 and meta["image_size"] == 8
    assert meta["flow"]["shift"] == 2.0 and meta["flow"]["sigma_sampling"] == "uniform"
    assert meta["manifest_fingerprint"] == json.loads((digits_manifest / "manifest.json").read_text())["fingerprint"]
    assert meta["num_samples"] == json.loads((digits_manifest / "manifest.json").read_text())["sizes"][0]
    assert meta["step"] == meta["steps"] == 6 and meta["complete"] and meta["label_dropout"] == 0.1
    ema, _ = load_expert(out)
    raw, _ = load_expert(out, weights="raw")
    assert type(ema).__name__ == "DiTTransformer2DModel"
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))
    with torch.inference_mode():
        v = ema(torch.randn(3, 1, 8, 8), timestep=torch.tensor([100.0, 500.0, 900.0]), class_labels=torch.tensor([1, 2, 10])).sample
    assert v.shape == (3, 1, 8, 8) and torch.isfinite(v).all()
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["step"] == 6 and state["samples_seen"] == 96
    assert torch.equal(load_file(out / "state" / "model.safetensors")["denoiser.proj_out_2.weight"], raw.proj_out_2.weight)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6]
    assert set(lines[0]) == {"step", "loss", "lr", "grad_norm", "samples_per_s", "wall_time"}
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["samples_per_s"] > 0 for r in lines)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".ddm-owner.json"]  # the mark, no staging left


def test_finished_run_is_not_retrained_and_more_steps_continue_it(trained):
    out, argv = trained
    before = snapshot(out)
    assert main(argv) == 0
    after = snapshot(out)
    for name in ("state/model.safetensors", "state/state.json", "metrics.jsonl", "expert.json", "raw/diffusion_pytorch_model.safetensors"):
        assert after[name] == before[name], name
    (out / "expert.json").unlink()  # as if killed after the last state was saved, before the expert view
    assert main(argv) == 0
    assert json.loads((out / "expert.json").read_text())["complete"]
    assert main([*argv, "--steps", "7"]) == 0
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 7
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [3, 6, 7]


def test_monolith_trains_on_every_sample(digits_manifest, tmp_path):
    out = tmp_path / "monolith"
    assert main(["train", "--manifest", str(digits_manifest), "--island", "all", "--out", str(out), *TINY, "--steps", "1"]) == 0
    assert json.loads((out / "expert.json").read_text())["num_samples"] == 1797


def test_mixed_precision_keeps_fp32_weights_and_does_not_stick_to_the_process(digits_manifest, tmp_path):
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        assert main(["train", "--manifest", str(digits_manifest), "--island", "1", "--out", str(out), *TINY, "--steps", "2",
                     "--mixed-precision", precision]) == 0
        weights = load_file(out / "state" / "ema.safetensors")
        assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
        assert json.loads((out / "expert.json").read_text())["train_config"]["mixed_precision"] == precision


def test_label_dropout_belongs_to_the_trainer(digits_manifest):
    """The diffusers label embedding would drop labels from the global RNG in train mode; ours must not."""
    import argparse

    from ddm.partition.manifest import Manifest
    from ddm.training.modality import get_modality

    modality = get_modality("image")(Manifest.load(digits_manifest), argparse.Namespace(patch_size=2, preset="tiny"))
    net = modality.build("tiny").train()
    x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 500.0), torch.arange(64) % 10
    assert torch.equal(net(x, t, y), net(x, t, y))
    dropped = modality.drop_condition(y, torch.arange(64) % 2 == 0)
    assert dropped[::2].eq(10).all() and torch.equal(dropped[1::2], y[1::2])


def test_global_batch_is_the_same_for_any_process_count():
    n, batch = 50, 12
    one = list(StreamSampler(n, 0, batch, micro=6, grad_accum=2, rank=0, start_step=0, steps=10))
    ranks = [list(StreamSampler(n, 0, batch, micro=3, grad_accum=2, rank=r, start_step=0, steps=10)) for r in (0, 1)]
    for step in range(10):
        single = sorted(one[2 * step] + one[2 * step + 1])
        split = sorted(i for r in ranks for i in r[2 * step] + r[2 * step + 1])
        assert single == split and len(single) == batch
    stream = [i for b in one for i in b]
    assert sorted(stream[:n]) == list(range(n)) and stream[:n] != list(range(n))  # an epoch is a permutation
    resumed = list(StreamSampler(n, 0, batch, micro=6, grad_accum=2, rank=0, start_step=4, steps=10))
    assert resumed == one[8:]


@pytest.fixture(scope="module")
def folder_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for i in range(8):
        (root / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 200 - 20 * i, 90)).save(root / "data" / f"c{i % 2}" / f"{i}.png")
    assert main(["partition", "--data", str(root / "data"), "--image-size", "8", "--k", "2", "--random", "--out", str(root / "m")]) == 0
    return root


@pytest.mark.parametrize("extra, named", [
    (["--island", "2"], "2"),
    (["--island", "first"], "first"),
    (["--manifest", "{tmp}/nowhere"], "nowhere"),
    (["--patch-size", "3"], "3"),
    (["--batch-size", "15", "--grad-accum", "2"], "15"),
    (["--mixed-precision", "no", "--lr", "-1"], "-1"),
    (["--out", "{tmp}/precious"], "precious"),
    (["--resume", "--out", "{tmp}/fresh"], "fresh"),
    (["--modality", "audio"], "audio"),
    (["--preset", "huge"], "huge"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(digits_manifest, tmp_path, capsys, extra, named):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    base = ["train", "--manifest", str(digits_manifest), "--island", "0", "--out", str(tmp_path / "out"), *TINY, "--steps", "2"]
    code = main(base + [a.format(tmp=tmp_path) for a in extra])  # later flags win
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and named in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists() and not (tmp_path / "fresh").exists()


def test_data_changed_since_partition_is_refused(folder_manifest, tmp_path, capsys):
    root = folder_manifest
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "data" / "c0" / "extra.png")
    try:
        code = main(["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(tmp_path / "out"), *TINY, "--steps", "1"])
    finally:
        (root / "data" / "c0" / "extra.png").unlink()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "fingerprint" in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_resuming_another_config_is_refused_and_keeps_the_checkpoint(trained, capsys):
    out, argv = trained
    before = snapshot(out)
    code = main([*argv, "--lr", "0.001"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lr=0.0003 (checkpoint) vs 0.001 (now)" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before


def test_gradient_checkpointing_changes_memory_not_results(digits_manifest, tmp_path):
    runs = []
    for extra in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"run{len(runs)}"
        assert main(["train", "--manifest", str(digits_manifest), "--island", "0", "--out", str(out), *TINY, "--steps", "2", *extra]) == 0
        runs.append(load_file(out / "state" / "model.safetensors"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def kill_after_step_3(argv: list[str], out, monkeypatch) -> None:
    """Run `ddm train` into `out` and kill it after step 3's checkpoint (an exception from the EMA update)."""
    from ddm.training.trainer import IslandTrainer

    plain_update = IslandTrainer.update_ema

    def crash_at_step_3(self, step):
        if step == 3:
            raise RuntimeError("killed")
        plain_update(self, step)

    monkeypatch.setattr(IslandTrainer, "update_ema", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        main([*argv, "--out", str(out)])
    monkeypatch.setattr(IslandTrainer, "update_ema", plain_update)


def test_cosine_schedule_resumes_exactly_and_pins_its_length(digits_manifest, tmp_path, monkeypatch, capsys):
    """A run stopped after its step-3 checkpoint and resumed equals an uninterrupted one: weights and learning rates."""
    argv = ["train", "--manifest", str(digits_manifest), "--island", "0", *TINY, "--steps", "6", "--lr-schedule", "cosine", "--warmup-steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    kill_after_step_3(argv, tmp_path / "resumed", monkeypatch)
    assert json.loads((tmp_path / "resumed" / "state" / "state.json").read_text())["step"] == 3
    assert main([*argv, "--out", str(tmp_path / "resumed")]) == 0
    for f in ("state/model.safetensors", "state/ema.safetensors", "state/optimizer.safetensors"):
        a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / "resumed" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    lrs = [[json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "resumed")]
    # logged: the rates of steps 2 (warmup over: the full rate) and 5 (3/4 of the way down the cosine)
    assert lrs[0] == lrs[1] == pytest.approx([3e-4, 3e-4 * 0.5 * (1 + math.cos(math.pi * 0.75))])
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "resumed"), "--steps", "8"]) == 2
    assert "steps=6 (checkpoint) vs 8 (now)" in capsys.readouterr().err


def test_a_checkpoint_from_before_lr_schedules_resumes_on_the_constant_schedule(digits_manifest, tmp_path, monkeypatch):
    """A state.json written before --lr-schedule existed has neither config["lr_schedule"] nor a scheduler state:
    it resumes (the constant schedule was the only one) and ends where an uninterrupted run ends."""
    from ddm.io import OWNER_FILE

    argv = ["train", "--manifest", str(digits_manifest), "--island", "0", *TINY, "--steps", "6", "--warmup-steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    kill_after_step_3(argv, tmp_path / "old", monkeypatch)
    state = tmp_path / "old" / "state"
    meta = json.loads((state / "state.json").read_text())
    del meta["config"]["lr_schedule"], meta["scheduler"]
    (state / "state.json").write_text(json.dumps(meta))
    (state / OWNER_FILE).unlink()  # such states had no mark with checksums either
    assert main([*argv, "--out", str(tmp_path / "old")]) == 0
    for f in ("state/model.safetensors", "state/optimizer.safetensors"):
        a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / "old" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((tmp_path / "old" / "state" / "state.json").read_text())["config"]["lr_schedule"] == "constant"
