"""The training state of an island: everything a resumed run needs to continue bit-for-bit.

Layout (inside the expert directory, beside the sampling view written by `ddm.models.experts.write_expert`):
  state/state.json               step, samples seen (the data position), wall time, the run's config,
                                 optimizer hyper-parameters, learning-rate scheduler state, grad-scaler and
                                 Python/NumPy RNG scalars
  state/model.safetensors        raw weights of the whole trainable network
  state/ema.safetensors          fp32 EMA weights
  state/optimizer.safetensors    per-parameter optimizer tensors (AdamW moments and step counts)
  state/rng.safetensors          torch (CPU, CUDA) and NumPy RNG states of every rank
  state/.ddm-owner.json          the SHA-256 of each file above (ddm.io), checked before a resume
The directory is written under a staging name and renamed into place, so a SIGKILL at any moment leaves the
previous state whole. `atomic_replace_dir` may leave only `state.old` if killed between its two renames;
`load_state` falls back to it.

Weights and optimizer state are always full (unsharded), whatever the run's sharding (ddm/training/sharding.py),
so a state resumes on another number of processes: the data order and the noise are functions of the step and the
global batch only (ddm/data/stream.py), and `LAYOUT_KEYS` are the config entries that may change on resume.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddm import UsageError
from ddm.io import atomic_save_tensors, atomic_write_json, replaced_dir, replacing_dir, verify_owned

STATE_FORMAT = "ddm-train-state/1"
STATE_DIR = "state"
LAYOUT_KEYS = ("world_size", "grad_accum", "sharded")  # how a global batch is computed, not what it is


def capture_rng() -> dict:
    """This process's global RNG states (the trainer's own noise comes from per-step seeded generators)."""
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_scalars": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    name, pos, has_gauss, cached = rng["numpy_scalars"]
    np.random.set_state((name, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _split_optimizer(state_dict: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(
    out: Path,
    *,
    step: int,
    samples_seen: int,
    wall_time: float,
    config: dict,
    model_state: dict,
    ema_state: dict,
    optimizer_state: dict,
    rank_rngs: list[dict],
    scaler_state: dict | None,
    scheduler_state: dict,
) -> None:
    """Write out/state atomically (staging dir inside `out`, then rename), with the SHA-256 of every file."""
    with replacing_dir(Path(out) / STATE_DIR, "train-state", check_owner=False) as staging:  # out is claimed
        atomic_save_tensors(staging / "model.safetensors", model_state)
        atomic_save_tensors(staging / "ema.safetensors", ema_state)
        opt_tensors, opt_meta = _split_optimizer(optimizer_state)
        atomic_save_tensors(staging / "optimizer.safetensors", opt_tensors)
        rng_tensors = {}
        for rank, rng in enumerate(rank_rngs):
            rng_tensors.update({f"rank{rank}.{k}": v for k, v in rng.items() if torch.is_tensor(v)})
        atomic_save_tensors(staging / "rng.safetensors", rng_tensors)
        atomic_write_json(
            staging / "state.json",
            {
                "format": STATE_FORMAT,
                "step": step,
                "samples_seen": samples_seen,
                "wall_time": wall_time,
                "config": config,
                "optimizer": opt_meta,
                "scaler": scaler_state,
                "scheduler": scheduler_state,
                "rng": [{k: v for k, v in rng.items() if not torch.is_tensor(v)} for rng in rank_rngs],
            },
        )


def find_state(out: Path) -> Path | None:
    state = replaced_dir(Path(out) / STATE_DIR)
    return state if (state / "state.json").is_file() else None


STATE_KEYS = ("step", "samples_seen", "wall_time", "config", "optimizer", "scaler", "rng")


def read_state_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"corrupt training state {path}: state.json: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(f"{path} is not a {STATE_FORMAT} training state (format={found!r})")
    missing = [k for k in STATE_KEYS if k not in meta]
    if missing or not isinstance(meta["step"], int) or not isinstance(meta["config"], dict):
        raise UsageError(f"corrupt training state {path}: state.json lacks or mistypes {', '.join(missing) or 'step/config'}")
    return meta


def load_state(path: Path, rank: int) -> dict:
    """The tensors and scalars `save_state` wrote; `rng` is this rank's (None for a rank the saved run did not have:
    the trainer's own draws do not depend on it). Every file is checked against the SHA-256 recorded when it was
    saved, and any damage is a UsageError naming the file."""
    meta = read_state_meta(path)
    verify_owned(path, "training state")
    try:
        tensors = {name: load_file(path / f"{name}.safetensors") for name in ("model", "ema", "optimizer", "rng")}
        rng = None
        if rank < len(meta["rng"]):
            prefix = f"rank{rank}."
            rng = {k[len(prefix):]: v for k, v in tensors["rng"].items() if k.startswith(prefix)}
            rng.update(meta["rng"][rank])
        optimizer = _join_optimizer(tensors["optimizer"], meta["optimizer"])
    except (OSError, SafetensorError, KeyError, IndexError, TypeError, ValueError) as e:
        raise UsageError(f"corrupt training state {path}: {type(e).__name__}: {e}") from None
    return {**meta, "model": tensors["model"], "ema": tensors["ema"], "optimizer": optimizer, "rng": rng}


def config_difference(saved: dict, current: dict) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(LAYOUT_KEYS))
    return [f"{k}={saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)" for k in keys if saved.get(k) != current.get(k)]


def diverged(out: Path, step: int, what: str) -> UsageError:
    """The error that stops a run whose numbers turned non-finite, before anything more of it is saved."""
    state = find_state(out)
    kept = f"its last checkpoint with finite weights (step {read_state_meta(state)['step']}) stays in {state}" if state else "no checkpoint was saved"
    return UsageError(f"training diverged at step {step}: {what}; stopped, {kept}. Lower --lr or set --grad-clip")
