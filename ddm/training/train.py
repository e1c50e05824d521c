"""Train one island's expert: `ddm train ...` or `accelerate launch [--config_file configs/accelerate/X.yaml] -m
ddm.training.train ...` (DDP, or FSDP with `--fsdp` or an FSDP accelerate config).

An island reads only its data set and the partition manifest, and writes only its `--out` directory:
the expert (EMA weights at the top, raw weights in raw/, expert.json), the training state in state/
(see ddm/training/checkpoint.py), metrics.jsonl, and tensorboard logs with `--tensorboard`.

Flow matching as docs/design.md §2: x_t = (1 - σ) x0 + σ ε, target ε - x0, timestep 1000σ, σ from
`--sigma-sampling` shifted by `--flow-shift` (stored in expert.json; the router reads it from there).

`--batch-size` is the GLOBAL batch of one optimizer step: it is split evenly across the processes and the
`--grad-accum` micro-steps, so a run means the same thing on 1 or 8 processes. The data order and its position
are in ddm/data/stream.py; noise, σ and label dropout are drawn per step for the whole global batch
(ddm/training/trainer.py), so resuming needs no generator state, even on another number of processes.
This module checks the arguments and sets the run up; the loop is ddm/training/trainer.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ddm import OneLineParser, UsageError, command_args, run_reporting_usage_errors
from ddm.data.stream import StreamSampler
from ddm.flow import FlowConfig
from ddm.io import atomic_write_bytes
from ddm.training.checkpoint import STATE_DIR, find_state
from ddm.training.init_weights import InitWeights
from ddm.training.modality import MODALITIES, get_modality

LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # diffusers get_scheduler names

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="partition manifest directory (read only)")
    p.add_argument("--island", required=True, help="island index 0..K-1, or 'all' for the monolith")
    p.add_argument("--out", required=True, help="expert folder, the only place this run writes: new, empty, or an expert ddm wrote (resumed)")
    p.add_argument("--modality", default="image", help=f"one of {', '.join(MODALITIES)}")
    p.add_argument("--preset", default="small", help="model size: tiny, small, base, or DiT-S|B|L|XL/2|4|8 (the DiT paper's; for --modality text DiT-XL/2 is PixArt-α's 611M XL/2)")
    p.add_argument("--steps", type=int, default=2000, help="total optimizer steps (may be raised on resume)")
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch per optimizer step, over all processes and accumulation steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup from 0")
    p.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES), help="after the warmup (cosine: to 0 at --steps)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the EMA weights that sampling uses")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null label, or of the empty caption for --modality text (classifier-free guidance)")
    p.add_argument("--flow-shift", type=float, default=1.0, help="SD3 shift of the training sigmas")
    p.add_argument("--sigma-sampling", default="logit_normal", choices=["logit_normal", "uniform"], help="distribution of the training sigmas")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"], help="auto: bf16 on a GPU that has it, else no")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the processes (FSDP2 FULL_SHARD; also on with an FSDP accelerate config)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the data order, noise and label dropout")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between training-state checkpoints")
    p.add_argument("--log-every", type=int, default=20, help="steps between metrics.jsonl lines")
    p.add_argument("--init-from", type=Path, help="start from this expert's EMA weights (a fine-tune; optimizer, schedule and step start fresh)")
    p.add_argument("--resume", action="store_true", help="require a training state in --out (one is resumed anyway when present)")
    p.add_argument("--tensorboard", action="store_true", help="also log to tensorboard (needs the tensorboard package)")
    p.add_argument("--workers", type=int, default=None, help="data loader worker processes (default: on a GPU, up to 8 per process for data decoded per item; else 0)")
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
        if value is not None or flag != "--workers":  # --workers None: chosen by the device
            check_range(flag, value, **bounds)
    check_seed(args.seed)


def resolve_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def check_compile() -> None:
    """Refuse --compile before any work where torch.compile cannot run (no dynamo, no Triton, no C++ compiler)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UsageError(f"--compile: torch {torch.__version__} cannot compile on Python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError("--compile: torch finds no Triton for this GPU (pip install triton)")
        return
    from torch._inductor import config, exc
    from torch._inductor.cpp_builder import cpp_compiler_search

    try:
        cpp_compiler_search(tuple(c for c in config.cpp.cxx if c))
    except exc.InvalidCxxCompiler:
        raise UsageError(f"--compile: torch finds no C++ compiler for CPU code (tried {', '.join(c for c in config.cpp.cxx if c)})") from None


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all parameters; CUDA, and CPU in recent torch) where torch has it."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def sharding_requested(fsdp_flag: bool) -> bool:
    """--fsdp, or an FSDP accelerate config (accelerate turns one into plain DDP on CPU; the environment flag
    `accelerate launch` sets still says what was asked for)."""
    return fsdp_flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def keep_batch(batch):
    """collate_fn for data sets that return whole batches (`returns_batches`)."""
    return batch


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
    from diffusers.optimization import get_scheduler

    from ddm.partition.manifest import Manifest
    from ddm.training.checkpoint import config_difference, load_state, read_state_meta, restore_rng
    from ddm.training.trainer import IslandTrainer

    # Everything a user can get wrong is checked before the model is built or anything is written.
    island = parse_island(args.island)
    check_numbers(args)
    flow = FlowConfig(shift=args.flow_shift, sigma_sampling=args.sigma_sampling)
    manifest = Manifest.load(args.manifest)
    indices = manifest.island_indices(island)
    if len(indices) == 0:
        raise UsageError(f"island {island} of {args.manifest} has no samples")
    modality_cls = get_modality(args.modality)
    if args.modality != "text" and (args.text_encoder or args.allow_empty_captions):
        raise UsageError(f"--text-encoder / --allow-empty-captions go with --modality text, not --modality {args.modality}")
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    precision = resolve_precision(args.mixed_precision)
    sharded = sharding_requested(args.fsdp)
    if sharded and precision == "fp16":
        raise UsageError("--mixed-precision fp16 with FSDP: use bf16 (fp16 needs a sharded grad scaler)")
    if args.compile:
        check_compile()
    out = Path(args.out)
    state_path = check_out_dir(out, args.resume)
    init = InitWeights(args.init_from, args.modality) if args.init_from else None
    AcceleratorState._reset_state()  # a fresh precision setting for each run of this process (tests, scripts)
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `accelerate launch --multi_gpu` run gloo processes on CPU
            mixed_precision=precision,
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
        "sharded": sharded,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        **({"steps": args.steps} if args.lr_schedule == "cosine" else {}),  # the cosine ends at --steps
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip,
        "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout,
        "mixed_precision": precision,
        "seed": args.seed,
        **({"init_from": init.digests} if init else {}),
    }))
    if state_path is not None:
        saved = read_state_meta(state_path)["config"]
        saved.setdefault("lr_schedule", "constant")  # the one schedule before --lr-schedule existed
        if saved.get("batch_size") != args.batch_size:
            raise UsageError(f"--batch-size {args.batch_size} would change the data order of {state_path} (trained with global batch {saved.get('batch_size')})")
        diff = config_difference(saved, config)
        if diff:
            raise UsageError(f"cannot resume {state_path}: it was trained with another config: {'; '.join(diff)}")

    # Build (identically on every rank), then restore the state if there is one.
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    net = modality.build(args.preset)
    if init is not None:
        init.load_into(net)
    num_parameters, flops = describe(net, args.preset, accelerator.is_main_process)
    if args.gradient_checkpointing:
        net.denoiser.enable_gradient_checkpointing()
    ema = copy.deepcopy(net).float().requires_grad_(False)
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
        tidy_out_dir(out, state_path, start_step)
    if args.compile:  # block by block: state-dict names stay, and FSDP units are blocks too
        for block in net.denoiser.transformer_blocks if hasattr(net.denoiser, "transformer_blocks") else net.denoiser.blocks:
            block.compile()
    if sharded:
        from ddm.training.sharding import load_optimizer_state, shard

        net.to(accelerator.device), ema.to(accelerator.device)
        shard(net), shard(ema)
    optimizer = adamw(net.parameters(), args.lr, args.weight_decay)
    # made before the optimizer state is loaded: it sets the learning rate of step 0, which the state overrides
    scheduler = get_scheduler(LR_SCHEDULES[args.lr_schedule], optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)
    if not sharded:
        net, optimizer = accelerator.prepare(net, optimizer)
        ema.to(accelerator.device)
    if state is not None:
        if sharded:
            load_optimizer_state(net, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state["scaler"]:
            accelerator.scaler.load_state_dict(state["scaler"])
        # a checkpoint from before --lr-schedule has no scheduler state: its constant schedule resumes at its step
        scheduler.load_state_dict(state.get("scheduler") or {**scheduler.state_dict(), "last_epoch": start_step, "_step_count": start_step + 1})
        if state["rng"] is not None:
            restore_rng(state["rng"])
    if args.tensorboard:
        accelerator.init_trackers("train", config={k: str(v) for k, v in config.items()})

    sampler = StreamSampler(len(indices), args.seed, args.batch_size, micro, args.grad_accum, rank, start_step, args.steps)
    loader = make_loader(modality.dataset(indices), sampler, args.workers, accelerator.device)
    trainer = IslandTrainer(args, accelerator, modality, net, ema, optimizer, scheduler, flow, config, micro, sharded)
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
        "num_parameters": num_parameters,
        "forward_flops": flops,
        "flow": flow.to_dict(),
        "label_dropout": args.label_dropout,
        "train_config": config,
        **({"init_from": init.provenance()} if init else {}),
    }
    trainer.train(loader, start_step, wall_before, out, meta)
    return 0


def make_loader(dataset, sampler: StreamSampler, workers: int | None, device: torch.device) -> torch.utils.data.DataLoader:
    """Whole batches straight from data sets that return them; worker processes by default for data decoded per
    item on a GPU machine (on CPU they would take the cores the step uses)."""
    batched = getattr(dataset, "returns_batches", False)
    if workers is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = 0 if batched or device.type != "cuda" else min(8, max(1, (os.cpu_count() or 1) // local_processes - 1))
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=keep_batch if batched else None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )


def describe(net, preset: str, show: bool) -> tuple[int, int | None]:
    """Parameter count and forward FLOPs per sample (DiT experts), printed by the main process."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    from ddm.models.experts import forward_flops

    count = sum(p.numel() for p in net.parameters())
    flops = None
    if isinstance(net.denoiser, (DiTTransformer2DModel, PixArtTransformer2DModel)):
        c = net.denoiser.config
        flops = forward_flops(net.denoiser, (c.in_channels, c.sample_size, c.sample_size), getattr(net, "text_length", 16))
    if show:
        print(f"model {preset}: {count / 1e6:.2f}M parameters" + (f", {flops / 1e9:.3f} forward GFLOPs per sample" if flops else ""))
    return count, flops


def tidy_out_dir(out: Path, state_path: Path | None, start_step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if state_path is not None and state_path.name != STATE_DIR:  # a kill between atomic_replace_dir's renames
        os.replace(state_path, out / STATE_DIR)  # put it back, so the next checkpoint keeps it until replaced
    for leftover in out.glob(".*.staging"):  # a checkpoint a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in out.glob(".*.tmp"):  # a file write a kill interrupted
        leftover.unlink()
    trim_metrics(out / "metrics.jsonl", start_step)


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
