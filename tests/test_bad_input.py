"""Every bad input of issue 10 through the real CLI: exit code 2, one line on stderr naming the value, no file touched.

Each case runs `ddm ...` in-process (frontends.cli.main), or scripts/render_videos.py's main for `render ...`,
between two snapshots of every byte (and every folder) under the shared fixtures and the case's own folder:
they must be equal. The cases cover own-your-output (a folder of user files, another kind of artifact, a file
where a folder goes: each survives byte for byte), non-finite and out-of-range numbers, unusable --out paths,
damaged checkpoints and models, configs with wrong types or missing keys, and bad media files.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddm.models.experts import build_dit
from ddm.partition.manifest import Manifest
from frontends.cli import main
from test_router_fixtures import make_expert, make_router

REPO = Path(__file__).resolve().parents[1]
QUICK_VIDEO = REPO / "ddm" / "assets" / "video" / "quick"
TINY = ["--preset", "tiny", "--batch-size", "8", "--checkpoint-every", "1", "--log-every", "1"]
READ_ONLY = "/sys/ddm-test-out"  # refuses new entries even to root, unlike a chmod-ed folder


@pytest.fixture(scope="module")
def render_cli():
    spec = importlib.util.spec_from_file_location("render_videos", REPO / "scripts" / "render_videos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A manifest, two experts and a router that match it, a trained expert with its state, the quick video model,
    a short MP4 with its sidecar, and samples."""
    root = tmp_path_factory.mktemp("world")
    assert main(["partition", "--k", "2", "--random", "--out", str(root / "m")]) == 0
    fingerprint = Manifest.load(root / "m").fingerprint
    for island in (0, 1):
        make_expert(root / f"e{island}", island, 2, fingerprint)
    make_router(root / "router", 2, fingerprint, num_classes=10)
    assert main(["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(root / "trained"), *TINY, "--steps", "2"]) == 0
    shutil.copytree(QUICK_VIDEO, root / "video")
    (root / "prompts.txt").write_text("a 3 moving right\n")
    frames = np.zeros((10, 16, 16, 3), np.uint8)
    writer = imageio_ffmpeg.write_frames(str(root / "clip.mp4"), (16, 16), fps=8, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()
    save_file({"images": torch.rand(4, 1, 8, 8), "labels": torch.arange(4)}, root / "samples.safetensors")
    return root


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# --- what some cases find in their folder before they run --------------------------------------------------

def user_folder(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "todo.md").write_text("- keep me")


def web_project(world, w):  # a folder that happens to hold a manifest.json
    user_folder(w / "site")
    (w / "site" / "manifest.json").write_text('{"name": "my web app"}')
    (w / "site" / "index.html").write_text("<html></html>")


def manifest_with_notes(world, w):  # a real manifest folder plus a file of the user's
    shutil.copytree(world / "m", w / "m")
    (w / "m" / "notes.txt").write_text("why I chose K=2")


def metrics_only(world, w):
    (w / "out").mkdir()
    (w / "out" / "metrics.jsonl").write_text("my own log, not a trainer's\n")


def a_file(world, w):
    (w / "file.txt").write_text("a file, not a folder")


def bad_image_folder(world, w):
    (w / "images" / "0").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(w / "images" / "0" / "good.png")
    (w / "images" / "0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def edited_manifest(edit):
    """A hand-edited manifest (no mark: as a user would build one): manifest.json and tensors after `edit`."""
    def setup(world, w):
        shutil.copytree(world / "m", w / "bad")
        (w / "bad" / ".ddm-owner.json").unlink()
        meta = json.loads((w / "bad" / "manifest.json").read_text())
        tensors = load_file(w / "bad" / "partition.safetensors")
        edit(meta, tensors)
        (w / "bad" / "manifest.json").write_text(json.dumps(meta))
        save_file(tensors, w / "bad" / "partition.safetensors")
    return setup


def damaged_state(damage, keep_mark: bool = True):
    def setup(world, w):
        shutil.copytree(world / "trained", w / "out")
        if not keep_mark:
            (w / "out" / "state" / ".ddm-owner.json").unlink()
        damage(w / "out" / "state")
    return setup


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_of(name, edit=None):
    def setup(world, w):
        shutil.copytree(world / name, w / name)
        if edit:
            edit(w / name)
    return setup


def edit_json(file: str, change):
    def edit(folder: Path):
        data = json.loads((folder / file).read_text())
        change(data)
        (folder / file).write_text(json.dumps(data))
    return edit


def bin_only_expert(world, w):
    """An expert whose weights are a pickle .bin (no safetensors): must be refused, never unpickled."""
    model = build_dit("tiny", 8, 1, 10)
    model.save_pretrained(w / "bin", safe_serialization=False)
    meta = json.loads((world / "e0" / "expert.json").read_text())
    meta.pop("files")
    (w / "bin" / "expert.json").write_text(json.dumps(meta))
    assert (w / "bin" / "diffusion_pytorch_model.bin").is_file()


def samples(images=None, labels=None):
    def setup(world, w):
        save_file({"images": torch.rand(4, 1, 8, 8) if images is None else images,
                   "labels": torch.arange(4) if labels is None else labels}, w / "s.safetensors")
    return setup


def garbage(name: str):
    def setup(world, w):
        (w / name).write_bytes(b"\x00garbage\xff" * 10)
    return setup


def clip_with_sidecar(record):
    def setup(world, w):
        shutil.copy(world / "clip.mp4", w / "clip.mp4")
        (w / "clip.json").write_text(json.dumps({"settings": {"prompt": "a 3"}, **record}))
    return setup


def our_video_folder_with_user_mp4(world, w):
    from ddm.io import mark_owned

    mark_owned(w / "vids", "videos")
    (w / "vids" / "a-3-moving-right-seed0.mp4").write_bytes(b"my own video")


def long_third_prompt(world, w):
    (w / "prompts.txt").write_text("a 3 moving right\na 4 moving left\na 3 moving right and a 4 moving left\n")


def combine(*setups):
    def setup(world, w):
        for s in setups:
            s(world, w)
    return setup


MODELS = ["--router", "{r}/router", "--experts", "{r}/e0", "{r}/e1"]
SAMPLE = ["sample", *MODELS, "--n", "2", "--steps", "1", "--out", "{w}/grid.png"]
TRAIN = ["train", "--manifest", "{r}/m", "--island", "0", *TINY, "--steps", "3", "--out", "{w}/out"]
ROUTER = ["train-router", "--manifest", "{r}/m", "--experts", "{r}/e0", "{r}/e1", "--steps", "2", "--out", "{w}/router"]
PARTITION = ["partition", "--k", "2", "--random", "--out", "{w}/m"]
EVAL = ["eval", "--samples", "{r}/samples.safetensors"]
RENDER = ["render", "--model", "{r}/video", "--prompts", "{r}/prompts.txt", "--frames", "10", "--steps", "1", "--block", "4",
          "--cat", "2", "--cfg", "1", "--out", "{w}/vids"]

CASES = [
    # data loss: writers replace only their own folders and files (item 1-4)
    ("router-out-user-folder", [*ROUTER[:-1], "{w}/router"], "{w}/router", lambda r, w: user_folder(w / "router")),
    ("router-out-expert", [*ROUTER[:-1], "{r}/trained"], "holds a ddm expert (expected", None),
    ("router-out-file", [*ROUTER[:-1], "{w}/file.txt"], "file.txt", a_file),
    ("save-ensemble-user-folder", [*SAMPLE, "--save-ensemble", "{w}/ens"], "{w}/ens", lambda r, w: user_folder(w / "ens")),
    ("save-ensemble-expert", [*SAMPLE, "--save-ensemble", "{r}/trained"], "holds a ddm expert (expected", None),
    ("partition-web-project", [*PARTITION[:-1], "{w}/site"], "{w}/site", web_project),
    ("partition-manifest-plus-notes", PARTITION, "notes.txt", manifest_with_notes),
    ("sample-beside-manifest", [*SAMPLE[:-1], "{w}/m/manifest.png"], "manifest.json", manifest_with_notes),
    ("sample-user-safetensors", SAMPLE, "grid.safetensors", lambda r, w: (w / "grid.safetensors").write_bytes(b"mine")),
    ("render-user-mp4", RENDER, "a-3-moving-right-seed0.mp4", our_video_folder_with_user_mp4),
    ("render-user-folder", RENDER, "{w}/vids", lambda r, w: user_folder(w / "vids")),
    ("train-user-metrics", TRAIN, "{w}/out", metrics_only),
    ("train-out-router", [*TRAIN[:-1], "{r}/router"], "{r}/router", None),
    ("eval-out-user-json", [*EVAL, "--out", "{w}/notes.json"], "notes.json", lambda r, w: (w / "notes.json").write_text("{}")),
    ("eval-video-out-user-json", ["eval-video", "{r}/clip.mp4", "--prompts", "a 3", "--out", "{w}/n.json"], "n.json",
     lambda r, w: (w / "n.json").write_text('{"mine": 1}')),
    # non-finite and out-of-range numbers (item 7), seeds
    *[(f"train{flag}-{value}", [*TRAIN, flag, value], value, None) for flag, value in [
        ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--weight-decay", "inf"), ("--flow-shift", "inf"),
        ("--ema-decay", "nan"), ("--grad-clip", "inf"), ("--label-dropout", "nan"), ("--seed", "-1"),
        ("--seed", "100000000000000000000"), ("--seed", "1e20")]],
    *[(f"router{flag}-{value}", [*ROUTER, flag, value], value, None) for flag, value in [
        ("--lr", "inf"), ("--lr", "0"), ("--lr", "nan"), ("--seed", "-1")]],
    *[(f"sample{flag}-{value}", [*SAMPLE, flag, value], value, None) for flag, value in [
        ("--cfg", "nan"), ("--cfg", "inf"), ("--seed", "-1"), ("--seed", "100000000000000000000"), ("--scale", "100000"),
        ("--classes", "12")]],
    *[(f"partition{flag}-{value}", [*PARTITION, flag, value], value, None) for flag, value in [
        ("--seed", "-1"), ("--seed", "100000000000000000000"), ("--k", "0"), ("--features", "clip-params")]],
    ("eval-cfg-inf", ["eval", "--ensemble", "{r}/e0", "--n", "2", "--cfg", "inf"], "inf", None),
    ("eval-seed", ["eval", "--ensemble", "{r}/e0", "--n", "2", "--seed", "-1"], "-1", None),
    ("eval-nan-samples", ["eval", "--samples", "{w}/s.safetensors"], "non-finite", samples(images=torch.full((4, 1, 8, 8), float("nan")))),
    ("eval-inf-samples", ["eval", "--samples", "{w}/s.safetensors"], "non-finite", samples(images=torch.full((4, 1, 8, 8), float("inf")))),
    ("eval-labels-out-of-range", ["eval", "--samples", "{w}/s.safetensors"], "12", samples(labels=torch.tensor([0, 1, 2, 12]))),
    *[(f"render{flag}-{value}", [*RENDER, flag, value], value, None) for flag, value in [
        ("--timeout", "nan"), ("--timeout", "inf"), ("--cfg", "inf"), ("--seed", "-1")]],
    ("render-seconds-inf", [*RENDER[:5], "--seconds", "inf", *RENDER[7:]], "inf", None),
    ("eval-video-canvas", ["eval-video", "{r}/clip.mp4", "--prompts", "a 3", "--canvas", "100000"], "100000", None),
    # unusable outputs, found before any work (item 12)
    *[(f"{name}-read-only", [*argv[:-1], READ_ONLY + suffix], READ_ONLY, None) for name, argv, suffix in [
        ("train", TRAIN, ""), ("router", ROUTER, ""), ("partition", PARTITION, ""), ("sample", SAMPLE, "/grid.png"),
        ("render", RENDER, "")]],
    ("eval-out-read-only", [*EVAL, "--out", READ_ONLY + "/e.json"], READ_ONLY, None),
    ("eval-video-out-read-only", ["eval-video", "{r}/clip.mp4", "--prompts", "a 3", "--out", READ_ONLY + "/e.json"], READ_ONLY, None),
    *[(f"{name}-parent-is-a-file", [*argv[:-1], "{w}/file.txt/out" + suffix], "file.txt", a_file) for name, argv, suffix in [
        ("train", TRAIN, ""), ("router", ROUTER, ""), ("partition", PARTITION, ""), ("sample", SAMPLE, ".png"),
        ("render", RENDER, "")]],
    ("eval-out-is-a-folder", [*EVAL, "--out", "{w}/dir"], "{w}/dir", lambda r, w: (w / "dir").mkdir()),
    ("train-out-is-a-file", [*TRAIN[:-1], "{w}/file.txt"], "file.txt", a_file),
    ("render-out-is-a-file", [*RENDER[:-1], "{w}/file.txt"], "file.txt", a_file),
    # damaged checkpoints and models (item 6)
    ("state-flipped-byte", TRAIN, "model.safetensors", damaged_state(lambda s: flip_byte(s / "model.safetensors"))),
    ("state-truncated-optimizer", TRAIN, "optimizer.safetensors",
     damaged_state(lambda s: (s / "optimizer.safetensors").write_bytes((s / "optimizer.safetensors").read_bytes()[:1000]))),
    ("state-broken-json", TRAIN, "state.json", damaged_state(lambda s: (s / "state.json").write_text('{"format": "ddm-tr'))),
    ("state-damaged-header-no-checksums", TRAIN, "state", damaged_state(lambda s: flip_byte(s / "ema.safetensors", 3), keep_mark=False)),
    ("state-truncated-no-checksums", TRAIN, "state",
     damaged_state(lambda s: (s / "rng.safetensors").write_bytes((s / "rng.safetensors").read_bytes()[:100]), keep_mark=False)),
    ("expert-flipped-byte", [*SAMPLE[:4], "{w}/e0", *SAMPLE[5:]], "diffusion_pytorch_model.safetensors",
     copy_of("e0", lambda d: flip_byte(d / "diffusion_pytorch_model.safetensors"))),
    ("router-flipped-byte", [*SAMPLE[:2], "{w}/router", *SAMPLE[3:]], "{w}/router",
     lambda r, w: (shutil.copytree(r / "router", w / "router"), flip_byte(w / "router" / "diffusion_pytorch_model.safetensors", 2))),
    ("manifest-flipped-byte", [*TRAIN[:2], "{w}/m", *TRAIN[3:]], "partition.safetensors",
     copy_of("m", lambda d: flip_byte(d / "partition.safetensors"))),
    ("manifest-damaged-mark", [*TRAIN[:2], "{w}/m", *TRAIN[3:]], ".ddm-owner.json",
     copy_of("m", lambda d: (d / ".ddm-owner.json").write_text('{"format": "ddm-owner/1", "kind": "manif'))),
    ("bin-only-expert", [*SAMPLE[:4], "{w}/bin", *SAMPLE[5:]], "{w}/bin", bin_only_expert),
    # configs and manifests with wrong types or missing keys, corrupt images and media
    ("manifest-missing-k", [*TRAIN[:2], "{w}/bad", *TRAIN[3:]], "'k'", edited_manifest(lambda m, t: m.pop("k"))),
    ("manifest-k-string", [*TRAIN[:2], "{w}/bad", *TRAIN[3:]], "k='2'", edited_manifest(lambda m, t: m.update(k="2"))),
    ("manifest-float-assignments", [*TRAIN[:2], "{w}/bad", *TRAIN[3:]], "assignments",
     edited_manifest(lambda m, t: t.update(assignments=t["assignments"].float()))),
    ("manifest-island-beyond-k", [*TRAIN[:2], "{w}/bad", *TRAIN[3:]], "island 5",
     edited_manifest(lambda m, t: t["assignments"].__setitem__(0, 5))),
    ("expert-no-model-class", [*SAMPLE[:4], "{w}/e0", *SAMPLE[5:]], "model_class",
     copy_of("e0", edit_json("expert.json", lambda d: d.pop("model_class")))),
    ("expert-config-wrong-type", [*ROUTER[:4], "{w}/e0", *ROUTER[5:]], "sample_size='8'",
     copy_of("e0", edit_json("config.json", lambda d: d.update(sample_size="8")))),
    ("router-negative-experts", [*SAMPLE[:2], "{w}/router", *SAMPLE[3:]], "num_experts=-2",
     copy_of("router", edit_json("config.json", lambda d: d.update(num_experts=-2)))),
    ("video-config-wrong-type", [*RENDER[:2], "{w}/video", *RENDER[3:]], "num_layers='three'",
     copy_of("video", edit_json("config.json", lambda d: d.update(num_layers="three")))),
    ("video-garbage-prompt-encoder", [*RENDER[:2], "{w}/video", *RENDER[3:]], "prompt_encoder",
     copy_of("video", lambda d: (d / "prompt_encoder" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 9))),
    ("prompt-too-long", [*RENDER[:4], "{w}/prompts.txt", *RENDER[5:]], "has 9 words", long_third_prompt),
    ("partition-corrupt-image", ["partition", "--data", "{w}/images", "--image-size", "8", "--k", "1", "--out", "{w}/m"],
     "bad.png", bad_image_folder),
    ("eval-corrupt-image", ["eval", "--samples", "{w}/images"], "bad.png", bad_image_folder),
    *[(f"eval-video-garbage-{suffix}", ["eval-video", f"{{w}}/v.{suffix}", "--prompts", "a 3"], f"v.{suffix}", garbage(f"v.{suffix}"))
      for suffix in ("mp4", "npy", "safetensors")],
    ("eval-video-truncated-mp4", ["eval-video", "{w}/clip.mp4"], "clip.mp4", clip_with_sidecar({"frames_written": 16})),
    ("eval-video-changed-mp4", ["eval-video", "{w}/clip.mp4"], "clip.mp4", clip_with_sidecar({"sha256": "0" * 64})),
]


@pytest.mark.parametrize("argv, named, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, render_cli, tmp_path, capsys, argv, named, setup):
    if setup is not None:
        setup(world, tmp_path)
    before = snapshot(world), snapshot(tmp_path)
    argv = [a.format(r=world, w=tmp_path) for a in argv]
    capsys.readouterr()
    try:
        code = render_cli(argv[1:]) if argv[0] == "render" else main(argv)
    except SystemExit as e:  # argparse's own errors (a flag that is no integer) exit from inside
        code = e.code
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert named.format(r=world, w=tmp_path) in lines[0], lines[0]
    assert (snapshot(world), snapshot(tmp_path)) == before
    assert not Path(READ_ONLY).exists()
