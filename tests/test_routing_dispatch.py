"""How the rows run: grouped (sync-free, stacked experts) vs gather, and experts over several devices."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddm import UsageError
from frontends.cli import main as ddm_main
from router.ensemble import DDMEnsemble, parse_device_map
from test_router_fixtures import make_ensemble_dirs

K = 4
STRATEGIES = ["top1", "topk:2", "full", "sample:2", "trajectory", "trajectory:0.5:top1", "trajectory:0.5:full"]
# ops whose result the host must read (or whose output shape depends on values): each stalls a GPU stream
HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.unique_consecutive",
                 "aten._unique2", "aten.repeat_interleave", "aten.item", "aten.equal", "aten.is_nonzero"}


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        bool_index = name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in HOST_SYNC_OPS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    return make_ensemble_dirs(root, K, num_classes=10, scale=30.0)


def batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 1000, torch.randint(0, 11, (n,), generator=g)


def run_steps(ens, x, y, timesteps=(1000.0, 700.0, 300.0), pairs=0):
    ens.reset_routing(torch.Generator().manual_seed(0), guidance_pairs=pairs)
    with torch.no_grad():
        return torch.stack([ens(x, torch.full((len(x),), t), y).sample for t in timesteps])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grouped_matches_gather(dirs, strategy):
    x, _, y = batch()
    grouped = DDMEnsemble.from_dirs(*dirs, strategy, dispatch="grouped")
    gather = DDMEnsemble.from_dirs(*dirs, strategy, dispatch="gather")
    for pairs in (0, 12):
        out = run_steps(grouped, x, y, pairs=pairs)
        torch.testing.assert_close(out, run_steps(gather, x, y, pairs=pairs), rtol=1e-4, atol=1e-5)
        assert torch.equal(torch.stack(grouped.routing_weights), torch.stack(gather.routing_weights))
    assert grouped.grouped is not None and gather.grouped is None


@pytest.mark.parametrize("strategy", ["top1", "topk:2", "trajectory", "trajectory:0.5:top1", "full"])
def test_grouped_steps_never_wait_for_the_host(dirs, strategy):
    x, t, y = batch()
    ens = DDMEnsemble.from_dirs(*dirs, strategy, dispatch="grouped")
    ens.reset_routing(torch.Generator().manual_seed(0), guidance_pairs=12)
    with torch.no_grad():
        ens(x, t, y)  # builds the stacks (once, not inside a step)
        with HostSyncs() as mode:
            for step in range(3):
                ens(x, torch.full((24,), 900.0 - 300 * step), y)
    assert mode.seen == [], mode.seen
    gather = DDMEnsemble.from_dirs(*dirs, strategy, dispatch="gather")
    with torch.no_grad(), HostSyncs() as mode:  # the detector does see the gather path's host reads
        gather(x, t, y)
    assert "aten._local_scalar_dense" in mode.seen or "aten.nonzero" in mode.seen


def test_grouped_experts_share_the_stacked_weights_and_follow_changes(dirs, tmp_path):
    x, t, y = batch()
    ens = DDMEnsemble.from_dirs(*dirs, "top1", dispatch="grouped")
    with torch.no_grad():
        before = ens(x, t, y).sample
    for name, p0 in ens.experts[0].named_parameters():  # each expert's weight is a slice of one stack: no copy
        p3 = dict(ens.experts[3].named_parameters())[name]
        assert p0.untyped_storage().data_ptr() == p3.untyped_storage().data_ptr(), name
    ens.save_pretrained(tmp_path / "ens")
    loaded = DDMEnsemble.from_pretrained(tmp_path / "ens")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, before, rtol=1e-4, atol=1e-5)
        for expert in ens.experts:  # replacing weights (not in place) makes the ensemble restack
            expert.proj_out_2.weight.data = expert.proj_out_2.weight.data * 3
        after = ens(x, t, y).sample
        gather = DDMEnsemble.from_dirs(*dirs, "top1", dispatch="gather")
        for expert in gather.experts:
            expert.proj_out_2.weight.data = expert.proj_out_2.weight.data * 3
        torch.testing.assert_close(after, gather(x, t, y).sample, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before)


def test_threshold_and_auto_on_a_cpu_use_gather(dirs):
    x, t, y = batch()
    with torch.no_grad():
        auto = DDMEnsemble.from_dirs(*dirs, "top1")
        auto(x, t, y)
        threshold = DDMEnsemble.from_dirs(*dirs, "threshold:0.2", dispatch="grouped")
        threshold(x, t, y)
    assert auto.grouped is None and threshold.grouped is None
    with pytest.raises(UsageError, match="dispatch 'fast'"):
        DDMEnsemble.from_dirs(*dirs, "top1", dispatch="fast")


def test_device_map_places_experts_and_rows_travel(dirs):
    x, t, y = batch()
    plain = DDMEnsemble.from_dirs(*dirs, "topk:2")
    for device_map in (["cpu"] * K, {0: "cpu", 2: "cpu"}, "cpu,cpu,cpu,cpu", "1=cpu,3=cpu"):
        mapped = DDMEnsemble.from_dirs(*dirs, "topk:2", device_map=device_map)
        assert all(next(e.parameters()).device.type == "cpu" for e in mapped.experts)
        with torch.no_grad():
            assert torch.equal(mapped(x, t, y).sample, plain(x, t, y).sample)
    router, experts = dirs
    subset = DDMEnsemble.from_dirs(router, [experts[1], experts[3]], "top1", device_map="cpu,cpu")
    assert subset.islands == [1, 3]
    assert parse_device_map("1=cpu", [1, 3]) == {1: torch.device("cpu"), 3: torch.device("cpu")}


@pytest.mark.parametrize("device_map, message", [
    ("cuda:7", "not present"), ("cpu,cuda:3,cpu,cpu", "'cuda:3' is not present"), ({5: "cpu"}, "island 5"),
    ("0=cpu,9=cpu", "island 9"), ("cpu,cpu", "2 device"), ("tpu:0", "'tpu:0'"), ("gpu", "'gpu'"), ("0=cpu,cpu", "not both"),
    ("x=cpu", "'x'"),
])
def test_bad_device_maps(dirs, device_map, message):
    with pytest.raises(UsageError, match=message) as e:
        DDMEnsemble.from_dirs(*dirs, "top1", device_map=device_map)
    assert "\n" not in str(e.value)


def test_ddm_sample_expert_devices(dirs, tmp_path, capsys):
    router, experts = dirs
    out = tmp_path / "grid.png"
    base = ["sample", "--router", str(router), "--experts", *map(str, experts[:2]), "--n", "4", "--steps", "2", "--out", str(out)]
    assert ddm_main(base + ["--expert-devices", "cpu,cpu"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["islands_present"] == [0, 1]
    assert ddm_main(base + ["--expert-devices", "0=cpu,3=cuda:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "island 3" in err and "\n" not in err


def test_grouped_sampling_keeps_the_experts_ordinary_tensors(dirs):
    """The pipeline runs under inference_mode; the stacks built there must not turn the experts' weights into
    inference tensors (which could then no longer be trained or saved for backward)."""
    from router.pipeline import make_pipeline

    ens = DDMEnsemble.from_dirs(*dirs, "trajectory:0.5:top1", dispatch="grouped")
    gather = DDMEnsemble.from_dirs(*dirs, "trajectory:0.5:top1", dispatch="gather")
    run = lambda e: make_pipeline(e)([1, 2, 3], 4, 1.5, torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(run(ens), run(gather), rtol=1e-4, atol=1e-5)
    assert ens.grouped is not None
    assert not any(p.is_inference() for p in ens.experts.parameters())
