"""Train one island's expert: `ddm train ...` or `accelerate launch [--multi_gpu --num_processes N] -m ddm.training.train ...`.

An island reads only its data set and the partition manifest, and writes only its `--out` directory:
the expert (EMA weights at the top, raw weights in raw/, expert.json), the training state in state/
(see ddm/training/checkpoint.py), metrics.jsonl, and tensorboard logs with `--tensorboard`.

Flow matching as docs/design.md §2: x_t = (1 - σ) x0 + σ ε, target ε - x0, timestep 1000σ, σ from
`--sigma-sampling` shifted by `--flow-shift` (stored in expert.json; the router reads it from there).

`--batch-size` is the GLOBAL batch of one optimizer step: it is split evenly across the processes and the
`--grad-accum` micro-steps, so a run means the same thing on 1 or 8 processes. The data order and its position
are in ddm/data/stream.py. Noise, σ and label dropout come from a generator seeded by (seed, step, rank,
micro-step), so resuming needs no generator state and each rank draws its own noise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm import OneLineParser, UsageError, command_args, run_reporting_usage_errors
from ddm.data.stream import STREAM_NOISE, StreamSampler, derive_seed
from ddm.flow import FlowConfig, add_noise, to_timestep, velocity_target
from ddm.io import atomic_write_bytes
from ddm.models.experts import write_expert
from ddm.partition.manifest import Manifest
from ddm.training.checkpoint import (
    STATE_DIR, capture_rng, config_difference, diverged, find_state, load_state, read_state_meta, restore_rng, save_state,
)
from ddm.training.modality import MODALITIES, get_modality


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="partition manifest directory (read only)")
    p.add_argument("--island", required=True, help="island index 0..K-1, or 'all' for the monolith")
    p.add_argument("--out", required=True, help="expert folder, the only place this run writes: new, empty, or an expert ddm wrote (resumed)")
    p.add_argument("--modality", default="image", help=f"one of {', '.join(MODALITIES)}")
    p.add_argument("--preset", default="small", help="model size preset (tiny, small, base)")
    p.add_argument("--steps", type=int, default=2000, help="total optimizer steps (may be raised on resume)")
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch per optimizer step, over all processes and accumulation steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the EMA weights that sampling uses")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null label (classifier-free guidance)")
    p.add_argument("--flow-shift", type=float, default=1.0, help="SD3 shift of the training sigmas")
    p.add_argument("--sigma-sampling", default="logit_normal", choices=["logit_normal", "uniform"], help="distribution of the training sigmas")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate mixed precision")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the data order, noise and label dropout")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between training-state checkpoints")
    p.add_argument("--log-every", type=int, default=20, help="steps between metrics.jsonl lines")
    p.add_argument("--resume", action="store_true", help="require a training state in --out (one is resumed anyway when present)")
    p.add_argument("--tensorboard", action="store_true", help="also log to tensorboard (needs the tensorboard package)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    for name in MODALITIES:
        get_modality(name).add_arguments(p.add_argument_group(f"{name} modality"))


def parse_island(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"island {value!r} is not an integer index or 'all'") from None


def check_out_dir(out: Path, resume_required: bool) -> Path | None:
    """The training state to resume from, or None for a fresh run; refuses a folder that is not an expert's."""
    from ddm.io import check_owned, read_owner

    state = find_state(out) if out.is_dir() else None
    if state is None or read_owner(out) is not None:  # else trained before ddm marked its folders: the state says it is ours
        check_owned(out, "expert", writable=False)  # taking the lock inside it showed that it can be written
    if state is None and resume_required:
        raise UsageError(f"--resume given but {out} holds no training state")
    return state


def check_numbers(args) -> None:
    from ddm.checks import check_range, check_seed

    for flag, value, bounds in [
        ("--steps", args.steps, dict(low=1)),
        ("--batch-size", args.batch_size, dict(low=1)),
        ("--grad-accum", args.grad_accum, dict(low=1)),
        ("--lr", args.lr, dict(above=0)),
        ("--weight-decay", args.weight_decay, dict(low=0)),
        ("--warmup-steps", args.warmup_steps, dict(low=0)),
        ("--grad-clip", args.grad_clip, dict(low=0)),
        ("--ema-decay", args.ema_decay, dict(low=0, below=1)),
        ("--label-dropout", args.label_dropout, dict(low=0, below=1)),
        ("--flow-shift", args.flow_shift, dict(above=0)),
        ("--checkpoint-every", args.checkpoint_every, dict(low=1)),
        ("--log-every", args.log_every, dict(low=1)),
        ("--workers", args.workers, dict(low=0)),
    ]:
        check_range(flag, value, **bounds)
    check_seed(args.seed)


def weights_digest(state_dict: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines past the resumed step (and a line torn by a kill), so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    atomic_write_bytes(path, "".join(kept).encode())


def run(args: argparse.Namespace) -> int:
    """Train under an exclusive lock on --out (taken by the first process), so two runs never share a folder."""
    from ddm.io import output_lock

    with output_lock(Path(args.out)) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        return train_under_lock(args)


def train_under_lock(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Everything a user can get wrong is checked before the model is built or anything is written.
    island = parse_island(args.island)
    check_numbers(args)
    flow = FlowConfig(shift=args.flow_shift, sigma_sampling=args.sigma_sampling)
    manifest = Manifest.load(args.manifest)
    indices = manifest.island_indices(island)
    if len(indices) == 0:
        raise UsageError(f"island {island} of {args.manifest} has no samples")
    modality_cls = get_modality(args.modality)
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    out = Path(args.out)
    state_path = check_out_dir(out, args.resume)
    AcceleratorState._reset_state()  # a fresh precision setting for each run of this process (tests, scripts)
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `accelerate launch --multi_gpu` run gloo processes on CPU
            mixed_precision=args.mixed_precision,
            log_with="tensorboard" if args.tensorboard else None,
            project_dir=out,
        )
    except ValueError as e:
        raise UsageError(f"--mixed-precision {args.mixed_precision}: {e}") from None
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % (world * args.grad_accum):
        raise UsageError(
            f"--batch-size {args.batch_size} does not split evenly over {world} processes x {args.grad_accum} accumulation steps"
        )
    micro = args.batch_size // (world * args.grad_accum)
    modality = modality_cls(manifest, args)
    config = json.loads(json.dumps({
        "modality": args.modality,
        **modality.config(args.preset),
        "island": island,
        "manifest_fingerprint": manifest.fingerprint,
        "flow": flow.to_dict(),
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "world_size": world,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip,
        "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout,
        "mixed_precision": args.mixed_precision,
        "seed": args.seed,
    }))
    if state_path is not None:
        diff = config_difference(read_state_meta(state_path)["config"], config)
        if diff:
            raise UsageError(f"cannot resume {state_path}: it was trained with another config: {'; '.join(diff)}")

    # Build (identically on every rank), then restore the state if there is one.
    torch.manual_seed(args.seed)
    net = modality.build(args.preset)
    ema = copy.deepcopy(net).float().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start_step, wall_before, state = 0, 0.0, None
    if state_path is not None:
        state = load_state(state_path, rank)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        start_step, wall_before = state["step"], state["wall_time"]
    accelerator.wait_for_everyone()  # every rank has read the state before the main process tidies --out
    if accelerator.is_main_process:
        from ddm.io import mark_owned, read_owner

        if read_owner(out) is None:
            mark_owned(out, "expert")  # before anything else lands in --out
        if state_path is not None and state_path.name != STATE_DIR:  # a kill between atomic_replace_dir's renames
            os.replace(state_path, out / STATE_DIR)  # put it back, so the next checkpoint keeps it until replaced
        for leftover in out.glob(".*.staging"):  # a checkpoint a kill interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in out.glob(".*.tmp"):  # a file write a kill interrupted
            leftover.unlink()
        trim_metrics(out / "metrics.jsonl", start_step)
    net, optimizer = accelerator.prepare(net, optimizer)
    ema.to(accelerator.device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state["scaler"]:
            accelerator.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
    if args.tensorboard:
        accelerator.init_trackers("train", config={k: str(v) for k, v in config.items()})

    loader = torch.utils.data.DataLoader(
        modality.dataset(indices),
        batch_sampler=StreamSampler(len(indices), args.seed, args.batch_size, micro, args.grad_accum, rank, start_step, args.steps),
        num_workers=args.workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    trainer = IslandTrainer(args, accelerator, modality, net, ema, optimizer, flow, config)
    meta = {
        **modality.expert_meta(),
        "modality": args.modality,
        "preset": args.preset,
        "island": island,
        "k": manifest.k,
        "manifest_fingerprint": manifest.fingerprint,
        "data": manifest.data,
        "data_fingerprint": manifest.data_fingerprint,
        "num_samples": len(indices),
        "flow": flow.to_dict(),
        "label_dropout": args.label_dropout,
        "train_config": config,
    }
    trainer.train(loader, start_step, wall_before, out, meta)
    return 0


class IslandTrainer:
    def __init__(self, args, accelerator, modality, net, ema, optimizer, flow, config):
        self.args, self.accelerator, self.modality = args, accelerator, modality
        self.net, self.ema, self.optimizer, self.flow, self.config = net, ema, optimizer, flow, config
        self.unwrapped = accelerator.unwrap_model(net)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.ema_params = [p for p, q in zip(ema.parameters(), self.unwrapped.parameters()) if q.requires_grad]

    def lr_at(self, step: int) -> float:
        return self.args.lr * min(1.0, (step + 1) / self.args.warmup_steps) if self.args.warmup_steps else self.args.lr

    def micro_step_loss(self, batch, step: int, micro_step: int) -> torch.Tensor:
        device = self.accelerator.device
        x0, cond = self.modality.training_pair(batch, device)
        g = torch.Generator(device=device).manual_seed(
            derive_seed(self.args.seed, STREAM_NOISE, step, self.accelerator.process_index, micro_step)
        )
        noise = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
        sigma = self.flow.sample_sigmas(len(x0), generator=g, device=device)
        drop = torch.rand(len(x0), generator=g, device=device) < self.args.label_dropout
        cond = self.modality.drop_condition(cond, drop)
        pred = self.net(add_noise(x0, noise, sigma), to_timestep(sigma), cond)
        return F.mse_loss(pred.float(), velocity_target(x0, noise).float())

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.args.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights
        torch._foreach_lerp_(self.ema_params, [p.detach().float() for p in self.params], 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.unwrapped.buffers()):
            b_ema.copy_(b)

    def train(self, loader, start_step: int, wall_before: float, out: Path, meta: dict) -> None:
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        bar = tqdm(total=args.steps, initial=start_step, disable=not acc.is_main_process, desc=f"island {meta['island']}", dynamic_ncols=True)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=acc.device)
        norm_sum = torch.zeros((), device=acc.device)
        interval_start, interval_steps = time.perf_counter(), 0
        batches = iter(loader)
        for step in range(start_step, args.steps):
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for a in range(args.grad_accum):
                sync = a == args.grad_accum - 1
                with contextlib.nullcontext() if sync else acc.no_sync(self.net):
                    loss = self.micro_step_loss(next(batches), step, a)
                    acc.backward(loss / args.grad_accum)
                loss_sum += loss.detach() / args.grad_accum
            norm = acc.clip_grad_norm_(self.net.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
            norm_sum += norm.detach().float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.update_ema(step)
            interval_steps += 1
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                mean_loss = acc.reduce(loss_sum, reduction="mean").item() / interval_steps
                if not math.isfinite(mean_loss):
                    raise diverged(out, done, f"mean loss {mean_loss}")
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": norm_sum.item() / interval_steps,
                    "samples_per_s": interval_steps * args.batch_size / (now - interval_start),
                    "wall_time": wall_before + now - t0,
                }
                if acc.is_main_process:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                if args.tensorboard:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=done)
                loss_sum.zero_(), norm_sum.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            if done % args.checkpoint_every == 0 or done == args.steps:
                self.checkpoint(out, done, wall_before + time.perf_counter() - t0, meta)
        bar.close()
        if start_step >= args.steps and not (out / "expert.json").is_file():  # killed between state and view
            self.write_expert_view(out, start_step, meta)
        if args.tensorboard:
            acc.end_training()
        acc.wait_for_everyone()

    def checkpoint(self, out: Path, step: int, wall_time: float, meta: dict) -> None:
        from accelerate.utils import gather_object


        acc = self.accelerator
        if not self.weights_finite():  # the replicas are equal, so every rank stops here together
            raise diverged(out, step, "the weights are not finite")
        rank_rngs = gather_object([capture_rng()])
        digests = gather_object([weights_digest(self.unwrapped.state_dict())])
        if acc.is_main_process:
            save_state(
                out,
                step=step,
                samples_seen=step * self.args.batch_size,
                wall_time=wall_time,
                config=self.config,
                model_state=self.unwrapped.state_dict(),
                ema_state=self.ema.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                rank_rngs=rank_rngs,
                scaler_state=acc.scaler.state_dict() if acc.scaler is not None else None,
            )
            self.write_expert_view(out, step, {**meta, "replica_digests": digests})
        acc.wait_for_everyone()

    def weights_finite(self) -> bool:
        return bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all())

    def write_expert_view(self, out: Path, step: int, meta: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        meta = {**meta, "step": step, "steps": self.args.steps, "complete": step >= self.args.steps}
        (out / "expert.json").unlink(missing_ok=True)  # back last, once the whole view below is written
        self.modality.save_extras(self.ema, out)
        self.modality.save_extras(self.unwrapped, out / "raw")
        write_expert(out, self.ema.denoiser, self.unwrapped.denoiser, meta)


def train_island(**options) -> Path:
    """Python API of `ddm train`: the same options as keyword arguments (`manifest=..., island=0, out=...`), the same
    defaults and checks, in this process (use `accelerate launch -m ddm.training.train` for several). Returns the
    expert directory."""
    args = command_args(add_arguments, **options)
    run(args)
    return Path(args.out)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m ddm.training.train", description="Train one island's expert.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_reporting_usage_errors(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
