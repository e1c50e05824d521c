"""The demo's last stage: one HTML page (outputs/demo/index.html) showing what every earlier stage produced.

It only reads what the stages wrote (manifest, metrics.jsonl, router_metrics.json, grid.json, eval and video
JSON) and draws one figure of the training curves; every number on the page comes from those files.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

import torch


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def loss_figure(ctx: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    runs = [(f"island {k}", d) for k, d in enumerate(ctx["experts"])] + [("monolith", ctx["monolith"])]
    for name, directory in runs:
        rows = read_jsonl(directory / "metrics.jsonl")
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=2 if name == "monolith" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(header: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    return f"<table><tr>{cells('th', header)}</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</table>"


def islands_section(ctx: dict) -> str:
    from ddm.partition.manifest import Manifest

    manifest = Manifest.load(ctx["manifest"])
    labels = manifest.load_dataset().labels
    rows = []
    for k in range(manifest.k):
        counts = torch.bincount(labels[manifest.assignments == k], minlength=10)
        top = counts.argsort(descending=True)[:3].tolist()
        rows.append([k, manifest.sizes[k], ", ".join(f"{d} ({counts[d] / counts.sum():.0%})" for d in top)])
    return (
        f"<h2>1. Islands</h2><p>{manifest.method} on {manifest.extractor} features split the {len(labels)} digits "
        f"into {manifest.k} islands. Each expert trained on its island alone; the monolith trained on everything with "
        f"a {manifest.k}&times; larger batch (equal total training FLOPs).</p>"
        + table(["island", "samples", "most common digits"], rows)
        + '<p><img src="training.png" alt="training curves"></p>'
    )


def router_section(ctx: dict) -> str:
    metrics = json.loads((ctx["router"] / "router_metrics.json").read_text())
    rows = [[f"[{b['sigma'][0]:.1f}, {b['sigma'][1]:.1f})", f"{b['accuracy']:.3f}"] for b in metrics["buckets"]]
    rows.append(["prior: the largest island", f"{metrics['prior_accuracy']:.3f}"])
    if "prior_accuracy_given_class" in metrics:
        rows.append(["prior given the class", f"{metrics['prior_accuracy_given_class']:.3f}"])
    return (
        "<h2>2. Router</h2><p>The router learns which island a noisy sample came from, on the experts' own noise "
        "path, given the class the sampler asks for. It is surest at low noise and falls towards what the class alone "
        "tells as &sigma; &rarr; 1.</p>"
        + table(["noise level σ", "top-1 accuracy"], rows)
    )


def samples_section(ctx: dict) -> str:
    stats = json.loads((ctx["out"] / "grid.json").read_text())
    k = stats["num_experts"]
    final = torch.tensor([s["experts"][-1] for s in stats["samples"]])
    share = torch.bincount(final, minlength=k).tolist()
    fid_rows = [[name, f"{m['fid']:.1f}", f"{m['accuracy']:.3f}", m["num_samples"]] for name, m in ctx["fid"].items()]
    return (
        f"<h2>3. Samples through the ensemble</h2><p>{len(stats['samples'])} samples, one column per class (0&ndash;9), "
        f"{ctx['sample_steps']} flow-matching Euler steps, CFG {stats['cfg']}, routing "
        f"<code>{html.escape(stats['strategy'])}</code>: each step runs the one expert the router picks per sample. "
        f"Samples that ended on each expert: {', '.join(f'expert {i}: {n}' for i, n in enumerate(share))} "
        "(per-step routing in <code>grid.json</code>).</p>"
        '<p><img src="grid.png" alt="sample grid" class="pixel"></p>'
        + table(["model", "FID (held-out digits)", "classifier accuracy", "samples"], fid_rows)
        + "<p>FID uses the features of a small digit classifier and the fixed held-out 20% of the digits "
        "(docs/ddm.md); lower is better. Small settings: compare the two lines, not with the paper.</p>"
    )


STRIP = 12  # frames per row of the frame strip


def motion_figure(video: Path, scores: dict, fps: int, out: Path) -> None:
    """Two rows of consecutive frames (the video's first and last STRIP), an arrow on each frame from the digit's
    ink centroid to where it is one frame later, and the motion score per tenth of the video below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.motion import track_digits
    from evaluation.video_metrics import load_frames

    frames = load_frames(video, None)
    positions, _ = track_digits(frames, 1)
    fig = plt.figure(figsize=(12, 4.6), dpi=100)
    grid = fig.add_gridspec(3, STRIP, height_ratios=[1, 1, 1.5], hspace=0.35)
    for row, first in enumerate((0, len(frames) - STRIP - 1)):
        for col in range(STRIP):
            t = first + col
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(frames[t].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            (x0, y0), (x1, y1) = positions[t, 0].tolist(), positions[t + 1, 0].tolist()
            if not any(map(math.isnan, (x0, y0, x1, y1))):
                ax.annotate("", (x0 + 2 * (x1 - x0), y0 + 2 * (y1 - y0)), (x0, y0),
                            arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1.6))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{t / fps:.2f}s" if col % 3 == 0 else "", fontsize=7)
        fig.text(0.09, 0.80 - 0.255 * row, "start" if row == 0 else "end", rotation=90, fontsize=9, ha="center")
    ax = fig.add_subplot(grid[2, :])
    curve = scores["motion_curve"]
    seconds = len(frames) / fps
    ax.bar([(i + 0.5) * seconds / len(curve) for i in range(len(curve))], curve, width=0.8 * seconds / len(curve),
           color="tab:orange")
    ax.axhline(scores["motion"], color="k", lw=1, ls="--", label=f"whole video {scores['motion']:.2f}")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, seconds)
    ax.set_xlabel("seconds into the video")
    ax.set_ylabel("motion score")
    ax.set_title("motion score per tenth of the video (share of frames where the digit moves as prompted)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def video_section(ctx: dict) -> str:
    record, scores = ctx["video_record"], ctx["video_scores"]
    settings = record["settings"]
    seconds = record["frames_written"] / settings["fps"]
    motion_figure(ctx["video"], scores, settings["fps"], ctx["out"] / "motion.png")
    rows = [
        ["frames", f"{record['frames_written']} ({seconds:.0f} s at {settings['fps']} fps, {settings['height']}×{settings['width']} px)"],
        ["layout", f"block {settings['block']}, context {settings['cat']}, {settings['steps']} steps, CFG {settings['guidance_scale']:g}"],
        ["ranks", record.get("ranks", 2)],
        ["denoise time", f"{record['timings_s']['denoise']:.1f} s"],
        ["bytes between ranks", f"{record['bytes_sent'] / 1e6:.1f} MB"],
        ["motion (share of frames moving as prompted)", f"{scores['motion']:.3f} (first tenth {scores['motion_first10']:.2f}, last {scores['motion_last10']:.2f})"],
        ["speed (median, px per frame)", f"{scores['speed']:.2f} (the training clips: {scores.get('expected_speed', 1):g})"],
        ["digit fidelity", f"{scores['fidelity']:.3f}"],
        ["seam score (1 = no seams)", f"{scores['seam']:.2f}"],
        ["drift (first 10% − last 10%)", f"{scores['drift']:+.3f}"],
        ["flicker (real clips)", f"{scores['flicker']:.3f} ({scores['flicker_real']:.3f})"],
    ]
    return (
        f"<h2>4. A long video with DualParal</h2><p>Prompt: <b>{html.escape(settings['prompt'])}</b>. The video "
        "transformer's layers were split over 2 processes; frames were denoised in blocks at staggered noise "
        "levels, each block attending to its neighbour's cached features, and written to the MP4 as they left "
        "the queue. The model is the shipped video expert (<code>ddm/assets/video/quick</code>, trained by the "
        "same island trainer as the experts with <code>--modality video</code>, docs/video.md), rendered with "
        "the settings it carries (<code>video_settings.json</code>).</p>"
        '<p><video src="video.mp4" controls autoplay loop muted class="pixel" width="288"></video></p>'
        "<p>Frame strips of the first and the last frames, each with an arrow to where the digit goes next (drawn "
        "twice as long), and the motion score over the video: a video that stops moving, or only jitters, shows "
        "as a falling curve.</p>"
        '<p><img src="motion.png" alt="frame strips with motion arrows, and the motion curve" style="width:100%"></p>'
        + table(["", ""], rows)
    )


def text_section(ctx: dict) -> str:
    """Prompted digits through the text DDM ensemble beside the text monolith (scripts/demo.py stage_text)."""
    text = ctx["text"]
    stats = json.loads((text["dir"] / "grid.json").read_text())
    prompts = stats["prompts"]
    rows = []
    for i, prompt in enumerate(prompts):
        used = [s["experts"][-1] for s in stats["samples"] if s["prompt"] == i]
        rows.append([prompt, ", ".join(f"expert {e}" for e in sorted(set(used)))])
    score_rows = [[name, f"{m['fid']:.1f}", f"{m['accuracy']:.3f}", m["num_samples"]] for name, m in text["scores"].items()]
    from ddm.partition.manifest import Manifest

    manifest = Manifest.load(text["manifest"])
    labels = manifest.load_dataset().labels
    islands = [[k, manifest.sizes[k], ", ".join(str(d) for d in torch.unique(labels[manifest.assignments == k]).tolist())]
               for k in range(manifest.k)]
    mono = text["dir"] / "grids-monolith"
    side = "".join(
        f'<tr><td>{html.escape(p)}</td><td><img src="text/grids-ensemble/{g.name}" class="pixel small"></td>'
        f'<td><img src="text/grids-monolith/{g.name}" class="pixel small"></td></tr>'
        for p, g in zip(prompts, sorted(mono.glob("*.png")))
    )
    return (
        "<h2>5. Text to image</h2><p>The same digits with generated captions (&ldquo;a handwritten seven&rdquo;, four "
        "phrasings per digit), embedded by the shipped CLIP-style text encoder (<code>ddm/assets/text_encoder_digits</code>). "
        f"The islands are k-means clusters of the caption embeddings ({len(text['experts'])} islands); each expert is a "
        "PixArt transformer cross-attending to the caption, and the router reads the prompt's pooled embedding. "
        f"Below: {stats['samples'].__len__() // len(prompts)} samples per prompt through the top-1 ensemble, one row per "
        f"prompt, CFG {stats['cfg']} against the empty caption.</p>"
        '<p><img src="text/grid.png" alt="prompted grid" class="pixel"></p>'
        + table(["island", "samples", "digits in it"], islands)
        + table(["prompt", "experts that drew it"], rows)
        + table(["model", "FID (held-out digits)", "accuracy of the prompted digit", "samples"], score_rows)
        + "<p>Ensemble and monolith side by side, the same prompts and seed (grids written by <code>ddm eval --grids</code>):</p>"
        + f"<table><tr><th>prompt</th><th>ensemble (top-1)</th><th>monolith</th></tr>{side}</table>"
    )


def stage_page(ctx: dict) -> None:
    out = ctx["out"]
    loss_figure(ctx, out / "training.png")
    body = islands_section(ctx) + router_section(ctx) + samples_section(ctx) + video_section(ctx) + text_section(ctx)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ddm-suite demo</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; line-height: 1.45; color: #222; }}
table {{ border-collapse: collapse; margin: .5rem 0; }} td, th {{ border: 1px solid #ccc; padding: .2rem .6rem; }}
.pixel {{ image-rendering: pixelated; }} img.pixel {{ width: 40rem; max-width: 100%; }} img.pixel.small {{ width: 14rem; }}
</style></head><body>
<h1>ddm-suite demo</h1>
<p><b>What you are looking at.</b> The embedded 8&times;8 digits were split into islands by clustering; one small
diffusion transformer (an <i>expert</i>) trained on each island without ever seeing the others' data, as if each
ran on a different cluster. A router learned to tell, from a noisy image, which island it came from; at sampling
time it sends each sample to one expert per step, so the experts act as one model. Below that, a video diffusion
transformer trained on moving digits renders a minute-long video with DualParal, and the last section does the
same as the first three with prompts instead of classes: text-conditional experts and a router that reads the prompt.</p>
{body}
<p><small>Made by <code>make demo</code> (scripts/demo.py) in {time.perf_counter() - ctx['start']:.0f} s.</small></p>
</body></html>
"""
    from ddm.io import atomic_write_bytes

    atomic_write_bytes(out / "index.html", page.encode())
    print(f"open {out / 'index.html'}")
