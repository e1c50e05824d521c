"""Evaluation: the shipped digit classifier, FID on its features, accuracy/coverage, `ddm eval`."""
import json

import pytest
import torch

from frontends.cli import main as ddm_main
from ddm.data.images import DigitsDataset
from evaluation.digit_classifier import WEIGHTS, digits_split, load_digit_classifier
from evaluation.images import digit_features, digits_reference, evaluate_samples
from ddm.io import atomic_save_tensors


@pytest.fixture(scope="module")
def digits():
    ds = DigitsDataset()
    train, heldout = digits_split(len(ds))
    return ds, train, heldout


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


def test_split_is_fixed_and_disjoint(digits):
    ds, train, heldout = digits
    assert len(heldout) == 359
    assert len(train) + len(heldout) == len(ds) and not set(train.tolist()) & set(heldout.tolist())
    assert torch.equal(heldout, digits_split(len(ds))[1])


def test_shipped_classifier_is_accurate_on_the_heldout_set(digits, classifier):
    ds, _, heldout = digits
    assert WEIGHTS.is_file()
    with torch.no_grad():
        logits = classifier(ds.images[heldout])
        feats = classifier.features(ds.images[heldout])
    assert (logits.argmax(1) == ds.labels[heldout]).float().mean() > 0.95
    assert feats.shape == (len(heldout), classifier.num_features)


def test_fid_accuracy_and_coverage(digits, classifier):
    ds, train, _ = digits
    reference = digits_reference()
    features = digit_features(classifier)
    real = evaluate_samples((ds.images[train] + 1) / 2, ds.labels[train], reference, features, classifier)
    noise = evaluate_samples(torch.rand(500, 1, 8, 8), torch.arange(500) % 10, reference, features, classifier)
    one_class = ds.images[ds.labels == 3]
    mode_collapse = evaluate_samples((one_class + 1) / 2, torch.arange(len(one_class)) % 10, reference, features, classifier)
    assert real["fid"] < 0.1 * min(mode_collapse["fid"], noise["fid"])
    assert real["accuracy"] > 0.95 and real["class_coverage"] == 1.0
    assert mode_collapse["predicted_class_fraction"][3] > 0.9 and mode_collapse["accuracy"] < 0.2
    assert mode_collapse["per_class_accuracy"][3] > 0.9 and mode_collapse["per_class_accuracy"][0] < 0.1
    assert abs(sum(real["predicted_class_fraction"]) - 1) < 1e-6


def test_ddm_eval_cli(digits, tmp_path, capsys):
    ds, train, _ = digits
    samples = tmp_path / "s.safetensors"
    atomic_save_tensors(samples, {"images": (ds.images[train[:300]] + 1) / 2, "labels": ds.labels[train[:300]]})
    out = tmp_path / "m.json"
    assert ddm_main(["eval", "--samples", str(samples), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 300 and metrics["num_reference"] == 359
    assert metrics["accuracy"] > 0.9 and metrics["fid"] >= 0
    capsys.readouterr()
    assert ddm_main(["eval", "--samples", str(tmp_path / "none.safetensors")]) == 2
    assert ddm_main(["eval", "--samples", str(samples), "--data", "/some/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error:") for e in err)


def test_ddm_eval_samples_from_an_image_folder(digits, tmp_path):
    from PIL import Image

    ds, train, _ = digits
    for i in train[:40].tolist():
        folder = tmp_path / "imgs" / str(int(ds.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        arr = ((ds.images[i, 0] + 1) * 127.5).round().byte().numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    out = tmp_path / "m.json"
    assert ddm_main(["eval", "--samples", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 40 and metrics["accuracy"] > 0.9


def test_ddm_eval_generates_from_an_ensemble(tmp_path):
    from router.ensemble import DDMEnsemble
    from test_router_fixtures import make_ensemble_dirs

    router, experts = make_ensemble_dirs(tmp_path, 2)
    DDMEnsemble.from_dirs(router, experts).save_pretrained(tmp_path / "ens")
    out = tmp_path / "m.json"
    args = ["eval", "--ensemble", str(tmp_path / "ens"), "--n", "20", "--steps", "2", "--strategy", "full", "--out", str(out)]
    assert ddm_main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 20 and len(metrics["per_class_accuracy"]) == 10 and metrics["fid"] > 0
    assert ddm_main(["eval", "--ensemble", str(tmp_path / "ens"), "--n", "1"]) == 2


def test_ddm_eval_real_data_uses_a_local_feature_model(tmp_path, capsys):
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model_dir = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    for folder, n in (("ref", 12), ("samples", 10)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            arr = (torch.rand(12, 12, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(tmp_path / folder / f"{i}.png")
    out = tmp_path / "m.json"
    args = ["eval", "--samples", str(tmp_path / "samples"), "--data", "folder", "--feature-model", str(model_dir),
            "--reference", str(tmp_path / "ref"), "--image-size", "12", "--out", str(out)]
    assert ddm_main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_samples"] == 10 and metrics["num_reference"] == 12 and metrics["fid"] >= 0
    assert "accuracy" not in metrics
    assert ddm_main(args[:5] + ["--feature-model", str(tmp_path / "missing"), *args[7:]]) == 2
    assert "feature model" in capsys.readouterr().err


def test_ddm_eval_samples_one_expert_like_a_one_expert_ensemble(tmp_path):
    """The monolith is evaluated through the same command; with a pass-through K=1 router the images match."""
    from evaluation.images import generate
    from router.ensemble import DDMEnsemble
    from test_router_fixtures import make_ensemble_dirs

    router, experts = make_ensemble_dirs(tmp_path, 1)
    DDMEnsemble.from_dirs(router, experts).save_pretrained(tmp_path / "ens")
    alone, labels = generate(experts[0], 6, None, 2, 1.5, seed=3)
    routed, _ = generate(tmp_path / "ens", 6, None, 2, 1.5, seed=3)
    assert torch.equal(alone, routed) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert ddm_main(["eval", "--ensemble", str(experts[0]), "--n", "4", "--steps", "2", "--strategy", "full"]) == 2
