"""The island's training loop: flow-matching steps, EMA, logging and checkpoints (set up by ddm/training/train.py).

The model is either prepared by accelerate (one process or DDP: accelerate wraps forward in autocast and reduces
gradients) or sharded with FSDP2 (ddm/training/sharding.py: autocast and gradient sync are done here).

Draws: step s of the run uses generators seeded by (seed, stream, s). Each draws the whole GLOBAL batch and the
process keeps its own rows (those of its micro-batch, ddm/data/stream.py), so sample i of a step gets the same noise,
sigma and label dropout on 1 process or 8: a run resumed on another process count continues the same run.
Nothing in a step waits for the device; host syncs happen at the logging interval and at checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm.data.stream import STREAM_LATENT, STREAM_NOISE, derive_seed
from ddm.training.checkpoint import diverged
from ddm.flow import add_noise, to_timestep, velocity_target


def weights_digest(state_dict: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class IslandTrainer:
    def __init__(self, args, accelerator, modality, net, ema, optimizer, scheduler, flow, config, micro: int, sharded: bool):
        self.args, self.accelerator, self.modality = args, accelerator, modality
        self.net, self.ema, self.optimizer, self.scheduler = net, ema, optimizer, scheduler
        self.flow, self.config, self.micro, self.sharded = flow, config, micro, sharded
        self.unwrapped = net if sharded else accelerator.unwrap_model(net)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.ema_params = [p for p, q in zip(ema.parameters(), self.unwrapped.parameters()) if q.requires_grad]
        self.buffer_pairs = list(zip(ema.buffers(), self.unwrapped.buffers()))

    def generator(self, stream: int, step: int) -> torch.Generator:
        device = self.accelerator.device
        return torch.Generator(device=device).manual_seed(derive_seed(self.args.seed, stream, step))

    def micro_step_loss(self, batch, step: int, micro_step: int) -> torch.Tensor:
        acc, device, size = self.accelerator, self.accelerator.device, self.args.batch_size
        first = (micro_step * acc.num_processes + acc.process_index) * self.micro
        rows = slice(first, first + self.micro)

        def sample_normal(shape):
            return torch.randn((size, *shape), generator=self.generator(STREAM_LATENT, step), device=device)[rows]

        x0, cond = self.modality.training_pair(batch, device, sample_normal)
        g = self.generator(STREAM_NOISE, step)
        noise = torch.randn((size, *x0.shape[1:]), generator=g, device=device, dtype=x0.dtype)[rows]
        sigma = self.flow.sample_sigmas(size, generator=g, device=device)[rows]
        drop = (torch.rand(size, generator=g, device=device) < self.args.label_dropout)[rows]
        cond = self.modality.drop_condition(cond, drop)
        with acc.autocast() if self.sharded else contextlib.nullcontext():  # accelerate's prepare autocasts otherwise
            pred = self.net(add_noise(x0, noise, sigma), to_timestep(sigma), cond)
        return F.mse_loss(pred.float(), velocity_target(x0, noise).float())

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self.sharded:
            self.net.set_requires_gradient_sync(sync)
            loss.backward()
            return
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.net):
            self.accelerator.backward(loss)

    def clip_gradients(self) -> torch.Tensor:
        limit = self.args.grad_clip if self.args.grad_clip > 0 else math.inf
        if self.sharded:
            return torch.nn.utils.clip_grad_norm_(self.params, limit).full_tensor()
        if self.accelerator.scaler is not None:  # fp16: clip the true gradients
            self.accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(self.params, limit, foreach=True)  # DDP grads are reduced already

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.args.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights
        if self.sharded:  # shard by shard: both copies are sharded alike
            torch._foreach_lerp_([p.to_local() for p in self.ema_params], [p.to_local() for p in self.params], 1 - decay)
        else:
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)  # both fp32: autocast leaves weights alone
        for b_ema, b in self.buffer_pairs:
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
            lr = self.optimizer.param_groups[0]["lr"]
            for a in range(args.grad_accum):
                loss = self.micro_step_loss(next(batches), step, a)
                self.backward(loss / args.grad_accum, sync=a == args.grad_accum - 1)
                loss_sum += loss.detach() / args.grad_accum
            norm_sum += self.clip_gradients().detach().float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.update_ema(step)
            interval_steps += 1
            bar.update(1)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                self.log(out, done, lr, loss_sum, norm_sum, interval_steps, interval_start, wall_before + time.perf_counter() - t0)
                loss_sum.zero_(), norm_sum.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            if done % args.checkpoint_every == 0 or done == args.steps:
                self.checkpoint(out, done, wall_before + time.perf_counter() - t0, meta)
        bar.close()
        if start_step >= args.steps and not (out / "expert.json").is_file():  # killed between state and view
            self.write_expert_view(out, start_step, meta, *self.full_weights())
        if args.tensorboard:
            acc.end_training()
        acc.wait_for_everyone()

    def log(self, out: Path, done: int, lr: float, loss_sum, norm_sum, interval_steps: int, interval_start: float, wall_time: float) -> None:
        acc = self.accelerator
        mean_loss = acc.reduce(loss_sum, reduction="mean").item() / interval_steps  # the interval's only host syncs
        if not math.isfinite(mean_loss):  # stop, keeping the last checkpoint with finite weights
            raise diverged(out, done, f"mean loss {mean_loss}")
        record = {
            "step": done,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": norm_sum.item() / interval_steps,
            "samples_per_s": interval_steps * self.args.batch_size / (time.perf_counter() - interval_start),
            "wall_time": wall_time,
        }
        if acc.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.args.tensorboard:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=done)

    def full_weights(self) -> tuple[dict, dict]:
        """(raw, EMA) full state dicts; with sharding, gathered to the main process (every rank must call this)."""
        if self.sharded:
            from ddm.training.sharding import full_model_state

            return full_model_state(self.unwrapped), full_model_state(self.ema)
        return self.unwrapped.state_dict(), self.ema.state_dict()

    def checkpoint(self, out: Path, step: int, wall_time: float, meta: dict) -> None:
        from accelerate.utils import gather_object

        from ddm.training.checkpoint import capture_rng, save_state

        acc = self.accelerator
        rank_rngs = gather_object([capture_rng()])
        if not self.weights_finite():  # every rank stops here together; nothing of this step is saved
            raise diverged(out, step, "the weights are not finite")
        raw, ema = self.full_weights()
        if self.sharded:
            from ddm.training.sharding import full_optimizer_state

            optimizer_state = full_optimizer_state(self.unwrapped, self.optimizer)
        else:
            optimizer_state = self.optimizer.state_dict()
            meta = {**meta, "replica_digests": gather_object([weights_digest(raw)])}
        if acc.is_main_process:
            save_state(
                out,
                step=step,
                samples_seen=step * self.args.batch_size,
                wall_time=wall_time,
                config=self.config,
                model_state=raw,
                ema_state=ema,
                optimizer_state=optimizer_state,
                rank_rngs=rank_rngs,
                scaler_state=acc.scaler.state_dict() if acc.scaler is not None else None,
                scheduler_state=self.scheduler.state_dict(),
            )
            self.write_expert_view(out, step, meta, raw, ema)
        acc.wait_for_everyone()

    def weights_finite(self) -> bool:
        """All weights finite, on every process (a checkpoint-time host sync; shards are combined with a reduce)."""
        shards = [getattr(p, "to_local", lambda: p)().detach() for p in self.unwrapped.parameters()]  # FSDP2: local shards
        local = torch.stack([t.isfinite().all() for t in shards if t.numel()]).all().float()
        return bool(self.accelerator.reduce(local, reduction="sum").item() == self.accelerator.num_processes)

    def write_expert_view(self, out: Path, step: int, meta: dict, raw: dict, ema: dict) -> None:
        from ddm.models.experts import write_expert

        if not self.accelerator.is_main_process:
            return
        if self.sharded:  # unsharded twins on the meta device that take the gathered tensors as they are
            with torch.device("meta"):
                ema_net, raw_net = self.modality.build(self.config["preset"]), self.modality.build(self.config["preset"])
            ema_net.load_state_dict(ema, assign=True)
            raw_net.load_state_dict(raw, assign=True)
        else:
            ema_net, raw_net = self.ema, self.unwrapped
        meta = {**meta, "step": step, "steps": self.args.steps, "complete": step >= self.args.steps}
        (out / "expert.json").unlink(missing_ok=True)  # back last, once the whole view below is written
        self.modality.save_extras(ema_net, out)
        self.modality.save_extras(raw_net, out / "raw")
        write_expert(out, ema_net.denoiser, raw_net.denoiser, meta)
