"""The pictures the app shows: sample grids, labelled gallery tiles, cluster sizes, routing weights, loss curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

TILE_BAR = 26  # pixels of a gallery tile's label bar (and of the strip below left for the gallery's caption)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A CxHxW image in [-1, 1] → PIL (L for one channel, RGB for three)."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def tile_grid(images: torch.Tensor) -> Image.Image:
    """N×C×H×W in [-1, 1] → one near-square PIL grid of them, 1-pixel gaps."""
    n, c, h, w = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * (h + 1) - 1, columns * (w + 1) - 1), -1.0)
    for i, image in enumerate(images):
        top, left = (i // columns) * (h + 1), (i % columns) * (w + 1)
        grid[:, top : top + h, left : left + w] = image
    return to_pil(grid)


def labelled_tile(image: Image.Image, label: str, expert: int | None) -> Image.Image:
    """A sample enlarged (nearest neighbour) to ~160 px, framed in its expert's plot colour, with `label` in a bar
    above it and an empty strip below where the gallery lays its caption: the label stays readable at any
    gallery size, where a caption may be cut off."""
    from matplotlib.colors import to_rgb

    scale = max(1, 160 // max(image.size))
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    color = tuple(round(255 * c) for c in to_rgb(f"C{expert % 10}")) if expert is not None else (90, 90, 90)
    border, bar = 4, TILE_BAR
    tile = Image.new("RGB", (big.width + 2 * border, big.height + 2 * border + 2 * bar), color)
    tile.paste(big, (border, bar + border))
    draw = ImageDraw.Draw(tile)
    draw.text((tile.width / 2, bar / 2 + 2), label, fill="white", anchor="mm", font=ImageFont.load_default(size=16))
    return tile


def read_metrics(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) from a metrics.jsonl; lines without both, or cut short by a running trainer, are left out."""
    steps, losses = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        steps.append(step)
        losses.append(loss)
    return steps, losses


def cluster_sizes_plot(sizes: list[int]) -> Figure:
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar([f"island {k}" for k in range(len(sizes))], sizes, color="tab:blue")
    ax.bar_label(bars)
    ax.set_ylabel("samples")
    ax.set_title(f"cluster sizes ({sum(sizes)} samples)")
    return fig


def routing_plot(weights: torch.Tensor, islands: list[int]) -> Figure:
    """weights (steps, samples, K): one small stacked plot per sample, showing which expert drew it at each step."""
    steps, samples, k = weights.shape
    columns = min(samples, 4)
    rows = -(-samples // columns)
    fig = Figure(figsize=(2.2 * columns + 1.6, 1.7 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    colors = [f"C{i % 10}" for i in range(k)]
    x = np.arange(1, steps + 1)
    for i, ax in enumerate(axes):
        if i >= samples:
            ax.set_visible(False)
            continue
        labels = [f"expert {j}" for j in range(k)]
        ax.stackplot(x, weights[:, i, :].T.numpy(), colors=colors, labels=labels, step="mid")  # one value per step
        ax.set_title(f"sample {i}", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.supxlabel("sampling step", fontsize=8)
    fig.supylabel("routing weight", fontsize=8)
    missing = sorted(set(range(k)) - set(islands))
    fig.suptitle("routing weights per expert" + (f" (missing experts: {missing})" if missing else ""), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    return fig


def training_curves_plot(curves: dict[str, tuple[list[int], list[float]]]) -> Figure:
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, linewidth=1.2, linestyle="--" if name == "monolith" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("training loss per island (metrics.jsonl)")
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl found", ha="center", va="center", transform=ax.transAxes)
    return fig
