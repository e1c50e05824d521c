"""`ddm encode`: encode an image folder once with a local VAE into a latent cache (format in ddm/data/latents.py);
with `--text-encoder` also its captions (sidecar .txt or metadata.jsonl, ddm/data/captions.py) into sequence and
pooled embeddings stored beside the latents (ddm/data/text_encoder.py).

Resumable: plan.json is written first; each finished shard lands by rename; a rerun of the same command keeps the
finished shards, drops a half-written temp file and encodes the rest; index.json is written last. A rerun with other
settings into the same --out is refused (nothing is overwritten). Shards are encoded in fixed batches from their
first image, so a killed and resumed run writes the same bytes as an uninterrupted one on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ddm import UsageError
from ddm.io import atomic_save_tensors, atomic_write_json, sha256_file
from ddm.data.text_embeddings import EMPTY, text_shard_name
from ddm.data.latents import (DTYPES, FORMAT, INDEX, PLAN, cache_fingerprint, num_shards, plan_key,
                              shard_images, shard_name, shard_samples)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder (sub-folders = classes)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (config.json + safetensors)")
    p.add_argument("--image-size", type=int, required=True, help="resize + center-crop size; must divide by the VAE's downsampling")
    p.add_argument("--out", required=True, help="latent directory to write (or to resume)")
    p.add_argument("--flip", action="store_true", help="also store every image's mirror image (2N samples)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="storage dtype of mean and std")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: up to 8, one core left)")
    p.add_argument("--text-encoder", default=None, help="local CLIP text model or T5 encoder folder (with its tokenizer): also cache caption embeddings")
    p.add_argument("--text-length", type=int, default=None, help="caption tokens kept (default: the encoder's maximum, at most 120); longer captions are truncated")
    p.add_argument("--allow-empty-captions", action="store_true", help="images without a caption get the empty caption instead of an error")


def check_out(out: Path, plan: dict) -> dict | None:
    """The plan already in --out, if it is this encoding's; refuses another encoding's or foreign files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not (out / PLAN).is_file():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
        if foreign:
            raise UsageError(f"--out {out} is not empty and holds no latent cache ({', '.join(sorted(foreign)[:3])}); refusing to overwrite it")
        return None
    try:
        existing = json.loads((out / PLAN).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"corrupt {out / PLAN}: {e}") from None
    diff = [f"{k}={existing.get(k)!r} (there) vs {plan.get(k)!r} (now)" for k in plan_key(plan) if existing.get(k) != plan.get(k)]
    if diff:
        raise UsageError(f"--out {out} holds another encoding ({'; '.join(diff)}); use another --out")
    return existing


def text_plan(args, images):
    """(encoder, plan entries, captions) with --text-encoder, else None; captions are read (and checked) first."""
    from ddm.data.text_embeddings import captions_hash
    from ddm.data.text_encoder import TextEncoder

    if args.text_encoder is None:
        if args.text_length is not None or args.allow_empty_captions:
            raise UsageError("--text-length and --allow-empty-captions need --text-encoder")
        return None
    captions = images.captions(args.allow_empty_captions)
    encoder = TextEncoder(args.text_encoder, args.text_length)
    record = encoder.record()
    return encoder, {"text_encoder": record, "text_encoder_hash": record["hash"], "captions_hash": captions_hash(captions)}, captions


def text_rows(encoder, captions: list[str], dtype) -> dict[str, torch.Tensor]:
    hidden, mask, pooled = encoder.encode(captions)
    return {"hidden": hidden.to(dtype).cpu(), "mask": mask.to(torch.uint8).cpu(), "pooled": pooled.cpu()}


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ddm.data.images import ImageFolderDataset
    from ddm.data.vae import check_vae_dir, downsample_factor, encode_moments, load_vae, vae_record

    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size), ("--image-size", args.image_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.data == "digits" or not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: ddm encode needs an image folder")
    check_vae_dir(args.vae)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(args.vae, device)
    factor = downsample_factor(vae)
    if args.image_size % factor:
        raise UsageError(f"--image-size {args.image_size} is not divisible by the downsampling factor {factor} of VAE {args.vae}")
    images = ImageFolderDataset(args.data, args.image_size)
    text = text_plan(args, images)
    latent_size = args.image_size // factor
    plan = {
        "format": FORMAT,
        "source": str(Path(args.data).resolve()),
        "source_fingerprint": images.fingerprint,
        "num_images": len(images),
        "class_names": images.class_names,
        "image_size": args.image_size,
        "flip": args.flip,
        "vae": vae_record(args.vae, vae),
        "vae_hash": vae.hash,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "latent_shape": [int(vae.config.latent_channels), latent_size, latent_size],
        **(text[1] if text else {}),
    }
    out = Path(args.out)
    existing = check_out(out, plan)
    if existing is not None and (out / INDEX).is_file():
        print(f"{out} is already complete ({existing['num_images']} images)")
        return 0
    if existing is None:
        atomic_write_json(out / PLAN, plan)
    else:
        plan = existing  # keep the paths as first given
    for leftover in out.glob(".shard-*.tmp"):  # a shard write a kill interrupted: never counted
        leftover.unlink()

    per_image = 2 if args.flip else 1
    dtype = DTYPES[args.dtype]
    todo = [s for s in range(num_shards(plan)) if shard_samples(out / shard_name(s)) != len(shard_images(plan, s)) * per_image]
    if text:
        encoder, _, captions = text
        atomic_save_tensors(out / EMPTY, text_rows(encoder, [""], dtype))
    batches = [list(shard_images(plan, s))[i : i + args.batch_size] for s in todo for i in range(0, len(shard_images(plan, s)), args.batch_size)]
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(images), initial=len(images) - sum(len(b) for b in batches), desc="encode", unit="img", dynamic_ncols=True)
    done_in_shard: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    shards = iter(todo)
    shard = next(shards, None)
    for x, labels, idx in loader:
        if args.flip:  # image i, then its mirror image
            mean, std = encode_moments(vae, torch.cat([x, x.flip(-1)]))
            mean, std = (torch.stack(t.chunk(2), 1).flatten(0, 1) for t in (mean, std))
            labels = labels.repeat_interleave(2)
        else:
            mean, std = encode_moments(vae, x)
        rows = text_rows(encoder, [captions[i] for i in idx.repeat_interleave(per_image).tolist()], dtype) if text else None
        done_in_shard.append((mean.to(dtype).cpu(), std.to(dtype).cpu(), labels, rows))
        bar.update(len(x))
        if sum(len(m) for m, _, _, _ in done_in_shard) == len(shard_images(plan, shard)) * per_image:
            if text:  # before the latent shard, whose presence marks the shard done
                atomic_save_tensors(out / text_shard_name(shard), {k: torch.cat([r[k] for *_, r in done_in_shard]) for k in ("hidden", "mask", "pooled")})
            mean, std, labels = (torch.cat(t) for t in list(zip(*done_in_shard))[:3])
            atomic_save_tensors(out / shard_name(shard), {"mean": mean, "std": std, "labels": labels.to(torch.int64)})
            done_in_shard, shard = [], next(shards, None)
    bar.close()

    shards_meta = [{"file": shard_name(s), "samples": len(shard_images(plan, s)) * per_image, "sha256": sha256_file(out / shard_name(s))}
                   for s in range(num_shards(plan))]
    index = {**plan, "shards": shards_meta, "num_samples": plan["num_images"] * per_image}
    if text:
        index["text"] = {"encoder": plan["text_encoder"], "captions_hash": plan["captions_hash"], "empty_sha256": sha256_file(out / EMPTY),
                         "shards": [{"file": text_shard_name(s), "sha256": sha256_file(out / text_shard_name(s))} for s in range(num_shards(plan))]}
    index["fingerprint"] = cache_fingerprint(index)
    atomic_write_json(out / INDEX, index)  # last: marks the cache complete
    if text:
        print(f"embedded the captions with text encoder {args.text_encoder} ({plan['text_encoder']['hash']}, {plan['text_encoder']['max_length']} tokens)")
    print(f"encoded {plan['num_images']} images ({index['num_samples']} samples, latents {'x'.join(map(str, plan['latent_shape']))}) "
          f"with VAE {plan['vae_hash']} -> {out} (fingerprint {index['fingerprint']})")
    return 0
