"""Ensemble: drop-in forward, per-sample routing, routing record, subsets, bad input, save/load."""
import json

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ddm import UsageError
from ddm.models.experts import load_expert
from ddm.flow import FlowConfig
from router.ensemble import DDMEnsemble
from router.members import load_router
from test_router_fixtures import make_ensemble_dirs, make_expert, make_router

K = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    router, experts = make_ensemble_dirs(root, K, scale=30.0)
    return root, router, experts


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.rand(16, generator=g) * 1000
    y = torch.randint(0, 10, (16,), generator=g)
    return x, t, y


def expert_outputs(experts, x, t, y):
    with torch.no_grad():
        return torch.stack([load_expert(p)[0](x, t, y).sample for p in experts])  # K, B, C, H, W


def test_top1_runs_each_expert_only_on_its_samples(dirs, batch):
    _, router, experts = dirs
    x, t, y = batch
    ens = DDMEnsemble.from_dirs(router, experts, "top1")
    seen = []
    for k, expert in enumerate(ens.experts):
        expert.register_forward_hook(lambda m, args, out, k=k: seen.append((k, args[0].shape[0])))
    with torch.no_grad():
        out = ens(x, t, y)
    assert isinstance(out, Transformer2DModelOutput) and out.sample.shape == x.shape
    choice = ens.routing_weights[-1].argmax(1)
    assert len(set(choice.tolist())) >= 2, "the test router should spread this batch over several experts"
    assert sum(n for _, n in seen) == len(x)  # one expert forward per sample, not K
    assert sorted(seen) == sorted((k, int((choice == k).sum())) for k in set(choice.tolist()))
    direct = expert_outputs(experts, x, t, y)[choice, torch.arange(len(x))]
    torch.testing.assert_close(out.sample, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["full", "topk:2", "threshold:0.2"])
def test_weighted_strategies_match_the_weighted_sum(dirs, batch, strategy):
    _, router, experts = dirs
    x, t, y = batch
    ens = DDMEnsemble.from_dirs(router, experts, strategy)
    rows = []
    for expert in ens.experts:
        expert.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        (out,) = ens(x, t, y, return_dict=False)
    w = ens.routing_weights[-1]
    assert torch.allclose(w.sum(1), torch.ones(len(x)))
    assert sum(rows) == int((w > 0).sum())  # only non-zero weights are computed
    expected = torch.einsum("bk,kbchw->bchw", w, expert_outputs(experts, x, t, y))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if strategy == "full":
        with torch.no_grad():
            probs = ens.router(x, t).softmax(1)
        torch.testing.assert_close(w, probs)


def test_missing_expert_renormalizes_over_those_present(dirs, batch):
    _, router, experts = dirs
    x, t, y = batch
    present = [experts[0], experts[2], experts[3]]
    ens = DDMEnsemble.from_dirs(router, present, "full")
    assert ens.islands == [0, 2, 3]
    with torch.no_grad():
        out = ens(x, t, y).sample
        probs = ens.router(x, t).softmax(1)
    w = ens.routing_weights[-1]
    assert (w[:, 1] == 0).all()
    expected_w = probs.clone()
    expected_w[:, 1] = 0
    expected_w /= expected_w.sum(1, keepdim=True)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, torch.einsum("bk,kbchw->bchw", w, expert_outputs(experts, x, t, y)), rtol=1e-5, atol=1e-5)
    top1 = DDMEnsemble.from_dirs(router, present, "top1")
    with torch.no_grad():
        top1(x, t, y)
    assert (top1.routing_weights[-1][:, 1] == 0).all()
    single = DDMEnsemble.from_dirs(router, [experts[3]], "topk:3")  # k > experts present: uses what is there
    with torch.no_grad():
        torch.testing.assert_close(single(x, t, y).sample, expert_outputs([experts[3]], x, t, y)[0])


def test_routing_record_and_scalar_timestep(dirs, batch):
    _, router, experts = dirs
    x, _, y = batch
    ens = DDMEnsemble.from_dirs(router, experts)
    with torch.no_grad():
        ens(x, torch.tensor(500.0), y)
        ens(x, 250.0, y)
    assert len(ens.routing_weights) == 2 and ens.routing_weights[0].shape == (len(x), K)
    ens.reset_routing()
    assert ens.routing_weights == []


def test_save_and_load_the_whole_ensemble(dirs, batch, tmp_path):
    _, router, experts = dirs
    x, t, y = batch
    ens = DDMEnsemble.from_dirs(router, experts[1:], "topk:2")
    ens.save_pretrained(tmp_path / "ens")
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["strategy"] == "topk:2" and spec["experts"] == ["expert_1", "expert_2", "expert_3"]
    loaded = DDMEnsemble.from_pretrained(tmp_path / "ens")
    assert loaded.islands == [1, 2, 3] and str(loaded.strategy) == "topk:2"
    with torch.no_grad():
        assert torch.equal(ens(x, t, y).sample, loaded(x, t, y).sample)
    assert str(DDMEnsemble.from_pretrained(tmp_path / "ens", strategy="full").strategy) == "full"


def test_bad_inputs(dirs, tmp_path):
    root, router, experts = dirs
    with pytest.raises(UsageError, match="at least one expert"):
        DDMEnsemble.from_dirs(router, [])
    with pytest.raises(UsageError, match="K=3"):
        DDMEnsemble.from_dirs(make_router(tmp_path / "r3", 3, "f" * 16), experts)
    with pytest.raises(UsageError, match="sample_size"):
        DDMEnsemble.from_dirs(router, [experts[0], make_expert(tmp_path / "big", 1, K, "f" * 16, sample_size=16)])
    with pytest.raises(UsageError, match="in_channels"):
        DDMEnsemble.from_dirs(router, [experts[0], make_expert(tmp_path / "rgb", 1, K, "f" * 16, in_channels=3)])
    with pytest.raises(UsageError, match="flow"):
        DDMEnsemble.from_dirs(router, [experts[0], make_expert(tmp_path / "shift", 1, K, "f" * 16, flow=FlowConfig(shift=3.0).to_dict())])
    with pytest.raises(UsageError, match="num_classes"):
        DDMEnsemble.from_dirs(router, [experts[0], make_expert(tmp_path / "c5", 1, K, "f" * 16, num_classes=5)])
    with pytest.raises(UsageError, match="twice"):
        DDMEnsemble.from_dirs(router, [experts[0], experts[0]])
    with pytest.raises(UsageError, match="manifest_fingerprint"):
        DDMEnsemble.from_dirs(make_router(tmp_path / "rx", K, "0" * 16), experts)
    with pytest.raises(UsageError, match="unknown strategy 'best'"):
        DDMEnsemble.from_dirs(router, experts, "best")
    with pytest.raises(UsageError, match="1..4"):
        DDMEnsemble.from_dirs(router, experts, "topk:5")
    with pytest.raises(UsageError, match="not a router directory"):
        load_router(tmp_path / "nowhere")


def test_missing_or_corrupt_safetensors(dirs, tmp_path):
    import shutil

    _, router, experts = dirs
    broken = tmp_path / "broken"
    shutil.copytree(experts[1], broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UsageError, match="broken"):
        DDMEnsemble.from_dirs(router, [experts[0], broken])
    weights.unlink()
    with pytest.raises(UsageError, match="broken"):
        DDMEnsemble.from_dirs(router, [experts[0], broken])
    bad_router = tmp_path / "bad_router"
    shutil.copytree(router, bad_router)
    (bad_router / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="bad_router"):
        DDMEnsemble.from_dirs(bad_router, experts)
