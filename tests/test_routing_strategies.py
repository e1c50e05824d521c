"""Trajectory and hybrid routing on tiny DiT experts, and the guidance routing rule (both rows of a sample)."""
import json

import pytest
import torch

from ddm import UsageError
from frontends.cli import main as ddm_main
from router.ensemble import DDMEnsemble
from router.pipeline import make_pipeline
from router.strategies import DEFAULT_GUIDANCE_ROUTING
from test_router_fixtures import make_ensemble_dirs

K = 4
STEPS = 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A class-conditional router whose logits spread rows over all experts."""
    root = tmp_path_factory.mktemp("strategies")
    router, experts = make_ensemble_dirs(root, K, num_classes=10, scale=30.0)
    return router, experts


def record(ens) -> torch.Tensor:
    return torch.stack(ens.routing_weights)  # steps, rows, K


def sample(ens, labels, seed=0, cfg=1.5, **kwargs):
    pipe = make_pipeline(ens)
    return pipe(labels, STEPS, cfg, torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def test_trajectory_keeps_each_samples_draw_and_replays_from_the_seed(dirs):
    ens = DDMEnsemble.from_dirs(*dirs, "trajectory")
    labels = list(range(10)) * 3
    images = sample(ens, labels, seed=0)
    w = record(ens)
    assert ((w == 0) | (w == 1)).all() and torch.equal(w.sum(-1), torch.ones(STEPS, 60))
    assert (w == w[0]).all(), "every step must use the expert drawn at the first"
    assert len(set(w[0, :30].argmax(1).tolist())) >= 2
    assert torch.equal(images, sample(ens, labels, seed=0)) and torch.equal(w, record(ens))
    sample(ens, labels, seed=1)
    assert not torch.equal(w, record(ens))


def test_trajectory_draws_from_the_router_at_the_first_step(dirs):
    ens = DDMEnsemble.from_dirs(*dirs, "trajectory")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 1, 8, 8, generator=g).expand(3000, -1, -1, -1), torch.full((3000,), 3)
    t = torch.full((3000,), 1000.0)
    ens.reset_routing(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ens(x, t, y)
        probs = ens.router(x[:1], t[:1], y[:1]).softmax(1)[0]
    freq = ens.routing_weights[-1].mean(0)
    assert torch.allclose(freq, probs, atol=0.03), (freq, probs)
    with pytest.raises(UsageError, match="reset_routing"):
        ens(x[:5], t[:5], y[:5])


def test_the_hybrid_hands_over_below_its_sigma(dirs):
    ens = DDMEnsemble.from_dirs(*dirs, "trajectory:0.5:top1")
    top1 = DDMEnsemble.from_dirs(*dirs, "top1")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    ens.reset_routing(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (1000.0, 800.0, 500.0, 499.0, 200.0, 700.0):
            ens(x, torch.full((40,), t), y)
            top1(x, torch.full((40,), t), y)
    drawn, w, routed = ens.routing_weights[0], record(ens), record(top1)
    for i, t in enumerate((1000.0, 800.0, 500.0, 499.0, 200.0, 700.0)):
        expected = drawn if t >= 500 else routed[i]
        assert torch.equal(w[i], expected), t
    assert not torch.equal(routed[3], drawn)  # the hand-over changes the routing of some rows
    mixed = torch.tensor([900.0] * 20 + [100.0] * 20)  # per-row sigmas: each row on its own side of the hand-over
    with torch.no_grad():
        ens(x, mixed, y)
        top1(x, mixed, y)
    assert torch.equal(ens.routing_weights[-1][:20], drawn[:20])
    assert torch.equal(ens.routing_weights[-1][20:], top1.routing_weights[-1][20:])


@pytest.mark.parametrize("strategy", ["top1", "trajectory", "trajectory:0.5:top1", "full", "topk:2"])
def test_guided_rows_of_a_sample_share_their_routing_by_default(dirs, strategy):
    """The chosen rule: a sample's null-label row uses its conditional row's weights at every step."""
    assert DEFAULT_GUIDANCE_ROUTING == "conditional"
    ens = DDMEnsemble.from_dirs(*dirs, strategy)
    labels = list(range(10)) * 2
    sample(ens, labels)
    w = record(ens)
    assert w.shape == (STEPS, 40, K) and torch.equal(w[:, :20], w[:, 20:])
    sample(ens, labels, cfg=1.0)  # without guidance there is one row per sample
    assert record(ens).shape == (STEPS, 20, K)


@pytest.mark.parametrize("strategy", ["top1", "trajectory"])
def test_per_row_guidance_routes_the_null_label_rows_alone(dirs, strategy):
    ens = DDMEnsemble.from_dirs(*dirs, strategy)
    labels = list(range(10)) * 2
    shared = sample(ens, labels)
    alone = sample(ens, labels, guidance_routing="per-row")
    w = record(ens)
    assert not torch.equal(w[:, :20], w[:, 20:]), "a class-conditional router routes the null-label rows differently"
    assert not torch.equal(shared, alone)
    with pytest.raises(UsageError, match="guidance routing 'both'"):
        sample(ens, labels, guidance_routing="both")
    ens.reset_routing(guidance_pairs=3)
    with pytest.raises(UsageError, match="3 guided samples"):
        ens(torch.zeros(5, 1, 8, 8), torch.full((5,), 500.0), torch.zeros(5, dtype=torch.long))


def test_ddm_sample_new_strategies_and_bad_input(dirs, tmp_path, capsys):
    router, experts = dirs
    out = tmp_path / "grid.png"
    base = ["sample", "--router", str(router), "--experts", *map(str, experts), "--n", "6", "--steps", "3", "--out", str(out)]
    assert ddm_main(base + ["--strategy", "trajectory:0.4:full", "--guidance-routing", "per-row"]) == 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["strategy"] == "trajectory:0.4:full" and stats["guidance_routing"] == "per-row"
    assert ddm_main(base + ["--strategy", "trajectory"]) == 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["guidance_routing"] == "conditional"
    for s in stats["samples"]:
        assert len(set(s["experts"])) == 1 and s["experts_uncond"] == s["experts"]
    out.unlink()
    for extra, message in [(["--strategy", "trajectory:1.2:top1"], "'1.2'"), (["--strategy", "trajectory:0.5:best"], "best"),
                           (["--guidance-routing", "both"], "both")]:
        assert ddm_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()
