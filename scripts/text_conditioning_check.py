"""How fast small experts learn from their condition on the digits: the figures behind the embedded text encoder's
design (docs/ddm.md, "The embedded encoder").

Flow-matching training loss (mean of the last 40 of `--steps` steps, batch 32, the trainer's logit-normal sigmas,
25 warm-up steps) of `small` models that differ only in their condition: a class DiT; PixArt experts on the captions
through the shipped (trained) digit encoder and through the same encoder frozen at its random initialisation; PixArt
with an empty condition (what no information from the caption reaches). Also the mean cosine of pooled caption
embeddings of one digit and of different digits, for both encoders.

    python scripts/text_conditioning_check.py    # writes docs/benchmarks/text_conditioning.json
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def train_loss(model, forward, images, steps: int, lr: float) -> float:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 25)
        idx = torch.randint(len(images), (32,), generator=gen)
        x0, noise = images[idx], torch.randn(32, *images.shape[1:], generator=gen)
        sigma = torch.sigmoid(torch.randn(32, generator=gen)).view(-1, 1, 1, 1)
        pred = forward(model, (1 - sigma) * x0 + sigma * noise, 1000 * sigma.flatten(), idx)
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-40:]) / 40


def cosines(pooled: torch.Tensor, labels: torch.Tensor) -> dict:
    unit = torch.nn.functional.normalize(pooled, dim=1)
    cos, same = unit @ unit.T, labels[:, None] == labels[None]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return {"same_digit": cos[same & off].mean().item(), "other_digit": cos[~same].mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per model")
    p.add_argument("--json", default=str(ROOT / "docs/benchmarks/text_conditioning.json"), help="results JSON")
    args = p.parse_args(argv)
    from ddm.data.captions import digit_captions, digit_vocabulary
    from ddm.data.images import DigitsDataset
    from ddm.data.text_embeddings import encode_captions
    from ddm.data.text_encoder import DIGIT_ENCODER, TextEncoder, build_clip_encoder
    from ddm.io import atomic_write_json
    from ddm.models.experts import NO_EXTRA_CONDITIONS, build_dit, build_text_expert

    torch.set_num_threads(1)
    data = DigitsDataset()
    captions = digit_captions(data.labels)
    first40 = torch.arange(40)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = build_clip_encoder(Path(tmp) / "random", digit_vocabulary(), hidden_size=32, layers=2, heads=2,
                                        projection_dim=32, max_length=16, seed=0)
        tables = {name: encode_captions(TextEncoder(d), captions, dtype=torch.float32)
                  for name, d in (("trained encoder", DIGIT_ENCODER), ("random encoder", random_dir))}
    result = {"command": "python scripts/text_conditioning_check.py" + (f" --steps {args.steps}" if args.steps != 200 else ""),
              "date": datetime.date.today().isoformat(), "cosines": {n: cosines(t[2][first40], data.labels[first40]) for n, t in tables.items()},
              "loss": {}}

    def pixart(table, zero=False):
        hidden, mask, _ = table
        return lambda m, x, t, i: m(x, encoder_hidden_states=hidden[i] * (0 if zero else 1), timestep=t,
                                    encoder_attention_mask=mask[i], added_cond_kwargs=NO_EXTRA_CONDITIONS).sample

    runs = [("class DiT", lambda: build_dit("small", 8, 1, 10), lambda m, x, t, i: m(x, timestep=t, class_labels=data.labels[i]).sample, 1e-3)]
    for lr in (1e-3, 3e-3):
        runs += [(f"PixArt, trained encoder, lr {lr:g}", None, pixart(tables["trained encoder"]), lr),
                 (f"PixArt, random encoder, lr {lr:g}", None, pixart(tables["random encoder"]), lr),
                 (f"PixArt, empty condition, lr {lr:g}", None, pixart(tables["trained encoder"], zero=True), lr)]
    for name, make, forward, lr in runs:
        torch.manual_seed(0)
        model = make() if make else build_text_expert("small", 8, 1, 32)
        result["loss"][name] = train_loss(model, forward, data.images, args.steps, lr)
        print(f"{name}: {result['loss'][name]:.3f}")
    print(result["cosines"])
    atomic_write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
