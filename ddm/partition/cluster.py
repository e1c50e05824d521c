"""`ddm partition`: cluster a data set into K islands and write the manifest the islands share.

Methods (deterministic for `--seed`):
- kmeans (default): scikit-learn k-means on the features, each sample on its nearest centroid.
- balanced-kmeans (`--balanced`): as in the DDM paper, k-means with many fine centroids (1024, at most N/4),
  whose centroids are then grouped into K coarse clusters by a size-weighted k-means, followed by a
  capacity-constrained reassignment: fine clusters, most decided first (largest gap between their nearest and
  second-nearest coarse centroid), go to the nearest coarse cluster that stays within ceil(N/K) samples, else
  to the smallest one. Islands end within one fine cluster of N/K samples.
- random (`--random`): a seeded random permutation dealt round-robin (the paper's random-partition ablation).
Centroids are the mean feature of each island in every method, so a sample can be routed to its island.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from ddm import UsageError, command_args

FINE_CLUSTERS = 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' (embedded), a latent directory (ddm encode) or an image folder")
    p.add_argument("--k", type=int, required=True, help="number of islands")
    p.add_argument("--out", required=True, help="manifest folder: new, empty, or a manifest ddm wrote (replaced)")
    p.add_argument("--features", default="pixels-pca", help="extractor name (pixels-pca, pixels, latents-pca, text: caption embeddings) or a local transformers checkpoint (DINOv2, CLIP)")
    p.add_argument("--text-encoder", default=None, help="with --features text: local CLIP text / T5 encoder folder (default: the latent cache's; the embedded one for digits)")
    p.add_argument("--allow-empty-captions", action="store_true", help="with --features text: images without a caption get the empty caption")
    p.add_argument("--image-size", type=int, default=None, help="resize + center-crop size for an image folder")
    method = p.add_mutually_exclusive_group()
    method.add_argument("--balanced", action="store_true", help="roughly equal island sizes (fine-to-coarse k-means)")
    method.add_argument("--random", action="store_true", help="random partition (ablation)")
    p.add_argument("--seed", type=int, default=0, help="k-means / random-partition seed")


def island_centroids(features: np.ndarray, assignments: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, features.shape[1]), np.float64)
    np.add.at(sums, assignments, features)
    return (sums / np.maximum(np.bincount(assignments, minlength=k), 1)[:, None]).astype(np.float32)


def kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)


def balanced_kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    n = len(features)
    fine_k = max(k, min(FINE_CLUSTERS, n // 4))
    fine = KMeans(n_clusters=fine_k, n_init=1, random_state=seed).fit(features)
    fine_sizes = np.bincount(fine.labels_, minlength=fine_k)
    coarse = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(fine.cluster_centers_, sample_weight=fine_sizes)
    dist = ((fine.cluster_centers_[:, None, :] - coarse.cluster_centers_[None]) ** 2).sum(-1)  # fine_k x k
    ranked = np.sort(dist, axis=1)
    regret = ranked[:, 1] - ranked[:, 0] if k > 1 else np.zeros(fine_k)
    capacity = math.ceil(n / k)
    load = np.zeros(k, np.int64)
    group = np.empty(fine_k, np.int64)
    for f in np.argsort(-regret, kind="stable"):
        fits = [c for c in np.argsort(dist[f], kind="stable") if load[c] + fine_sizes[f] <= capacity]
        group[f] = fits[0] if fits else int(np.argmin(load))
        load[group[f]] += fine_sizes[f]
    return group[fine.labels_]


def random_partition(n: int, k: int, seed: int) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    assignments = np.empty(n, np.int64)
    assignments[perm] = np.arange(n) % k
    return assignments


def summary_table(manifest, labels: torch.Tensor, num_classes: int) -> str:
    """Island sizes and, where labels exist, the label mix (counts for <= 10 classes, else the top 3)."""
    lines = []
    has_labels = num_classes > 0 and bool((labels >= 0).all())
    if has_labels and num_classes <= 10:
        lines.append("island   size  " + " ".join(f"{c:>4d}" for c in range(num_classes)) + "   (samples per label)")
    else:
        lines.append("island   size" + ("  top labels" if has_labels else ""))
    for island, size in enumerate(manifest.sizes):
        row = f"{island:>6d} {size:>6d}"
        if has_labels:
            counts = torch.bincount(labels[manifest.assignments == island], minlength=num_classes)
            if num_classes <= 10:
                row += "  " + " ".join(f"{int(c):>4d}" for c in counts)
            else:
                top = torch.argsort(counts, descending=True, stable=True)[:3]
                row += "  " + ", ".join(f"{int(c)}:{int(counts[c]) / max(size, 1):.0%}" for c in top)
        lines.append(row)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ddm.checks import check_seed
    from ddm.data import load_dataset
    from ddm.io import check_owned, output_lock, replacing_dir
    from ddm.partition.features import check_spec, check_supported, extract_features
    from ddm.partition.manifest import Manifest

    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    check_seed(args.seed)
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {args.image_size}")
    out = Path(args.out)
    check_owned(out, "manifest")
    check_spec(args.features)
    dataset = load_dataset(args.data, args.image_size)
    n = len(dataset)
    if args.k > n:
        raise UsageError(f"--k {args.k} is larger than the data set ({n} samples)")
    check_supported(args.features, dataset)

    with output_lock(out):
        features, extractor = extract_features(args.features, dataset, args.text_encoder, args.allow_empty_captions)
        if args.random:
            method, assignments = "random", random_partition(n, args.k, args.seed)
        elif args.balanced:
            method, assignments = "balanced-kmeans", balanced_kmeans(features, args.k, args.seed)
        else:
            method, assignments = "kmeans", kmeans(features, args.k, args.seed)
        manifest = Manifest(
            k=args.k,
            data=args.data if args.data == "digits" or args.data.startswith("moving-digits") else str(Path(args.data).resolve()),
            data_fingerprint=dataset.fingerprint,
            method=method,
            extractor=extractor,
            seed=args.seed,
            assignments=torch.from_numpy(np.asarray(assignments, np.int64)),
            centroids=torch.from_numpy(island_centroids(features, assignments, args.k)),
            image_size=args.image_size,
            extra={"feature_dim": int(features.shape[1]), **({"vae": dataset.vae} if hasattr(dataset, "vae") else {})},
        )
        if min(manifest.sizes) == 0:
            print(f"warning: {manifest.sizes.count(0)} of {args.k} islands are empty")
        with replacing_dir(out, "manifest") as staging:
            manifest.save(staging)
    labels = getattr(dataset, "labels", torch.full((n,), -1))
    print(f"{method} partition of {manifest.data} ({n} samples, features {extractor}) into {args.k} islands -> {out}")
    print(summary_table(manifest, labels, getattr(dataset, "num_classes", 0)))
    return 0


def partition(**options) -> Path:
    """Python API of `ddm partition`: the same options as keyword arguments (`data="digits", k=4, out=...`), the
    same defaults and checks. Returns the manifest directory."""
    args = command_args(add_arguments, **options)
    run(args)
    return Path(args.out)
