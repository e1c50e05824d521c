"""The island trainer as real processes: isolation, exact resume after SIGKILL, and 2-process data parallel.

Every training process runs through LAUNCHER, which records file-system events with a Python audit hook
(`sys.addaudithook`) and can SIGKILL its own process at a chosen event (e.g. while a checkpoint is half
written). The reference run goes beside the killed-and-resumed chain to keep the wall time down.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--island", "1", "--preset", "tiny", "--steps", "30", "--batch-size", "8", "--grad-accum", "2",
         "--checkpoint-every", "10", "--log-every", "5"]
COMPARED = ["state/model.safetensors", "state/ema.safetensors", "state/optimizer.safetensors",
            "diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"]

LAUNCHER = r'''
import os, re, signal, sys

log = open(os.environ["AUDIT_LOG"], "w", buffering=1)
kill_kind, kill_pattern, kill_count = (os.environ.get("KILL_AT") or "||0").split("|")
kill_count, seen = int(kill_count), 0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.mkdir": "write", "os.remove": "write", "os.rmdir": "write", "shutil.rmtree": "write",
               "os.truncate": "write", "os.chmod": "write", "os.symlink": "write", "os.link": "write",
               "os.rename": "rename", "os.listdir": "read", "os.scandir": "read"}

def record(kind, *paths):
    global seen
    line = kind + "\t" + "\t".join(os.path.abspath(os.fsdecode(p)) for p in paths)
    log.write(line + "\n")
    if kind == kill_kind and re.search(kill_pattern, line):
        seen += 1
        if seen == kill_count:
            os.kill(os.getpid(), signal.SIGKILL)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes)):
            record("write" if (any(c in mode for c in "wax+") if mode else flags & WRITE_FLAGS) else "read", path)
    elif event in PATH_EVENTS:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if paths:
            record(PATH_EVENTS[event], *paths)

import shutil
shutil._use_fd_functions = False  # rmtree by full paths, not dir_fd-relative names the hook cannot place
sys.addaudithook(hook)
from ddm.training.train import main
sys.exit(main(sys.argv[1:]))
'''


def env_for(root: Path, tmp: str = "tmp") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HOME=str(root / "home"), HF_HOME=str(root / "home" / "hf"),
               PYTHONPATH=str(REPO), TMPDIR=str(root / tmp))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # set in this process by an import; the child must choose its own
    return env


def start(root: Path, out: Path, log: Path, kill_at: str = "") -> subprocess.Popen:
    env = env_for(root)
    env.update(AUDIT_LOG=str(log), KILL_AT=kill_at)
    return subprocess.Popen(
        [sys.executable, "-P", str(root.parent / "island_launcher.py"), "--manifest", str(root / "manifest"), "--out", str(out), *TRAIN],
        cwd=root.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen, timeout=240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from frontends.cli import main

    root = tmp_path_factory.mktemp("islands")
    for name in ("home", "tmp", "tmp-two-process", "other-island"):
        (root / name).mkdir()
    (root / "other-island" / "expert.json").write_text("{}")  # a decoy the island must not read
    for i in range(32):
        cls = root / "data" / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 10), (7 * i, 250 - 7 * i, 40 + 100 * (i % 2))).save(cls / f"{i:02d}.png")
    assert main(["partition", "--data", str(root / "data"), "--image-size", "8", "--k", "2", "--random", "--out", str(root / "manifest")]) == 0
    (root.parent / "island_launcher.py").write_text(LAUNCHER)  # outside root: reading it is no island's business
    return root


@pytest.fixture(scope="module")
def runs(root, two_process_run):
    """The audited reference run, and beside it one run killed three times at different moments and resumed."""
    reference = start(root, root / "reference", root / "reference.log")
    out, results = root / "killed", {}

    def record(name, proc):
        code, err = finish(proc)
        left = sorted(p.name for p in out.iterdir())
        state = out / ("state" if "state" in left else "state.old")
        results[name] = {"code": code, "err": err, "left": left, "state_step": json.loads((state / "state.json").read_text())["step"]}

    # 1. External SIGKILL as soon as the first checkpoint is on disk: the process is mid-step or mid-write.
    proc = start(root, out, root / "killed-1.log")
    deadline = time.time() + 240
    while not (out / "state" / "state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    record("after-checkpoint", proc)
    # 2. Self-SIGKILL while the next checkpoint's staging dir holds weights but not yet the optimizer.
    record("mid-write", start(root, out, root / "killed-2.log", r"write|staging/\.optimizer\.safetensors\.|1"))
    # 3. Self-SIGKILL between atomic_replace_dir's renames: state/ moved aside to state.old, the new one not in.
    record("mid-replace", start(root, out, root / "killed-3.log", r"rename|\.staging\t.*/state$|1"))
    # 4. Resume to the end.
    results["resumed"] = dict(zip(("code", "err"), finish(start(root, out, root / "killed-4.log"))))
    results["reference"] = dict(zip(("code", "err"), finish(reference)))
    return results


def test_island_reads_only_data_and_manifest_and_writes_only_its_out_dir(root, runs):
    assert runs["reference"]["code"] == 0, runs["reference"]["err"]

    def inside(path, dirs):
        return any(Path(path) == d or Path(path).is_relative_to(d) for d in dirs)

    def violations(lines, out):
        bad = []
        for kind, *paths in lines:
            for p in paths:
                # TMPDIR: torch probes it at import (tempfile.gettempdir); what it leaves there is checked below.
                if kind in ("write", "rename") and not inside(p, [out, root / "tmp"]) and p != os.devnull:
                    bad.append((kind, p))
                elif inside(p, [root]) and not inside(p, [root / "data", root / "manifest", out, root / "tmp"]):
                    bad.append((kind, p))  # e.g. another island, HOME
        return bad

    for log, out in [("reference.log", root / "reference")] + [(f"killed-{i}.log", root / "killed") for i in (1, 2, 3, 4)]:
        lines = [line.split("\t") for line in (root / log).read_text().splitlines()]
        assert violations(lines, out) == [], log
        # The hook really saw the island's I/O (so the check above could fail) ...
        reads = {p for kind, *ps in lines if kind == "read" for p in ps}
        writes = {p for kind, *ps in lines if kind != "read" for p in ps}
        assert str(root / "manifest" / "manifest.json") in reads, log
        assert sum(inside(p, [root / "data"]) for p in reads) >= 16, log  # island 1's images
        assert any(inside(p, [out]) for p in writes), log
        if log == "reference.log":
            assert any(inside(p, [out / "state"]) for p in writes) and str(out / "metrics.jsonl") in writes
    # torch leaves an empty inductor cache folder in TMPDIR when imported; nothing else may remain there.
    left = [(p.name, sorted(p.iterdir())) for p in (root / "tmp").iterdir()]
    assert all(name.startswith("torchinductor_") and not inside_it for name, inside_it in left), left
    # ... and flags what an island must not do.
    decoy, foreign = str(root / "other-island" / "expert.json"), str(root / "manifest" / "x")
    assert violations([["read", decoy], ["write", foreign]], root / "reference") == [("read", decoy), ("write", foreign)]


def test_sigkill_at_any_moment_then_resume_is_bit_identical(root, runs):
    assert runs["reference"]["code"] == 0, runs["reference"]["err"]
    for name in ("after-checkpoint", "mid-write", "mid-replace"):
        run = runs[name]
        assert run["code"] == -signal.SIGKILL, (name, run["err"][-2000:])
        assert 10 <= run["state_step"] < 30, name  # killed after a checkpoint, before the end
    assert any(n.startswith(".state.") and n.endswith(".staging") for n in runs["mid-write"]["left"]), runs["mid-write"]["left"]
    assert "state.old" in runs["mid-replace"]["left"] and "state" not in runs["mid-replace"]["left"], runs["mid-replace"]["left"]
    assert runs["resumed"]["code"] == 0, runs["resumed"]["err"][-2000:]
    ref, out = root / "reference", root / "killed"
    assert f"rename\t{out / 'state.old'}\t{out / 'state'}" in (root / "killed-4.log").read_text()  # state.old put back
    for f in COMPARED:
        a, b = load_file(ref / f), load_file(out / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 30
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != ".ddm-owner.json" or n == "state.old"]  # the mark stays


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(root):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: the trainer picks gloo when there is no GPU.
    Started before the other runs (see `runs`) so that it overlaps them."""
    out = root / "two-process"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "ddm.training.train", "--manifest", str(root / "manifest"), "--island", "all", "--out", str(out),
           "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--log-every", "2", "--checkpoint-every", "2"]
    proc = subprocess.Popen(cmd, cwd=root.parent, env=env_for(root, "tmp-two-process"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def test_two_processes_train_one_expert_with_identical_replicas(two_process_run):
    proc, out = two_process_run
    code, err = finish(proc, timeout=300)
    assert code == 0, err[-3000:]
    meta = json.loads((out / "expert.json").read_text())
    assert meta["train_config"]["world_size"] == 2 and meta["complete"] and meta["num_samples"] == 32
    digests = meta["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    from ddm.training.trainer import weights_digest

    assert weights_digest(load_file(out / "state" / "model.safetensors")) == digests[0]  # the saved weights are those
    from ddm.models.experts import load_expert

    model, _ = load_expert(out)
    assert type(model).__name__ == "DiTTransformer2DModel"
