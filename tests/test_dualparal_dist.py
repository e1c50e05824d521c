"""DualParal across real processes: N-rank layer pipelines equal the single-process reference bit for bit, and a
dead or hung rank makes the others exit with a clear error instead of hanging.

Ranks are forked (real processes with their own gloo process group; fork spares each one the ~6 s import
of torch + diffusers that spawn pays); `render_video` spawns its workers, as the app will. One thread per process: a kernel's blocking, hence its float
rounding, may depend on the thread count, so reference and ranks run at the same count.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from parallel_infer.config import DualParalConfig
from parallel_infer.layer_pipeline import PeerFailure, run_layer_pipeline, run_reference
from parallel_infer.tiny import tiny_transformer
from parallel_infer.topology import Topology
from parallel_infer.wan_adapter import WanAdapter

LAYERS = 5  # not divisible by 2 or 3: the split is 3/2 and 2/2/1
SIZE = 8  # latent height = width
CONFIG = DualParalConfig(frames=6 + 4 * 4, steps=4, block=4, cat=2, guidance_scale=4.0, seed=3)


def make_adapter(config: DualParalConfig = CONFIG, model_dir=None, layers=None) -> WanAdapter:
    """The tiny 5-layer transformer, or a model folder's (Wan2.2 A14B: both experts) cut to `layers`."""
    window = config.block + config.cat
    if model_dir is None:
        torch.manual_seed(0)
        return WanAdapter(tiny_transformer(LAYERS), window, config.cat, SIZE, SIZE)
    from parallel_infer.loader import inspect_model, load_model

    model = load_model(inspect_model(model_dir), layers=layers)
    return WanAdapter(model.transformer, window, config.cat, SIZE, SIZE, model.transformer_2, model.boundary_timestep)


def prompt_embeds() -> torch.Tensor:
    return torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))


def _rank(rank, world, store, out, config_dict, timeout, started, topology=None, model_dir=None):
    from parallel_infer.distributed import fail, join_group

    torch.set_num_threads(1)
    config = DualParalConfig(**config_dict)
    try:
        join_group(rank, world, timeout, store)  # a world of one joins no group
        finals = {}

        def on_block(b, latent):  # called on the decode rank, which saves what it received
            finals[str(b)] = latent.clone()
            started.set()

        layers = topology.layers(rank) if topology is not None else None
        adapter = make_adapter(config, model_dir, layers)
        total = run_layer_pipeline(adapter, config, prompt_embeds(), on_block, timeout=timeout, topology=topology)
        if finals:
            save_file({**finals, "bytes": torch.tensor([total])}, out)
    except PeerFailure as e:
        fail(str(e))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def start_ranks(world, tmp_path, config=CONFIG, timeout=60.0, topology=None, name=None, model_dir=None):
    ctx = mp.get_context("fork")
    started = ctx.Event()
    name = name or str(world)
    out = str(tmp_path / f"latents-{name}.safetensors")
    procs = [ctx.Process(target=_rank, args=(r, world, str(tmp_path / f"store-{name}"), out, config.to_dict(), timeout,
                                             started, topology, model_dir)) for r in range(world)]
    for p in procs:
        p.start()
    return procs, out, started


def run_reference_finals(split_batch=False, model_dir=None, config=CONFIG):
    torch.set_num_threads(1)
    finals = {}
    with torch.inference_mode():
        run_reference(make_adapter(config, model_dir), config, prompt_embeds(),
                      lambda b, x: finals.__setitem__(str(b), x.clone()), split_batch=split_batch)
    return finals


@pytest.fixture(scope="module")
def reference():
    return run_reference_finals()


def finished(runs):
    """Join every run's ranks; the decode rank's saved finals per run."""
    got = {}
    for name, (procs, out, _) in runs.items():
        for p in procs:
            p.join(120)
            assert p.exitcode == 0, f"{name}: a rank failed"
        got[name] = load_file(out)
    return got


def test_layer_pipeline_equals_reference_bit_for_bit(reference, tmp_path):
    """Even splits on 1, 2, 3 ranks; uneven splits (as --layer-split or the balance gives them) with the last
    rank decoding; CFG-parallel on 2 and 4 ranks against the reference that splits the batch the same way; a
    Wan2.2 A14B folder (two experts switched at the boundary) on 2 ranks, each loading its slice of both; the UniPC
    sampler (a multistep state per block on rank 0) on 2 ranks."""
    from parallel_infer.tiny import write_tiny_model

    a14b = write_tiny_model(tmp_path / "a14b", layers=LAYERS, layout="a14b", boundary_ratio=0.8)
    placements = {  # name: (world, topology)
        "1": (1, None), "2": (2, None), "3": (3, None),
        "4+1 decode last": (2, Topology((4, 1), decode_on="last")),
        "1+1+3 decode last": (3, Topology((1, 1, 3), decode_on="last")),
        "cfg 2x1": (2, Topology((5,), groups=2)),
        "cfg 2x(3+2) decode last": (4, Topology((3, 2), groups=2, decode_on="last")),
        "a14b 2+3": (2, Topology((2, 3))),
    }
    unipc = DualParalConfig(**{**CONFIG.to_dict(), "sampler": "unipc"})
    runs = {name: start_ranks(world, tmp_path, topology=topology, name=name.replace(" ", "_"),
                              model_dir=a14b if name.startswith("a14b") else None)
            for name, (world, topology) in placements.items()}  # all at once: they share 2 cores
    runs["unipc 2"] = start_ranks(2, tmp_path, config=unipc, name="unipc")
    split_reference = run_reference_finals(split_batch=True)
    a14b_reference = run_reference_finals(model_dir=a14b)
    unipc_reference = run_reference_finals(config=unipc)
    items = CONFIG.num_blocks * CONFIG.steps
    window_tokens = (CONFIG.block + CONFIG.cat) * (SIZE // 2) ** 2
    hidden_bytes = 2 * window_tokens * 24 * 4  # [cond, uncond] x tokens x dim x float32
    block_bytes = 3 * SIZE * SIZE * 4  # one latent frame, float32
    own_frames = CONFIG.steps * (CONFIG.block * (CONFIG.num_blocks - 1) + CONFIG.block + CONFIG.cat)  # over all steps
    video_frames = CONFIG.frames
    got_by_name = finished(runs)
    unipc_got = got_by_name.pop("unipc 2")
    assert all(torch.equal(unipc_got[b], latent) for b, latent in unipc_reference.items())
    assert not torch.equal(unipc_reference["0"], reference["0"])
    for name, got in got_by_name.items():
        world, topology = placements[name]
        expected = split_reference if name.startswith("cfg") else a14b_reference if name.startswith("a14b") else reference
        assert sorted(got) == sorted(expected) + ["bytes"], name
        for b, latent in expected.items():
            assert torch.equal(got[b], latent), f"{name}: block {b} differs"
        if name[0].isdigit():
            # Bytes sent: hidden states of every block-step across each of the world - 1 links, one guided
            # prediction per block-step back to rank 0, and, when another rank decodes, each final block.
            finals = video_frames * block_bytes if name.endswith("decode last") else 0
            preds = own_frames * block_bytes if world > 1 else 0
            assert int(got["bytes"]) == (world - 1) * items * hidden_bytes + preds + finals, name
    for b, latent in reference.items():  # the same maths batched or split, to float rounding
        torch.testing.assert_close(split_reference[b], latent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_lost_rank_makes_the_others_exit_with_a_clear_error(sig, tmp_path, capfd):
    timeout = 3.0
    config = DualParalConfig(frames=6 + 4 * 40, steps=8, block=4, cat=2, guidance_scale=4.0, seed=3)  # long enough to be mid-run
    procs, _, started = start_ranks(3, tmp_path, config, timeout)
    victim, survivors = procs[1], [procs[0], procs[2]]
    try:
        assert started.wait(60), "rank 0 never finished a block"
        os.kill(victim.pid, sig)
        lost = time.monotonic()
        for p in survivors:
            p.join(60)
        waited = time.monotonic() - lost
        assert all(p.exitcode == 1 for p in survivors), [p.exitcode for p in survivors]
    finally:
        victim.kill()
        victim.join()
    err = capfd.readouterr().err
    assert "error: rank 0: no answer from rank" in err and "error: rank 2: no answer from rank 1" in err, err
    print(f"survivors exited {waited:.1f} s after rank 1 was {sig.name}ed (timeout {timeout} s)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_match_one_process(tmp_path):
    """Two torchrun "nodes" on this machine (c10d rendezvous, one process each) render with the render script
    the same video as the script in one process; the last rank, on the second node, decodes and writes it."""
    import subprocess
    import sys
    from pathlib import Path

    import imageio.v3 as iio
    import numpy as np

    from parallel_infer.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "model", layers=3)
    (tmp_path / "p.txt").write_text("a cat runs\n")
    script = str(Path(__file__).parents[1] / "scripts" / "render_videos.py")
    args = [script, "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--frames", "14", "--steps", "3",
            "--block", "4", "--cat", "2", "--height", "16", "--width", "16", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               *args, "--decode-on", "last", "--out", str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out[-2000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_videos", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([*args[1:], "--out", str(tmp_path / "one")]) == 0
    name = "a-cat-runs-seed0"  # <prompt>-seed<seed>, seed 0 by default
    assert np.array_equal(iio.imread(tmp_path / "two" / f"{name}.mp4"), iio.imread(tmp_path / "one" / f"{name}.mp4"))
    sidecar = json.loads((tmp_path / "two" / f"{name}.json").read_text())
    assert sidecar["ranks"] == 2 and sidecar["bytes_sent"] > 0 and sidecar["parallel"]["decode_rank"] == 1
    assert sidecar["frames_written"] == 14


@pytest.fixture(scope="module")
def api_model(tmp_path_factory):
    from parallel_infer.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("api"), layers=3)


API_VIDEO = dict(steps=3, block=4, cat=2, height=16, width=16, threads=1)


def test_render_video_on_two_spawned_ranks_matches_one_process(api_model, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from parallel_infer.api import render_video

    progress = []
    two = render_video(api_model, "a cat runs", tmp_path / "two.mp4", frames=14, ranks=2, **API_VIDEO,
                       progress_callback=lambda done, total: progress.append(done))
    render_video(api_model, "a cat runs", tmp_path / "one.mp4", frames=14, **API_VIDEO)
    assert progress == [1, 2, 3] and two["ranks"] == 2 and two["bytes_sent"] > 0
    assert np.array_equal(iio.imread(tmp_path / "two.mp4"), iio.imread(tmp_path / "one.mp4"))


def test_render_video_raises_when_a_worker_dies(api_model, tmp_path):
    import psutil

    from parallel_infer.api import render_video

    def kill_worker(done, total):
        if done == 1:
            for child in psutil.Process().children():
                if "spawn_main" in " ".join(child.cmdline()):
                    child.kill()

    with pytest.raises(PeerFailure, match="rank 0: no answer from rank 1"):
        render_video(api_model, "a cat runs", tmp_path / "v.mp4", frames=6 + 4 * 30, ranks=2, timeout=5.0,
                     progress_callback=kill_worker, **API_VIDEO)
    assert list(tmp_path.iterdir()) == []  # no partial video under any name
