"""FSDP2 inside an island on 2 CPU processes over gloo (torchrun): sharded for real, bit-exact resume with the same
process count, and a sharded checkpoint resumed by one unsharded process continues the same run."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frontends.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--island", "all", "--preset", "tiny", "--batch-size", "8", "--grad-accum", "2", "--log-every", "2", "--checkpoint-every", "2"]
COMPARED = ["state/model.safetensors", "state/ema.safetensors", "state/optimizer.safetensors", "diffusion_pytorch_model.safetensors"]
LAUNCHER = r"""
import json, shutil, sys
import torch.distributed as dist
import ddm.training.sharding as sharding

plain_shard = sharding.shard

def shard(network):  # report how much of the network this process holds
    plain_shard(network)
    local = sum(p.to_local().numel() for p in network.parameters())
    print(f"SHARD {local} {sum(p.numel() for p in network.parameters())}", flush=True)

sharding.shard = shard
from ddm.training.train import main
for argv in json.loads(sys.argv[1]):  # one process group, several runs (torch starts once)
    if argv[0] == "copy":
        if dist.get_rank() == 0:
            shutil.copytree(argv[1], argv[2])
        dist.barrier()
    elif main(argv):
        sys.exit(2)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes: 4 steps straight; 2 steps, then resumed to 4. One process, unsharded: a copy of the 2-step
    checkpoint resumed to 4."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "launcher.py").write_text(LAUNCHER)
    assert main(["partition", "--k", "2", "--random", "--out", str(root / "manifest")]) == 0
    common = ["--manifest", str(root / "manifest"), "--fsdp", *TRAIN]
    plan = [[*common, "--out", str(root / "resumed"), "--steps", "2"], ["copy", str(root / "resumed"), str(root / "one-process")],
            [*common, "--out", str(root / "resumed"), "--steps", "4"], [*common, "--out", str(root / "straight"), "--steps", "4"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(root / "launcher.py"),
                           json.dumps(plan)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step_2 = load_file(root / "one-process" / "state" / "model.safetensors")
    assert main(["train", "--manifest", str(root / "manifest"), "--out", str(root / "one-process"), "--steps", "4", *TRAIN]) == 0
    return root, done.stdout, step_2


def test_the_model_is_really_sharded(runs):
    _, stdout, _ = runs
    reports = re.findall(r"SHARD (\d+) (\d+)", stdout)
    assert len(reports) == 12  # 3 runs x (network, EMA) x 2 processes
    assert all(int(local) < 0.6 * int(full) for local, full in reports)


def test_sharded_resume_is_bit_exact_and_the_expert_is_whole(runs):
    root, _, _ = runs
    for f in COMPARED:
        a, b = load_file(root / "straight" / f), load_file(root / "resumed" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    meta = json.loads((root / "resumed" / "expert.json").read_text())
    assert meta["complete"] and meta["train_config"]["sharded"] and meta["train_config"]["world_size"] == 2
    from ddm.models.experts import load_expert

    model, _ = load_expert(root / "resumed")
    raw = load_file(root / "resumed" / "state" / "ema.safetensors")
    assert torch.equal(model.proj_out_2.weight, raw["denoiser.proj_out_2.weight"])  # the view holds the gathered EMA
    steps = [json.loads(line)["step"] for line in (root / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_a_sharded_checkpoint_resumes_on_one_unsharded_process(runs):
    """Same samples, noise and optimizer state: only the order of the gradient sums differs."""
    root, _, step_2 = runs
    meta = json.loads((root / "one-process" / "expert.json").read_text())
    assert meta["train_config"]["world_size"] == 1 and not meta["train_config"]["sharded"] and meta["step"] == 4
    for f in ("state/model.safetensors", "state/ema.safetensors"):
        a, b = load_file(root / "straight" / f), load_file(root / "one-process" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), f
    final = load_file(root / "one-process" / "state" / "model.safetensors")
    assert max((final[k] - step_2[k]).abs().max().item() for k in final) > 2e-4  # it did train steps 3 and 4 (lr 3e-4)


def test_a_different_global_batch_is_refused(runs, tmp_path, capsys):
    root, _, _ = runs
    shutil.copytree(root / "straight", tmp_path / "copy")
    code = main(["train", "--manifest", str(root / "manifest"), "--out", str(tmp_path / "copy"), "--steps", "6", *TRAIN, "--batch-size", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "would change the data order" in err and "16" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name, sharded, processes", [("ddp", False, 8), ("fsdp", True, 8), ("two-node", True, 16)])
def test_shipped_accelerate_configs(name, sharded, processes, monkeypatch):
    """What `accelerate launch --config_file` would put in the environment, and whether the trainer then shards."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from ddm.training.train import sharding_requested

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / f"{name}.yaml"), "-m", "ddm.training.train"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.num_processes == processes and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY"):
        if key in env:
            monkeypatch.setenv(key, env[key])
    assert sharding_requested(False) == sharded
    if sharded:
        assert env["FSDP_VERSION"] == "2" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
