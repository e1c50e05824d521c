"""DDMPipeline: exactness of a one-expert ensemble, outputs, guidance, `ddm sample`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddm import UsageError
from frontends.cli import main as ddm_main
from ddm.models.experts import load_expert
from router.ensemble import DDMEnsemble
from router.pipeline import DDMPipeline, make_pipeline
from router.strategies import DEFAULT_STRATEGY, parse_strategy
from test_router_fixtures import make_ensemble_dirs, make_expert, make_router

STEPS = 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    router, experts = make_ensemble_dirs(root, 4, scale=30.0)
    return root, router, experts


def sample(transformer, labels, seed=0, cfg=1.5, output_type="pt"):
    pipe = make_pipeline(transformer)
    return pipe(labels, STEPS, cfg, torch.Generator().manual_seed(seed), output_type=output_type).images


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_one_expert_with_a_pass_through_router_is_exact(tmp_path, cfg):
    """K=1: the router's softmax is 1 for the only expert, so the ensemble must be the expert, bit for bit."""
    expert_dir = make_expert(tmp_path / "e0", 0, 1, "a" * 16)
    router_dir = make_router(tmp_path / "r", 1, "a" * 16)
    labels = [0, 3, 7, 9, 1]
    expert, _ = load_expert(expert_dir)
    direct = sample(expert, labels, cfg=cfg)
    for strategy in ("top1", "full", "sample:1", "threshold:0.5"):
        routed = sample(DDMEnsemble.from_dirs(router_dir, [expert_dir], strategy), labels, cfg=cfg)
        assert torch.equal(routed, direct), strategy
    assert not torch.equal(direct, sample(expert, labels, seed=1, cfg=cfg))


def test_output_types_and_bad_labels(dirs):
    _, router, experts = dirs
    ens = DDMEnsemble.from_dirs(router, experts)
    pt = sample(ens, [1, 2], output_type="pt")
    assert pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    arr = sample(ens, [1, 2], output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    pil = sample(ens, [1, 2], output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    for bad in ([10], [-1], [3, 11]):
        with pytest.raises(UsageError, match="class labels must be in 0..9"):
            sample(ens, bad)
    with pytest.raises(UsageError, match="output_type"):
        sample(ens, [1], output_type="jpg")


def test_routing_record_per_generation_and_sample_strategy_seeding(dirs):
    _, router, experts = dirs
    ens = DDMEnsemble.from_dirs(router, experts, "sample:1")
    a = sample(ens, [0, 1, 2, 3], seed=0)
    record_a = torch.stack(ens.routing_weights)
    assert record_a.shape == (STEPS, 8, 4)  # steps x (cond + uncond rows) x K, cleared per generation
    assert torch.equal(a, sample(ens, [0, 1, 2, 3], seed=0))
    assert torch.equal(record_a, torch.stack(ens.routing_weights))
    sample(ens, [0, 1, 2, 3], seed=5)
    assert not torch.equal(record_a, torch.stack(ens.routing_weights))


def test_pipeline_save_and_load(dirs, tmp_path):
    _, router, experts = dirs
    pipe = make_pipeline(DDMEnsemble.from_dirs(router, experts, "topk:2"))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DDMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.transformer, DDMEnsemble) and str(loaded.transformer.strategy) == "topk:2"
    loaded.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(pipe([4, 5], STEPS, 1.5, gen(), "pt").images, loaded([4, 5], STEPS, 1.5, gen(), "pt").images)


def test_ddm_sample_writes_grid_and_routing_statistics(dirs, tmp_path):
    _, router, experts = dirs
    out = tmp_path / "grid.png"
    args = ["sample", "--router", str(router), "--experts", *map(str, experts[:3]), "--n", "6", "--steps", "4", "--out", str(out),
            "--save-ensemble", str(tmp_path / "ens")]
    assert ddm_main(args) == 0
    saved_pipe = DDMPipeline.from_pretrained(tmp_path / "ens")  # a diffusers pipeline folder
    assert saved_pipe.transformer.islands == [0, 1, 2] and str(saved_pipe.transformer.strategy) == str(parse_strategy(DEFAULT_STRATEGY, 4))
    assert Image.open(out).size == (4 * (3 * 9 + 1), 4 * (2 * 9 + 1))
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["strategy"] == str(parse_strategy(DEFAULT_STRATEGY, 4)) and stats["islands_present"] == [0, 1, 2] and len(stats["steps"]) == 4
    assert [s["class"] for s in stats["samples"]] == [0, 1, 2, 3, 4, 5]
    for s in stats["samples"]:
        assert len(s["experts"]) == 4 and set(s["experts"]) <= {0, 1, 2} and len(s["experts_uncond"]) == 4
    for step in stats["steps"]:
        assert len(step["weights"]) == 6 and sum(step["samples_per_expert"]) == 6 and step["samples_per_expert"][3] == 0
    assert stats["steps"][0]["sigma"] == pytest.approx(1.0) and stats["steps"][-1]["sigma"] < stats["steps"][0]["sigma"]
    saved = load_file(str(out.with_suffix(".safetensors")))
    assert saved["images"].shape == (6, 1, 8, 8) and saved["labels"].tolist() == [0, 1, 2, 3, 4, 5]


def test_ddm_sample_bad_input_exits_2_and_writes_nothing(dirs, tmp_path, capsys):
    _, router, experts = dirs
    out = tmp_path / "grid.png"
    base = ["sample", "--router", str(router), "--experts", *map(str, experts), "--steps", "2", "--out", str(out)]
    for extra, message in [(["--strategy", "top9"], "top9"), (["--strategy", "magic"], "magic"), (["--classes", "12"], "12")]:
        assert ddm_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    assert ddm_main(["sample", "--ensemble", str(router), "--router", str(router), "--out", str(out)]) == 2
    assert ddm_main(["sample", "--router", str(router), "--experts", str(router), "--out", str(out)]) == 2
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_grid_with_one_column_per_class_is_labelled_and_sharp():
    from router.sample import image_grid

    images = torch.rand(20, 1, 8, 8)
    labels = torch.arange(20) % 10
    im = Image.open(__import__("io").BytesIO(image_grid(images, 8, columns=10, labels=labels)))
    assert im.size == (8 * (10 * 9 + 1), 8 * (2 * 9 + 1) + 14)  # 10 columns, 2 rows, a header row of labels
    header = torch.tensor(list(im.crop((0, 0, im.width, 14)).getdata()))
    assert header.max() > 200  # the class numbers are drawn
    cell = torch.tensor(list(im.crop((8, 14 + 8, 16, 14 + 16)).getdata()))
    assert cell.unique().numel() == 1  # nearest neighbour: one source pixel stays one flat 8x8 block
    plain = Image.open(__import__("io").BytesIO(image_grid(images, 8, columns=10, labels=torch.arange(20) % 7)))
    assert plain.size == (8 * (10 * 9 + 1), 8 * (2 * 9 + 1))  # columns mixing classes get no header
