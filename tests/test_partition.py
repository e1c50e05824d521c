"""`ddm partition`: determinism, the three methods, the manifest it writes, feature extractors, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from frontends.cli import main
from ddm.data.images import DigitsDataset
from ddm.partition.manifest import Manifest


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset()


def partition(out, *extra):
    assert main(["partition", "--out", str(out), *extra]) == 0
    return Manifest.load(out)


def purity(manifest, labels):
    """Fraction of samples whose island's majority label is their own label."""
    majority = sum(torch.bincount(labels[manifest.assignments == k], minlength=10).max() for k in range(manifest.k))
    return float(majority) / len(labels)


def test_kmeans_is_deterministic_and_writes_a_complete_manifest(tmp_path, digits, capsys):
    a = partition(tmp_path / "a", "--k", "4", "--seed", "3")
    out = capsys.readouterr().out
    b = partition(tmp_path / "b", "--k", "4", "--seed", "3")
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    assert a.k == 4 and a.method == "kmeans" and a.extractor == "pixels-pca" and a.seed == 3
    assert a.data_fingerprint == digits.fingerprint and len(a.assignments) == len(digits)
    assert a.centroids.shape == (4, 32) and sum(a.sizes) == len(digits) and min(a.sizes) > 0
    meta = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert meta["sizes"] == a.sizes and meta["fingerprint"] == a.fingerprint
    # The summary table: one row per island with its size and label counts that add up to it.
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[1]) for r in rows] == a.sizes
    assert all(sum(map(int, r[2:])) == int(r[1]) for r in rows)
    # Centroids are the mean feature of each island.
    from ddm.partition.features import pixels_pca

    features = torch.from_numpy(pixels_pca(digits))
    for k in range(4):
        assert torch.allclose(a.centroids[k], features[a.assignments == k].mean(0), atol=1e-4)


def test_kmeans_islands_follow_the_data_but_random_ones_do_not(tmp_path, digits):
    clustered = partition(tmp_path / "k", "--k", "10")
    random = partition(tmp_path / "r", "--k", "10", "--random")
    assert purity(clustered, digits.labels) > 0.6
    assert purity(random, digits.labels) < 0.2
    assert random.method == "random" and max(random.sizes) - min(random.sizes) <= 1


def test_balanced_islands_are_roughly_equal(tmp_path, digits):
    m = partition(tmp_path / "m", "--k", "4", "--balanced", "--seed", "1")
    assert m.method == "balanced-kmeans"
    assert max(m.sizes) <= np.ceil(len(digits) / 4) and min(m.sizes) >= 0.9 * len(digits) / 4
    assert purity(m, digits.labels) > 0.35  # still clusters, not a random split (0.1-0.15)
    again = partition(tmp_path / "m2", "--k", "4", "--balanced", "--seed", "1")
    assert torch.equal(m.assignments, again.assignments)


def test_rerun_replaces_the_manifest_whole(tmp_path):
    partition(tmp_path / "m", "--k", "3")
    m = partition(tmp_path / "m", "--k", "2", "--random")
    assert m.k == 2 and sorted(p.name for p in (tmp_path).iterdir()) == ["m"]  # no staging left behind


def test_transformers_feature_model_from_a_local_path(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model_dir = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)).save_pretrained(model_dir)
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(model_dir)
    data = tmp_path / "data"
    for cls, color in [("red", (250, 10, 10)), ("blue", (10, 10, 250))]:
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 10), tuple(max(0, c - 20 * i) for c in color)).save(data / cls / f"{i}.png")
    m = partition(tmp_path / "m", "--data", str(data), "--image-size", "8", "--k", "2", "--features", str(model_dir))
    assert m.extractor.startswith("hf:dinov2:dino:") and m.centroids.shape == (2, 32) and m.image_size == 8
    assert m.data_fingerprint == m.load_dataset().fingerprint


@pytest.mark.parametrize("args, named", [
    (["--k", "0"], "0"),
    (["--k", "5000"], "5000"),
    (["--k", "2", "--data", "{tmp}/missing"], "missing"),
    (["--k", "2", "--data", "{tmp}/empty", "--image-size", "8"], "empty"),
    (["--k", "2", "--features", "no-such-extractor"], "no-such-extractor"),
    (["--k", "2", "--out", "{tmp}/precious"], "precious"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, named):
    (tmp_path / "empty").mkdir()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    out = args[args.index("--out") + 1] if "--out" in args else str(tmp_path / "out")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["partition", *args] + ([] if "--out" in args else ["--out", out]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and named in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine"
