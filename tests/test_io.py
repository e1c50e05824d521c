"""Atomic directory replacement: readers see a whole directory even after a kill between the two renames."""
import os

import torch

from ddm.io import atomic_replace_dir, replaced_dir, staging_dir
from ddm.partition.manifest import Manifest


def make_manifest(seed: int) -> Manifest:
    return Manifest(k=2, data="digits", data_fingerprint="f" * 16, method="random", extractor="pixels", seed=seed,
                    assignments=torch.tensor([0, 1, 1, 0]), centroids=torch.zeros(2, 3))


def test_replace_and_read_back_after_a_kill_between_renames(tmp_path):
    final = tmp_path / "manifest"
    for seed in (1, 2):  # a first write, then a replacement
        staging = staging_dir(final)
        make_manifest(seed).save(staging)
        atomic_replace_dir(staging, final, kind="manifest")
    assert replaced_dir(final) == final and Manifest.load(final).seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest"]  # no staging or .old left behind
    # A kill right after the first rename of the next replacement: only manifest.old is there.
    os.replace(final, tmp_path / "manifest.old")
    assert replaced_dir(final) == tmp_path / "manifest.old"
    assert Manifest.load(final).seed == 2
    # The next replacement completes and leaves one directory again.
    staging = staging_dir(final)
    make_manifest(3).save(staging)
    atomic_replace_dir(staging, final, kind="manifest")
    assert Manifest.load(final).seed == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["manifest"]
