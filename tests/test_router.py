"""Router: strategies, training on the experts' noise path, prior correction, the train-router CLI."""
import json
import math

import pytest
import torch

from ddm import UsageError
from frontends.cli import main as ddm_main
from ddm.flow import FlowConfig
from router.model import RouterModel
from router.strategies import Strategy, parse_strategy
from router.train import accuracy_by_sigma, fit_router, router_flop_ratio
from test_router_fixtures import digits_manifest, make_expert


@pytest.mark.parametrize("spec", ["nope", "topk:5", "top5", "topk:0", "sample:9", "sample:x", "threshold:1.5", "threshold:abc", "full:2",
                                  "trajectory:0.5", "trajectory:0.5:magic", "trajectory:0.5:topk:9", "trajectory:0.5:trajectory",
                                  "trajectories"])
def test_parse_strategy_rejects(spec):
    with pytest.raises(UsageError, match="strategy") as e:
        parse_strategy(spec, 4)
    assert "\n" not in str(e.value) and spec in str(e.value)


@pytest.mark.parametrize("sigma", ["0", "1", "1.5", "-0.2", "abc", "nan", ""])
def test_parse_strategy_rejects_a_hand_over_sigma_outside_0_1(sigma):
    with pytest.raises(UsageError, match=r"hand-over sigma .* \(0, 1\)") as e:
        parse_strategy(f"trajectory:{sigma}:top1", 4)
    assert repr(sigma) in str(e.value)


def test_parse_strategy_names():
    assert parse_strategy("top1", 4) == Strategy("topk", k=1)
    assert str(parse_strategy("top2", 4)) == "topk:2"
    assert str(parse_strategy("threshold:0.1", 4)) == "threshold:0.1"
    assert str(parse_strategy("sample:1", 4)) == "sample:1"
    assert parse_strategy("trajectory", 4) == Strategy("trajectory")
    hybrid = parse_strategy("Trajectory:0.3:top1", 4)
    assert hybrid == Strategy("trajectory", handover=0.3, then=Strategy("topk", k=1))
    assert str(hybrid) == "trajectory:0.3:topk:1" and parse_strategy(str(hybrid), 4) == hybrid
    assert str(parse_strategy("trajectory:0.25:full", 4)) == "trajectory:0.25:full"
    counts = {spec: parse_strategy(spec, 4).experts_per_row(3) for spec in
              ("full", "top2", "topk:4", "sample:2", "threshold:0.1", "trajectory", "trajectory:0.5:full", "trajectory:0.5:top2")}
    assert counts == {"full": 3, "top2": 2, "topk:4": 3, "sample:2": 2, "threshold:0.1": None, "trajectory": 1,
                      "trajectory:0.5:full": 3, "trajectory:0.5:top2": 2}


def test_draw_one_follows_the_probabilities_and_the_generator():
    from router.strategies import draw_one

    probs = torch.tensor([[0.6, 0.0, 0.3, 0.1]]).expand(8000, 4)
    w = draw_one(probs, torch.Generator().manual_seed(0))
    assert torch.equal(w, draw_one(probs, torch.Generator().manual_seed(0)))
    assert not torch.equal(w, draw_one(probs, torch.Generator().manual_seed(1)))
    assert torch.equal(w.sum(1), torch.ones(8000)) and ((w == 0) | (w == 1)).all()
    assert w[:, 1].sum() == 0 and torch.allclose(w.mean(0), probs[0], atol=0.02)


def test_strategy_weights():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8], [0.26, 0.25, 0.25, 0.24]])
    assert torch.equal(parse_strategy("full", 4).weights(probs), probs)
    top1 = parse_strategy("top1", 4).weights(probs)
    assert torch.equal(top1, torch.eye(4)[[0, 3, 0]])
    top2 = parse_strategy("topk:2", 4).weights(probs)
    assert torch.allclose(top2[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert ((top2 > 0).sum(1) == 2).all() and torch.allclose(top2.sum(1), torch.ones(3))
    thr = parse_strategy("threshold:0.27", 4).weights(probs)
    assert torch.allclose(thr[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.equal(thr[1], torch.tensor([0.0, 0, 0, 1]))
    assert torch.equal(thr[2], torch.tensor([1.0, 0, 0, 0]))  # all below tau: the argmax is kept


def test_sample_strategy_follows_weights_and_seed():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0]]).expand(4000, 4)
    s = parse_strategy("sample:1", 4)
    w1 = s.weights(probs, torch.Generator().manual_seed(0))
    assert torch.equal(w1, s.weights(probs, torch.Generator().manual_seed(0)))
    assert not torch.equal(w1, s.weights(probs, torch.Generator().manual_seed(1)))
    freq = w1.mean(0)
    assert torch.allclose(freq, probs[0], atol=0.03) and freq[3] == 0
    w2 = parse_strategy("sample:2", 4).weights(probs, torch.Generator().manual_seed(0))
    assert ((w2 > 0).sum(1) == 2).all() and torch.allclose(w2.sum(1), torch.ones(4000))


@pytest.fixture(scope="module")
def trained():
    """A router trained on 3 islands of whole digit classes, {0-4}, {5-7}, {8, 9}: unequal sizes on purpose."""
    from ddm.data.images import DigitsDataset

    ds = DigitsDataset()
    islands = torch.where(ds.labels < 5, 0, torch.where(ds.labels < 8, 1, 2))
    manifest = digits_manifest(3, islands)
    flow = FlowConfig(shift=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~10k tiny ops: threading only adds sync cost, badly so on a busy machine
    try:
        router = fit_router(ds.images, ds.labels, manifest, flow, 10, steps=300, batch_size=64, lr=3e-3, width=32, layers=1)
    finally:
        torch.set_num_threads(threads)
    metrics = accuracy_by_sigma(router, ds.images, ds.labels, manifest.assignments, flow, 10)
    return ds, manifest, router, metrics


def test_router_accuracy_high_at_low_noise_and_prior_at_high_noise(trained):
    _, _, _, metrics = trained
    acc = [b["accuracy"] for b in metrics["buckets"]]
    prior = metrics["prior_accuracy"]
    assert acc[0] > prior + 0.2, acc  # clean images: the island (a digit group) is visible
    assert abs(acc[-1] - prior) < 0.1, (acc, prior)  # pure noise: nothing beats the prior
    assert acc[0] > acc[-1]


def test_router_is_a_small_fraction_of_an_expert(trained):
    from ddm.models.experts import build_dit

    _, _, router, _ = trained
    ratio = router_flop_ratio(router, dict(build_dit("small", 8, 1, 10).config))
    assert 0 < ratio["router_over_expert"] < 0.1, ratio


def test_balanced_training_adds_prior_correction(trained):
    ds, manifest, _, _ = trained
    router = fit_router(ds.images, ds.labels, manifest, FlowConfig(), 10, steps=2, batch_size=8, balance=True)
    sizes = torch.tensor(manifest.sizes, dtype=torch.float)
    expected = (sizes / sizes.sum()).log() - math.log(1 / 3)
    assert torch.allclose(torch.tensor(router.config.logit_correction), expected)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        plain = router(x, t) - router.prior_correction
        assert torch.allclose(router(x, t) - plain, expected.expand(2, 3))


def test_class_conditional_router_roundtrip(tmp_path, trained):
    ds, manifest, _, _ = trained
    router = fit_router(ds.images, ds.labels, manifest, FlowConfig(), 10, steps=2, batch_size=8, class_cond=True)
    router.save_pretrained(tmp_path / "r")
    loaded = RouterModel.from_pretrained(tmp_path / "r")
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        assert torch.equal(router(x, t, y), loaded.eval()(x, t, y))
        assert not torch.equal(router(x, t, y), router(x, t, torch.tensor([1, 2, 3])))


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_router")
    manifest = digits_manifest(2)
    manifest.save(root / "manifest")
    experts = [str(make_expert(root / f"e{i}", i, 2, manifest.fingerprint)) for i in range(2)]
    return root, experts


def test_train_router_cli_writes_a_pretrained_dir(cli_setup, capsys):
    root, experts = cli_setup
    out = root / "router"
    rc = ddm_main(["train-router", "--manifest", str(root / "manifest"), "--experts", *experts, "--out", str(out),
                   "--steps", "20", "--batch-size", "32", "--width", "16", "--layers", "1"])
    assert rc == 0
    metrics = json.loads((out / "router_metrics.json").read_text())
    assert len(metrics["buckets"]) == 5 and all(0 <= b["accuracy"] <= 1 for b in metrics["buckets"])
    assert metrics["router_over_expert"] > 0
    router = RouterModel.from_pretrained(out)
    assert router.config.num_experts == 2 and router.config.flow == json.loads((root / "e0" / "expert.json").read_text())["flow"]
    assert "router FLOPs / expert FLOPs" in capsys.readouterr().out
    # Class-conditional experts get a class-conditional router by default: sampling class c needs p(k | x_t, c).
    assert router.config.num_classes == 10
    assert metrics["prior_accuracy"] <= metrics["prior_accuracy_given_class"] <= 1


def test_train_router_cli_no_class_cond(cli_setup):
    root, experts = cli_setup
    out = root / "router-unconditional"
    rc = ddm_main(["train-router", "--manifest", str(root / "manifest"), "--experts", *experts, "--out", str(out),
                   "--steps", "2", "--batch-size", "8", "--width", "16", "--layers", "1", "--no-class-cond"])
    assert rc == 0 and not RouterModel.from_pretrained(out).config.num_classes
    assert "prior_accuracy_given_class" not in json.loads((out / "router_metrics.json").read_text())


def test_train_router_cli_refuses_mismatched_experts(cli_setup, capsys):
    root, experts = cli_setup
    manifest = str(root / "manifest")
    odd_flow = make_expert(root / "odd_flow", 1, 2, digits_manifest(2).fingerprint, flow=FlowConfig(shift=3.0).to_dict())
    odd_size = make_expert(root / "odd_size", 1, 2, digits_manifest(2).fingerprint, sample_size=16)
    other = make_expert(root / "other", 1, 2, "0" * 16)
    for bad, message in [((experts[0], str(odd_flow)), "flow"), ((experts[0], str(odd_size)), "sample_size"),
                         ((str(other),), "manifest"), ((experts[0], experts[0]), "twice")]:
        out = root / "never"
        rc = ddm_main(["train-router", "--manifest", manifest, "--experts", *bad, "--out", str(out), "--steps", "1"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and message in err and "\n" not in err, err
        assert not out.exists()
