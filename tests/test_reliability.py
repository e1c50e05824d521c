"""The promises of docs/reliability.md that need more than one bad flag: one writer per output (a lock the OS
drops with its process), writers that replace their own outputs, checksums on load, a training run that
diverges, a full disk, and safetensors only. Bad input through the CLI is in test_bad_input.py."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddm import UsageError
from ddm.models.experts import build_dit, write_expert
from ddm.partition.manifest import Manifest
from frontends.cli import main
from test_router_fixtures import FLOW

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "8", "--checkpoint-every", "1", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A manifest, two trained tiny experts (with their state) and a router trained by the CLI."""
    root = tmp_path_factory.mktemp("rel")
    assert main(["partition", "--k", "2", "--random", "--out", str(root / "m")]) == 0
    for island in (0, 1):
        assert main(["train", "--manifest", str(root / "m"), "--island", str(island), "--out", str(root / f"e{island}"),
                     *TINY, "--steps", "2"]) == 0
    assert main(["train-router", "--manifest", str(root / "m"), "--experts", str(root / "e0"), str(root / "e1"),
                 "--steps", "2", "--width", "16", "--out", str(root / "router")]) == 0
    return root


def one_error_line(capsys) -> str:
    """The error line on stderr (a run that stops mid-way also left its progress bar there)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- one writer at a time -------------------------------------------------------------------------------------

def train_argv(world: Path, out: Path, *options: str) -> list[str]:
    return ["train", "--manifest", str(world / "m"), "--island", "0", *TINY, *options, "--out", str(out)]


def writers(world: Path, out: Path) -> dict[str, list[str]]:
    m, e0, e1 = str(world / "m"), str(world / "e0"), str(world / "e1")
    return {
        "train": train_argv(world, out, "--steps", "1"),
        "train-router": ["train-router", "--manifest", m, "--experts", e0, e1, "--steps", "1", "--out", str(out)],
        "partition": ["partition", "--k", "2", "--random", "--out", str(out)],
        "sample": ["sample", "--router", str(world / "router"), "--experts", e0, e1, "--n", "2", "--steps", "1",
                   "--out", str(out) + ".png"],
    }


@pytest.mark.parametrize("command", ["train", "train-router", "partition", "sample"])
def test_a_second_writer_is_refused_naming_the_holder(world, tmp_path, capsys, command):
    from ddm.io import output_lock

    out = tmp_path / "out"
    argv = writers(world, out)[command]
    target = Path(argv[-1])
    with output_lock(target, folder=command != "sample"):  # as another process would (flock: per open file)
        capsys.readouterr()
        assert main(argv) == 2
        line = one_error_line(capsys)
    assert f"PID {os.getpid()}" in line and str(target) in line
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, and the lock file went with its holder
    assert main(argv) == 0  # released


def test_a_killed_holder_leaves_no_stale_lock(world, tmp_path, capsys):
    """Another process holds --out: `ddm train` names its PID. SIGKILL it: the OS drops the lock with it, so the
    next run starts at once (the lock file it left behind is no lock)."""
    out = tmp_path / "expert"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ddm.io import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(train_argv(world, out, "--steps", "1")) == 2
        assert f"PID {holder.pid}" in one_error_line(capsys)
        assert [p.name for p in out.iterdir()] == [".ddm-lock"]  # the holder's lock file, nothing of ours
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".ddm-lock").exists()  # left by the kill: a file, but no lock
    assert main(train_argv(world, out, "--steps", "1")) == 0
    assert not (out / ".ddm-lock").exists() and (out / "expert.json").is_file()


# --- writers replace their own outputs ------------------------------------------------------------------------

def test_writers_replace_their_own_outputs_and_keep_the_mark(world, tmp_path):
    from ddm.io import read_owner

    m, e0, e1 = str(world / "m"), str(world / "e0"), str(world / "e1")
    runs = [
        ["partition", "--k", "2", "--random", "--out", str(tmp_path / "m")],
        ["train-router", "--manifest", m, "--experts", e0, e1, "--steps", "1", "--width", "16", "--out", str(tmp_path / "router")],
        ["sample", "--router", str(world / "router"), "--experts", e0, e1, "--n", "2", "--steps", "1",
         "--out", str(tmp_path / "grid.png"), "--save-ensemble", str(tmp_path / "ensemble")],
        ["eval", "--samples", str(tmp_path / "grid.safetensors"), "--out", str(tmp_path / "eval.json")],
    ]
    for argv in runs:
        for seed in ("1", "2"):  # the second run replaces what the first wrote
            assert main([*argv, "--seed", seed]) == 0, argv
    assert {read_owner(tmp_path / name)["kind"] for name in ("m", "router", "ensemble")} == {"manifest", "router", "pipeline"}
    assert Manifest.load(tmp_path / "m").seed == 2
    assert json.loads((tmp_path / "grid.json").read_text())["seed"] == 2
    assert json.loads((tmp_path / "eval.json").read_text())["format"] == "ddm-eval/1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no locks or staging left


def test_an_expert_trained_before_folders_were_marked_still_resumes(world, tmp_path):
    from ddm.io import OWNER_FILE, read_owner

    shutil.copytree(world / "e0", tmp_path / "e0")
    (tmp_path / "e0" / OWNER_FILE).unlink()
    assert main(train_argv(world, tmp_path / "e0", "--steps", "3")) == 0
    assert read_owner(tmp_path / "e0")["kind"] == "expert"


# --- checksums ------------------------------------------------------------------------------------------------

def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["router", "ensemble"])
def test_a_flipped_byte_in_a_router_or_ensemble_is_refused_on_load(world, tmp_path, capsys, part):
    e0, e1 = str(world / "e0"), str(world / "e1")
    shutil.copytree(world / "router", tmp_path / "router")
    assert main(["sample", "--router", str(tmp_path / "router"), "--experts", e0, e1, "--n", "2", "--steps", "1",
                 "--out", str(tmp_path / "a.png"), "--save-ensemble", str(tmp_path / "ensemble")]) == 0
    damaged = tmp_path / ("router" if part == "router" else "ensemble/transformer/expert_1") / "diffusion_pytorch_model.safetensors"
    flip_middle_byte(damaged)
    source = ["--router", str(tmp_path / "router"), "--experts", e0, e1] if part == "router" else ["--ensemble", str(tmp_path / "ensemble")]
    capsys.readouterr()
    assert main(["sample", *source, "--n", "2", "--steps", "1", "--out", str(tmp_path / "b.png")]) == 2
    assert "damaged" in (line := one_error_line(capsys)) and "diffusion_pytorch_model.safetensors" in line
    assert not (tmp_path / "b.png").exists()


# --- non-finite numbers ---------------------------------------------------------------------------------------

def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(world, tmp_path, capsys):
    """--lr 1e30 passes the flag checks; the loss turns NaN at step 2. Before: exit 0, a NaN expert marked complete."""
    out = tmp_path / "diverged"
    capsys.readouterr()
    assert main(train_argv(world, out, "--steps", "4", "--lr", "1e30")) == 2
    assert "diverged at step 2" in one_error_line(capsys)
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 1
    expert = json.loads((out / "expert.json").read_text())
    assert expert["step"] == 1 and not expert["complete"]
    assert all(json.loads(line)["step"] == 1 for line in (out / "metrics.jsonl").read_text().splitlines())


def test_a_diverging_router_is_not_saved(world, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train-router", "--manifest", str(world / "m"), "--experts", str(world / "e0"), str(world / "e1"),
                 "--steps", "3", "--lr", "1e30", "--out", str(tmp_path / "router")]) == 2
    assert "diverged" in one_error_line(capsys) and not (tmp_path / "router").exists()


def test_non_finite_samples_are_not_written(world, tmp_path, capsys):
    """An expert whose weights are NaN (its checksums match: it was saved so) makes NaN images: nothing is written."""
    torch.manual_seed(0)
    model = build_dit("tiny", 8, 1, 10)
    with torch.no_grad():
        model.proj_out_2.weight.fill_(float("nan"))
    fingerprint = Manifest.load(world / "m").fingerprint
    for island in (0, 1):
        write_expert(tmp_path / f"nan{island}", model, model, dict(island=island, k=2, manifest_fingerprint=fingerprint,
                                                                   flow=FLOW, num_classes=10))
    capsys.readouterr()
    code = main(["sample", "--router", str(world / "router"), "--experts", str(tmp_path / "nan0"), str(tmp_path / "nan1"),
                 "--n", "2", "--steps", "1", "--cfg", "1", "--out", str(tmp_path / "grid.png")])
    assert code == 2 and "non-finite" in one_error_line(capsys)
    assert not list(tmp_path.glob("grid*"))


# --- a full disk ----------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_leaves_no_staging(tmp_path):
    """Files beyond 4 kB fail to write (RLIMIT_FSIZE, as a full disk does): before, a traceback and a leaked
    staging folder."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    run = subprocess.run([sys.executable, "-m", "frontends.cli", "partition", "--k", "2", "--random", "--out", "m"],
                         cwd=tmp_path, env=ENV, preexec_fn=small_files, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "partition.safetensors" in lines[0] and "too large" in lines[0], run.stderr
    assert list(tmp_path.iterdir()) == []


# --- safetensors only -----------------------------------------------------------------------------------------

def test_pickle_weights_are_refused_by_every_loader(tmp_path):
    """A folder holding only a pickle .bin is never unpickled: router, Wan transformer, video expert's prompt encoder
    (the expert itself: test_bad_input.py's bin-only-expert)."""
    from diffusers import WanTransformer3DModel

    from ddm.models.prompt_encoder import PromptEncoder
    from parallel_infer.loader import inspect_model, load_model
    from parallel_infer.tiny import tiny_transformer, write_tiny_model
    from router.members import load_router
    from router.model import RouterModel

    RouterModel(num_experts=2, sample_size=8, in_channels=1, hidden_dim=16).save_pretrained(tmp_path / "router", safe_serialization=False)
    with pytest.raises(UsageError, match="cannot load router"):
        load_router(tmp_path / "router")

    wan = write_tiny_model(tmp_path / "wan", layers=1, prompts=("a cat",))
    model = WanTransformer3DModel.from_pretrained(wan / "transformer", use_safetensors=True)
    shutil.rmtree(wan / "transformer")
    model.save_pretrained(wan / "transformer", safe_serialization=False)
    with pytest.raises(UsageError, match="cannot load WanTransformer3DModel"):
        load_model(inspect_model(wan))

    expert = tmp_path / "video-expert"
    wan_expert = tiny_transformer(layers=1, channels=1)
    write_expert(expert, wan_expert, wan_expert, {"flow": FLOW, "size": 16, "channels": 1})
    PromptEncoder(vocabulary=["cat"], max_length=2, dim=16).save_pretrained(expert / "prompt_encoder", safe_serialization=False)
    with pytest.raises(UsageError, match="cannot load PromptEncoder"):
        load_model(inspect_model(expert))


def test_an_image_damaged_after_partitioning_stops_training_with_one_line(tmp_path, capsys):
    """The folder's fingerprint (names and sizes) still matches: the damage shows when the trainer reads the image."""
    from PIL import Image

    for i in range(8):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 90, 200 - 20 * i)).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    assert main(["partition", "--data", str(tmp_path / "data"), "--image-size", "8", "--k", "1", "--random",
                 "--out", str(tmp_path / "m")]) == 0
    damaged = tmp_path / "data" / "c1" / "3.png"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    capsys.readouterr()
    assert main(["train", "--manifest", str(tmp_path / "m"), "--island", "0", *TINY, "--steps", "2",
                 "--out", str(tmp_path / "e")]) == 2
    assert "3.png" in one_error_line(capsys) and not (tmp_path / "e" / "expert.json").exists()
