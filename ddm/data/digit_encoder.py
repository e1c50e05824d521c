"""The embedded text encoder of the digit captions: a tiny CLIP text model trained by our code, shipped in
ddm/assets/text_encoder_digits (so nothing is downloaded), and loaded like any CLIP folder (ddm/data/text_encoder.py).

    python -m ddm.data.digit_encoder [OUT]     # rebuilds it (seed 0, about 20 s on one CPU core)

Training is CLIP's, at toy scale: the text model (2 layers x 32, over the 20 words of the digit captions, word-level
tokenizer) and a small image tower (an MLP on the 8x8 pixels) learn with the symmetric contrastive loss to match
each digit image with its caption; the image tower is then thrown away. A caption's embedding so comes to carry
what its images look like, as a real CLIP's does. docs/ddm.md says why a frozen random encoder was not enough.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm.data.text_encoder import DIGIT_ENCODER, build_clip_encoder, save_encoder

STEPS, BATCH, LR = 400, 128, 2e-3


def build_digit_encoder(out: str | Path = DIGIT_ENCODER, steps: int = STEPS, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from ddm.data.captions import digit_captions, digit_vocabulary
    from ddm.data.images import DigitsDataset

    out = Path(out)
    build_clip_encoder(out, digit_vocabulary(), hidden_size=32, layers=2, heads=2, projection_dim=32, max_length=16, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = CLIPTextModelWithProjection.from_pretrained(out)
    data = DigitsDataset()
    tokens = tokenizer(digit_captions(data.labels), padding="max_length", max_length=16, return_tensors="pt")
    torch.manual_seed(seed)
    image_tower = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    log_scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's initial temperature
    params = [*text.parameters(), *image_tower.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    text.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (BATCH,), generator=gen)
        t = F.normalize(text(input_ids=tokens["input_ids"][idx], attention_mask=tokens["attention_mask"][idx]).text_embeds, dim=-1)
        v = F.normalize(image_tower(data.images[idx]), dim=-1)
        logits = log_scale.exp().clamp(max=100) * v @ t.T
        # captions of the same digit phrased alike are the same text: count every such pair as a match
        same = (tokens["input_ids"][idx][:, None] == tokens["input_ids"][idx][None]).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return save_encoder(out, text.eval(), tokenizer)


if __name__ == "__main__":
    print(build_digit_encoder(sys.argv[1] if len(sys.argv) > 1 else DIGIT_ENCODER))
