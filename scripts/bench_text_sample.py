"""Text-to-image sampling time per image: one text expert (PixArt) vs the K=4 text ensemble, with the text encoder's
share of the time broken out.

Targets (issue 12): top-1 <= 1.10x one expert on CPU; the text encoder runs once per call on the prompts (counted
with a forward hook), never per step. Experts, router and text encoder are built untrained (timing does not depend
on the weights); the router's head is scaled so that it spreads each batch over all experts, as a trained router
does. Configurations run interleaved, `--repeats` rounds, median per configuration.

    python scripts/bench_text_sample.py   # writes docs/benchmarks/text_sample.json and a section of docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("top1", "trajectory:0.5:top1", "full")


def build(root: Path, args):
    from ddm.data.captions import digit_vocabulary
    from ddm.data.text_encoder import TextEncoder, build_clip_encoder
    from ddm.flow import FlowConfig
    from ddm.models.experts import build_text_expert, load_expert, write_expert
    from router.ensemble import DDMEnsemble
    from router.model import RouterModel

    encoder_dir = build_clip_encoder(root / "encoder", digit_vocabulary(), hidden_size=args.encoder_width,
                                     layers=args.encoder_layers, heads=4, projection_dim=args.encoder_width, max_length=32)
    record = TextEncoder(encoder_dir).record()
    flow = FlowConfig().to_dict()
    for i in range(args.k):
        torch.manual_seed(i)
        model = build_text_expert(args.preset, 8, 1, record["hidden_size"])
        meta = dict(island=i, k=args.k, manifest_fingerprint="bench", flow=flow, num_classes=0, conditioning="text", text_encoder=record)
        write_expert(root / f"e{i}", model, model, meta)
    torch.manual_seed(100)
    router = RouterModel(num_experts=args.k, sample_size=8, in_channels=1, flow=flow, manifest_fingerprint="bench", hidden_dim=32,
                         num_layers=2, text_dim=record["pooled_size"], text_encoder_hash=record["hash"])
    with torch.no_grad():
        router.head.weight.mul_(30.0)
    router.save_pretrained(root / "router")
    expert, meta = load_expert(root / "e0")
    experts = [root / f"e{i}" for i in range(args.k)]
    models = {"one expert": expert}
    for strategy in STRATEGIES:
        models[strategy] = DDMEnsemble.from_dirs(root / "router", experts, strategy)
    return models, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", help="expert size")
    p.add_argument("--k", type=int, default=4, help="number of experts")
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts per call")
    p.add_argument("--per-prompt", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=10, help="Euler steps per image")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale (2 rows per image)")
    p.add_argument("--encoder-width", type=int, default=256, help="hidden size of the random CLIP text encoder")
    p.add_argument("--encoder-layers", type=int, default=4, help="layers of the random CLIP text encoder")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="1: on a shared machine, more threads time the contention, not the work")
    p.add_argument("--json", default=str(ROOT / "docs/benchmarks/text_sample.json"), help="results JSON")
    p.add_argument("--fragment", default=str(ROOT / "docs/BENCHMARKS.md"), help="markdown file whose bench-text-sample section is replaced")
    args = p.parse_args(argv)
    from ddm.data.captions import DIGIT_NAMES, DIGIT_PHRASINGS
    from ddm.io import atomic_write_json
    from evaluation.report import update_fragment
    from router.text_pipeline import make_text_pipeline

    torch.set_num_threads(args.threads)
    prompts = [DIGIT_PHRASINGS[i % len(DIGIT_PHRASINGS)].format(name=DIGIT_NAMES[i % 10]) for i in range(args.prompts)]
    images = args.prompts * args.per_prompt
    with tempfile.TemporaryDirectory() as tmp:
        models, meta = build(Path(tmp), args)
        pipes = {name: make_text_pipeline(m, meta) for name, m in models.items()}
        calls = {"n": 0}
        for pipe in pipes.values():
            pipe.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

        def run(pipe, n_prompts, per_prompt, steps):
            calls["n"] = 0
            start = time.perf_counter()
            pipe(prompts[:n_prompts], num_inference_steps=steps, guidance_scale=args.cfg, num_images_per_prompt=per_prompt,
                 generator=torch.Generator().manual_seed(0), output_type="pt")
            return time.perf_counter() - start, pipe.encode_seconds, calls["n"]

        for pipe in pipes.values():  # warm-up
            run(pipe, 2, 1, 2)
        times = {name: [] for name in pipes}
        for _ in range(args.repeats):
            for name, pipe in pipes.items():
                times[name].append(run(pipe, args.prompts, args.per_prompt, args.steps))
    base = statistics.median(t for t, _, _ in times["one expert"])
    rows = []
    for name, ts in times.items():
        total = statistics.median(t for t, _, _ in ts)
        encode = statistics.median(e for _, e, _ in ts)
        rows.append({"config": name, "ms_per_image": 1000 * total / images, "encoder_ms_per_image": 1000 * encode / images,
                     "denoise_ms_per_image": 1000 * (total - encode) / images, "vs_one_expert": total / base,
                     "encoder_calls_per_generation": max(c for _, _, c in ts), "seconds_all": [t for t, _, _ in ts]})
    command = "python scripts/bench_text_sample.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("json", "fragment") and v != p.get_default(k))
    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {args.threads} thread(s)",
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "fragment")}, "results": rows,
              "targets": {"top1": "<= 1.10x one expert", "encoder": "one call per generation, whatever the steps"}}
    atomic_write_json(Path(args.json), result)
    lines = [
        f"### Text-to-image sampling time per image, K={args.k} ({result['date']})", "",
        f"Command: `{command}` on {result['machine']}, wall clock. PixArt `{args.preset}` experts on 8x8x1, a random CLIP "
        f"text encoder ({args.encoder_layers} layers x {args.encoder_width}, 32 tokens), {args.prompts} prompts x "
        f"{args.per_prompt} images per call, {args.steps} Euler steps, CFG {args.cfg} (2 rows per image), median of "
        f"{args.repeats} interleaved rounds. The encoder runs once per call, on the prompts and their negative prompts.", "",
        "| configuration | ms / image | of which text encoder | denoising | x one expert | encoder calls per generation | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['ms_per_image']:.2f} | {r['encoder_ms_per_image']:.3f} | {r['denoise_ms_per_image']:.2f} | "
                     f"{r['vs_one_expert']:.2f} | {r['encoder_calls_per_generation']} | {result['targets'].get(r['config'], '')} |")
    text = "\n".join(lines) + "\n"
    update_fragment(Path(args.fragment), "bench-text-sample", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
