"""Latent-space DDM: `ddm encode` (cache format, SIGKILL + resume), the latent path end to end, VAE mismatches, bad input.

Everything runs on a tiny random AutoencoderKL (downsampling 2, 4 latent channels) saved to a temp folder, and on
16x16 images, so the latents are 4x8x8.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frontends.cli import main

REPO = Path(__file__).resolve().parents[1]
ENCODE = ["--image-size", "16", "--flip", "--batch-size", "2", "--shard-size", "3", "--workers", "0"]
TRAIN = ["--preset", "tiny", "--steps", "4", "--batch-size", "8", "--log-every", "2", "--checkpoint-every", "4"]


def save_vae(path: Path, seed: int) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=0.1).save_pretrained(path)
    return path


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images in two classes, two different VAEs, a tiny DINOv2, and the images' cache under VAE A."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("latent-world")
    rng = np.random.default_rng(0)
    for i in range(14):
        folder = root / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = np.array([200, 40, 40] if i % 2 else [40, 40, 200])
        Image.fromarray((tint + rng.integers(-40, 40, (18, 20, 3))).clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    save_vae(root / "vae-a", 0)
    save_vae(root / "vae-b", 1)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                             patch_size=8)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "dino")
    assert main(["encode", "--data", str(root / "images"), "--vae", str(root / "vae-a"), "--out", str(root / "lat-a"), *ENCODE]) == 0
    return root


def test_cache_holds_the_encoders_distribution_in_image_order_with_mirrors(world):
    from ddm.data import load_dataset
    from ddm.data.images import ImageFolderDataset
    from ddm.data.vae import encode_moments, load_vae

    data = load_dataset(str(world / "lat-a"))
    index = json.loads((world / "lat-a" / "index.json").read_text())
    assert len(data) == 28 and (data.channels, data.image_size, data.pixel_size) == (4, 8, 16) and data.num_classes == 2
    assert [s["samples"] for s in index["shards"]] == [6, 6, 6, 6, 4] and all(len(s["sha256"]) == 64 for s in index["shards"])
    assert index["vae"]["shift_factor"] == 0.1 and index["vae"]["scaling_factor"] == 0.18215
    images = ImageFolderDataset(world / "images", 16)
    x = torch.stack([images[i][0] for i in range(len(images))])
    vae = load_vae(world / "vae-a")
    mean, std = encode_moments(vae, torch.cat([x, x.flip(-1)]))
    expected_mean = torch.stack(mean.chunk(2), 1).flatten(0, 1).half()
    got_mean, got_std = data.rows(np.arange(28))
    assert torch.allclose(got_mean.float(), expected_mean.float(), atol=2e-3) and got_mean.dtype == torch.float16
    assert torch.allclose(got_std.float(), torch.stack(std.chunk(2), 1).flatten(0, 1).float(), rtol=2e-3, atol=1e-4)
    assert torch.equal(data.labels, images.labels.repeat_interleave(2))
    scattered = [27, 0, 13, 6, 5]  # a batch gathered across shards is the items one by one
    m, s = data.rows(scattered)
    assert all(torch.equal(m[j], data[i][0]) and torch.equal(s[j], data[i][1]) for j, i in enumerate(scattered))
    source = data.source_images()
    assert torch.equal(source[3][0], images[1][0].flip(-1)) and torch.equal(source[2][0], images[1][0])


LAUNCHER = r'''
import os, re, signal, sys
opened = 0
def hook(event, args):  # the 1st open of the third shard's temp file creates it, the 2nd re-opens it written, to fsync
    global opened
    if event == "open" and isinstance(args[0], str) and re.search(r"/\.shard-00002\.safetensors\..*\.tmp$", args[0]):
        opened += 1
        if opened == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # two shards finished, the third written but not renamed into place
sys.addaudithook(hook)
from frontends.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_during_encode_then_rerun_gives_the_identical_cache(world, tmp_path):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    argv = ["encode", "--data", str(world / "images"), "--vae", str(world / "vae-a"), "--out", str(world / "lat-a-killed"), *ENCODE]
    # the same thread count as this process, which encodes the reference and the rerun: float sums follow it
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, str(tmp_path / "launcher.py"), *argv], env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = world / "lat-a-killed"
    left = sorted(p.name for p in out.iterdir())
    assert "index.json" not in left
    assert {"plan.json", "shard-00000.safetensors", "shard-00001.safetensors"} <= set(left) and "shard-00002.safetensors" not in left
    assert any(n.startswith(".shard-00002.safetensors.") for n in left), left  # the half-written one
    code = main(["partition", "--data", str(out), "--k", "2", "--out", str(tmp_path / "m")])
    assert code == 2 and not (tmp_path / "m").exists()  # an incomplete cache is never trusted
    inode = (out / "shard-00000.safetensors").stat().st_ino
    assert main(argv) == 0
    assert (out / "shard-00000.safetensors").stat().st_ino == inode  # a finished shard is kept, not re-encoded
    assert snapshot(out) == snapshot(world / "lat-a")
    before = snapshot(out)
    assert main(argv) == 0 and snapshot(out) == before  # complete: nothing to do


@pytest.fixture(scope="module")
def trained(world):
    """encode (fixture) -> partition on DINOv2 features of the source images -> two experts -> router."""
    root = world
    assert main(["partition", "--data", str(root / "lat-a"), "--k", "2", "--features", str(root / "dino"), "--out", str(root / "m")]) == 0
    experts = []
    for island in (0, 1):
        experts.append(root / f"expert-{island}")
        assert main(["train", "--manifest", str(root / "m"), "--island", str(island), "--out", str(experts[-1]), *TRAIN]) == 0
    assert main(["train-router", "--manifest", str(root / "m"), "--experts", *map(str, experts), "--out", str(root / "router"),
                 "--steps", "20", "--batch-size", "16"]) == 0
    return root, experts


def test_latent_path_end_to_end(trained, tmp_path):
    from ddm.models.experts import read_expert_meta

    root, experts = trained
    manifest = json.loads((root / "m" / "manifest.json").read_text())
    assert manifest["extractor"].startswith("hf:dinov2:") and manifest["extra"]["vae"]["hash"] == manifest["extra"]["vae"]["hash"]
    meta = read_expert_meta(experts[0])
    assert meta["vae"]["path"] == str(root / "vae-a") and meta["channels"] == 4 and meta["image_size"] == 8 and meta["pixel_size"] == 16
    assert meta["num_parameters"] > 0 and meta["forward_flops"] > 0
    grid = tmp_path / "grid.png"
    assert main(["sample", "--router", str(root / "router"), "--experts", *map(str, experts), "--n", "4", "--steps", "3",
                 "--out", str(grid), "--save-ensemble", str(tmp_path / "ens")]) == 0
    from safetensors.torch import load_file

    images = load_file(grid.with_suffix(".safetensors"))["images"]
    assert images.shape == (4, 3, 16, 16) and 0 <= images.min() and images.max() <= 1  # decoded by the VAE
    assert main(["eval", "--data", str(root / "lat-a"), "--ensemble", str(tmp_path / "ens"), "--feature-model", str(root / "dino"),
                 "--n", "4", "--steps", "3", "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_samples"] == 4 and result["num_reference"] == 14 and np.isfinite(result["fid"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_latents_of_another_vae_are_refused_naming_both(trained, tmp_path, capsys):
    root, experts = trained
    from ddm.data.vae import vae_hash

    a, b = vae_hash(root / "vae-a"), vae_hash(root / "vae-b")
    assert main(["encode", "--data", str(root / "images"), "--vae", str(root / "vae-b"), "--out", str(tmp_path / "lat-b"), *ENCODE]) == 0
    assert main(["partition", "--data", str(tmp_path / "lat-b"), "--k", "2", "--features", "latents-pca", "--out", str(tmp_path / "m-b")]) == 0
    capsys.readouterr()
    # router training: experts on A's latents, data B's
    assert main(["train-router", "--manifest", str(tmp_path / "m-b"), "--experts", *map(str, experts), "--out", str(tmp_path / "r")]) == 2
    err = one_line_error(capsys)
    assert a in err and b in err and not (tmp_path / "r").exists()
    # evaluation of A's experts against B's latents
    shutil.copytree(root / "router", tmp_path / "router-b")
    assert main(["eval", "--data", str(tmp_path / "lat-b"), "--ensemble", str(experts[0]), "--feature-model", str(root / "dino"), "--n", "2"]) == 2
    err = one_line_error(capsys)
    assert a in err and b in err
    # a router trained on B's latents with A's experts
    config = json.loads((tmp_path / "router-b" / "config.json").read_text())
    (tmp_path / "router-b" / "config.json").write_text(json.dumps({**config, "vae_hash": b}))
    (tmp_path / "router-b" / ".ddm-owner.json").unlink()  # no checksums to trip over: the VAE check must speak
    assert main(["sample", "--router", str(tmp_path / "router-b"), "--experts", *map(str, experts), "--out", str(tmp_path / "g.png")]) == 2
    err = one_line_error(capsys)
    assert a in err and b in err and not (tmp_path / "g.png").exists()


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(world, trained, tmp_path, capsys, monkeypatch):
    root, _ = trained
    (tmp_path / "no-config").mkdir()
    shutil.copy(root / "vae-a" / "diffusion_pytorch_model.safetensors", tmp_path / "no-config")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(root / "vae-a" / "config.json", tmp_path / "no-weights")
    shutil.copytree(root / "lat-a", tmp_path / "other-encoding")
    encode = ["encode", "--data", str(root / "images"), "--out", str(tmp_path / "lat")]
    cases = [
        (encode + ["--vae", str(tmp_path / "no-config"), "--image-size", "16"], "no-config"),
        (encode + ["--vae", str(tmp_path / "no-weights"), "--image-size", "16"], "no-weights"),
        (encode + ["--vae", str(root / "vae-a"), "--image-size", "15"], "15"),
        (["encode", "--data", str(root / "images"), "--vae", str(root / "vae-a"), "--image-size", "8", "--out", str(tmp_path / "other-encoding")], "image_size=16"),
        (["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(tmp_path / "e"), *TRAIN, "--patch-size", "3"], "patch size 3"),
        (["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(tmp_path / "e"), *TRAIN, "--preset", "DiT-S/4", "--patch-size", "2"], "DiT-S/4"),
    ]
    before = snapshot(tmp_path)
    for argv, named in cases:
        assert main(argv) == 2, argv
        assert named in one_line_error(capsys)
    assert snapshot(tmp_path) == before and not (tmp_path / "lat").exists() and not (tmp_path / "e").exists()
    # --compile where torch cannot compile: here, no C++ compiler for inductor's CPU code
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search

    monkeypatch.setattr(config.cpp, "cxx", (None, "/nonexistent/c++"))
    cpp_compiler_search.cache_clear()
    try:
        assert main(["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(tmp_path / "e"), *TRAIN, "--compile"]) == 2
    finally:
        cpp_compiler_search.cache_clear()
    assert "/nonexistent/c++" in one_line_error(capsys) and not (tmp_path / "e").exists()
