"""DualParal on one GPU: block-wise vs full-sequence Wan forwards, and the real render path with the decode on and
off the critical path.

  python scripts/gpu_check.py            Wan2.1-T2V-1.3B shapes, random weights, bf16, 480x832, CFG batch 2
  python scripts/gpu_check.py --tiny     the same code paths on CPU with tiny configs (a smoke test; in the tests)

Forwards: one block-step = one forward of block + cat latent frames that also attends to the cat cached frames of
the next block (the feature cache); a denoising step of the whole video costs num_blocks of them, and its memory
does not depend on the video length. Full-sequence: one forward over all latent frames (what plain Wan or
sequence parallelism runs per step), until it no longer fits. Latency, peak memory, achieved TFLOP/s.
Render: a random-weight Wan2.1-1.3B diffusers folder (transformer, Wan VAE, precomputed prompt embeddings) is
written to a temporary folder and rendered by `render_video` at 77 and 237 frames, 4 steps, block 8, cat 4, with
the decode inline (on the critical path) and in its thread on its own CUDA stream: wall, denoise, decode + write,
the wait after the last step, peak memory. Runs that would start after --budget seconds are skipped.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2))
TINY = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=16,
            freq_dim=16, in_channels=4, out_channels=4, patch_size=(1, 2, 2))


def analytic_flops(model_config: dict, tokens: int, key_tokens: int, text_tokens: int, batch: int) -> float:
    """Multiply-adds x 2 of the transformer blocks, counted from the shapes (embedding and head are negligible)."""
    d = model_config["num_attention_heads"] * model_config["attention_head_dim"]
    per_layer = (
        8 * tokens * d * d  # self-attention q, k, v, out projections
        + 4 * tokens * key_tokens * d  # scores and weighted values
        + 4 * tokens * d * d + 4 * text_tokens * d * d  # cross-attention q, out; k, v on the text
        + 4 * tokens * text_tokens * d
        + 4 * tokens * d * model_config["ffn_dim"]  # feed-forward
    )
    return batch * model_config["num_layers"] * per_layer


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak GiB) after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def exactness_on(device: torch.device, dtype: torch.dtype) -> bool:
    """The one-rank layer pipeline against the reference on this device and dtype (a tiny model): bit for bit."""
    from parallel_infer.config import DualParalConfig
    from parallel_infer.layer_pipeline import run_layer_pipeline, run_reference
    from parallel_infer.tiny import tiny_transformer
    from parallel_infer.wan_adapter import WanAdapter

    config = DualParalConfig(frames=6 + 4 * 4, steps=4, block=4, cat=2, guidance_scale=4.0)
    text = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)).to(device)
    outputs = []
    for run in (run_reference, run_layer_pipeline):
        torch.manual_seed(0)
        adapter = WanAdapter(tiny_transformer(5).to(device, dtype), 6, 2, 8, 8)
        finals = []
        run(adapter, config, text, lambda b, x: finals.append(x.clone()))
        outputs.append(torch.cat(finals, dim=2))
    return torch.equal(*outputs)


def write_random_wan(path, model_config: dict, device: torch.device, tiny: bool):
    """A diffusers Wan folder with random weights: transformer (bf16 on GPU), Wan VAE, two prompt embeddings."""
    from pathlib import Path

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from safetensors.torch import save_file

    from parallel_infer.tiny import write_tiny_model

    if tiny:
        return write_tiny_model(path, layers=model_config["num_layers"], vae=True, prompts=("a cat runs", ""))
    path = Path(path)
    torch.manual_seed(0)
    with torch.device(device):
        WanTransformer3DModel(**model_config).to(torch.bfloat16).save_pretrained(path / "transformer")
        AutoencoderKLWan().save_pretrained(path / "vae")  # diffusers' defaults are the Wan2.1 VAE
    embeds = {str(i): torch.randn(length, model_config["text_dim"]) for i, length in enumerate((26, 1))}
    save_file(embeds, path / "prompt_embeds.safetensors")
    (path / "prompts.json").write_text(json.dumps(["a cat runs", ""]))
    return path


def render_rows(model_config: dict, device: torch.device, tiny: bool, budget: float, started: float) -> list[dict]:
    """The real path: render_video on a random folder, the decode inline and in its thread, two lengths."""
    import tempfile
    from pathlib import Path

    from parallel_infer.api import render_video

    size = dict(height=32, width=32) if tiny else dict(height=480, width=832)
    lengths = (11, 27) if tiny else (77, 237)  # tiny VAE: temporal factor 2
    rows = []
    block, cat = (4, 2) if tiny else (8, 4)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = write_random_wan(Path(tmp) / "wan", model_config, device, tiny)
        # warm-up (CUDA context, cuDNN's choices for the VAE's convolutions), not timed
        render_video(folder, "a cat runs", Path(tmp) / "w.mp4", frames=lengths[0], steps=1, block=block, cat=cat, **size)
        for frames in lengths:
            for decode in ("inline", "thread"):
                name = f"{frames} frames, decode {decode}"
                if time.perf_counter() - started > budget:
                    rows.append({"run": name, "skipped": f"past the {budget:g} s budget"})
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                record = render_video(folder, "a cat runs", Path(tmp) / "v.mp4", frames=frames, steps=4, block=block, cat=cat,
                                      decode=decode, **size)
                t = record["timings_s"]
                wall = t["total"]  # prompt embedding, denoising, and the decode (inline) or the wait for it (thread)
                rows.append({"run": name, "frames": record["frames_written"], "wall_s": wall, "denoise_s": t["denoise"],
                             "decode_write_s": t["decode_write"], "decode_tail_s": t["decode_tail"], "load_s": t["load"],
                             "wall_over_denoise": wall / t["denoise"],
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")})
    return rows


def main(argv: list[str] | None = None) -> None:
    from diffusers import WanTransformer3DModel

    from parallel_infer.config import DualParalConfig
    from parallel_infer.layer_pipeline import Conditioning, forward_window
    from parallel_infer.queue import work_items
    from parallel_infer.wan_adapter import WanAdapter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU: a tiny model through the same code")
    p.add_argument("--block", type=int, default=8, help="latent frames per block")
    p.add_argument("--cat", type=int, default=4, help="context frames")
    p.add_argument("--lengths", type=int, nargs="+", help="latent frames of the full-sequence runs")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--budget", type=float, default=420.0, help="seconds: later render runs are skipped")
    args = p.parse_args(argv)
    started = time.perf_counter()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model_config = TINY if args.tiny else WAN_1_3B
    height, width = (8, 8) if args.tiny else (480 // 8, 832 // 8)  # latent size of 480x832
    text_tokens = 8 if args.tiny else 512
    lengths = args.lengths or ([6, 12, 24] if args.tiny else [21, 41, 81, 121])  # 81..481 video frames
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**model_config, rope_max_seq_len=1024).to(dtype).eval().requires_grad_(False)
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=bf16) keeps them
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    params = sum(x.numel() for x in model.parameters())
    text = torch.randn(2, text_tokens, model_config["text_dim"], device=device, dtype=dtype)
    tokens_per_frame = (height // 2) * (width // 2)
    rows = []

    # Block-wise: one block-step of the middle block of three, in an iteration where all three are queued:
    # it reads the cache the newest block filled and fills it for the oldest (as every block but those two).
    window = args.block + args.cat
    config = DualParalConfig(frames=window + 2 * args.block, steps=50, block=args.block, cat=args.cat)
    adapter = WanAdapter(model, window, args.cat, height, width)
    adapter.install_feature_cache(range(adapter.num_layers))
    cond = Conditioning(adapter, config, text)
    latents = torch.randn(1, model_config["in_channels"], window, height, width, device=device)
    newest, middle, _ = (item for item in work_items(config) if item.iteration == 12)

    @torch.inference_mode()
    def block_step():
        return forward_window(adapter, config, [cond], middle, latents)

    with torch.inference_mode():
        forward_window(adapter, config, [cond], newest, latents)  # fills the cache the middle block reads
    seconds, peak = timed(block_step, device, args.repeats)
    tokens = window * tokens_per_frame
    flops = analytic_flops(model_config, tokens, tokens + args.cat * tokens_per_frame, text_tokens, 2)
    block_row = {"mode": "block-step", "latent_frames": window, "tokens": tokens, "seconds": seconds,
                 "peak_gib": peak, "tflops": flops / seconds / 1e12}
    rows.append(block_row)

    # Full sequence at growing lengths, and what block-wise costs per denoising step of the same video.
    adapter.cache.prepare(middle, enabled=False)  # cache off: the cached processor is then Wan's own attention
    for frames in lengths:
        x = torch.randn(2, model_config["in_channels"], frames, height, width, device=device, dtype=dtype)
        t = torch.full((2,), 500.0, device=device)

        @torch.inference_mode()
        def full():
            return model(x, t, text, return_dict=False)[0]

        blocks = max(1, -(-(frames - window) // args.block) + 1)
        try:
            seconds, peak = timed(full, device, 1 if not args.tiny else args.repeats)
            tokens = frames * tokens_per_frame
            tflops = analytic_flops(model_config, tokens, tokens, text_tokens, 2) / seconds / 1e12
        except torch.OutOfMemoryError:
            seconds, peak, tflops = float("nan"), float("nan"), float("nan")
        x = None  # free the input before the next length (the closure holds it)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"mode": "full-sequence", "latent_frames": frames, "tokens": frames * tokens_per_frame,
                     "seconds": seconds, "peak_gib": peak, "tflops": tflops,
                     "blockwise_step_seconds": blocks * block_row["seconds"], "blockwise_peak_gib": block_row["peak_gib"]})

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny)"
    print(f"{name}; Wan {params / 1e9:.2f}B params, {dtype}, latent {height}x{width}, block {args.block} cat {args.cat}, CFG batch 2")
    print(f"{'mode':<14} {'latent F':>8} {'tokens':>8} {'s/forward':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'blockwise s/step':>17}")
    for r in rows:
        extra = f"{r['blockwise_step_seconds']:>17.3f}" if "blockwise_step_seconds" in r else f"{'':>17}"
        print(f"{r['mode']:<14} {r['latent_frames']:>8} {r['tokens']:>8} {r['seconds']:>10.3f} {r['peak_gib']:>9.2f} {r['tflops']:>8.1f} {extra}")
    exact = exactness_on(device, dtype)
    print(f"layer pipeline (1 rank) == reference on {device.type} {dtype}: {exact}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    renders = render_rows(TINY if args.tiny else WAN_1_3B, device, args.tiny, args.budget, started)
    print(f"render_video, 4 steps: {'run':<28} {'frames':>6} {'wall s':>7} {'denoise s':>9} {'decode+write s':>14} "
          f"{'tail s':>7} {'wall/denoise':>12} {'peak GiB':>8}")
    for r in renders:
        if "skipped" in r:
            print(f"{'':<22}{r['run']:<28} skipped: {r['skipped']}")
            continue
        print(f"{'':<22}{r['run']:<28} {r['frames']:>6} {r['wall_s']:>7.2f} {r['denoise_s']:>9.2f} {r['decode_write_s']:>14.2f} "
              f"{r['decode_tail_s']:>7.2f} {r['wall_over_denoise']:>12.2f} {r['peak_gib']:>8.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "params": params, "rows": rows, "layer_pipeline_equals_reference": exact,
                       "render": renders}, f, indent=2)


if __name__ == "__main__":
    main()
