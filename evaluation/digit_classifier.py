"""A small CNN on the 8x8 digits: the FID feature extractor and sample classifier (no download).

Trained once on a fixed, seeded 80/20 split of the 1,797 digits; the other 20% (359 images) is the fixed
held-out set that FID is measured against. The weights ship in evaluation/assets/digit_classifier.safetensors,
produced by:
    python -m evaluation.digit_classifier --out evaluation/assets/digit_classifier.safetensors
Use: `load_digit_classifier()` -> module; `module(x)` gives logits, `module.features(x)` the 64-d
penultimate features; x is (N, 1, 8, 8) in [-1, 1].
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ddm import UsageError

WEIGHTS = Path(__file__).parent / "assets" / "digit_classifier.safetensors"
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
FEATURE_DIM = 64


def digits_split(num_samples: int = 1797, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): the fixed seeded 80/20 split."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    n_heldout = round(num_samples * HELDOUT_FRACTION)
    return perm[n_heldout:].sort().values, perm[:n_heldout].sort().values


class DigitClassifier(nn.Module):
    num_features = FEATURE_DIM  # read by torchmetrics' FrechetInceptionDistance(feature=...)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 4 x 4
        )
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digit_classifier(epochs: int = 40, seed: int = 0) -> tuple[DigitClassifier, float]:
    """(model, held-out accuracy), trained on the train split only."""
    from ddm.data.images import DigitsDataset

    ds = DigitsDataset()
    train_idx, heldout_idx = digits_split(len(ds))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = ds.images[train_idx], ds.labels[train_idx]
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(64):
            # small random shifts make the features robust to the slight misalignment of generated digits
            xb = torch.roll(x[batch], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        acc = (model(ds.images[heldout_idx]).argmax(1) == ds.labels[heldout_idx]).float().mean().item()
    return model, acc


def load_digit_classifier(path: str | Path = WEIGHTS, device=None) -> DigitClassifier:
    """The shipped classifier in eval mode, gradients off. Never trains."""
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot load the digit classifier from {path}: {e}") from None
    model = DigitClassifier()
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    from ddm.io import atomic_save_tensors

    p = argparse.ArgumentParser(description="train the digits feature classifier on the fixed train split")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, acc = train_digit_classifier(args.epochs, args.seed)
    atomic_save_tensors(Path(args.out), model.state_dict(), metadata={"heldout_accuracy": f"{acc:.4f}", "split_seed": str(SPLIT_SEED)})
    print(f"held-out accuracy {acc:.4f}; weights written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
