"""Text DDM end to end on the captioned digits with tiny models: a router on p(k | x_t, t, text), the ensemble as a
drop-in PixArt, the diffusers-like TextDDMPipeline and its folder, `ddm sample --prompt/--prompts`, refusals."""
import json

import pytest
import torch
from diffusers import DiffusionPipeline

import router.text_pipeline
from ddm import UsageError
from frontends.cli import main
from router.ensemble import DDMEnsemble
from router.pipeline import ensemble_pipeline, load_pipeline
from router.text_pipeline import TextDDMPipeline

TRAIN = ["--modality", "text", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2"]
CLASS_TRAIN = ["--preset", "tiny", "--steps", "2", "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-ddm")
    assert main(["partition", "--data", "digits", "--k", "2", "--features", "text", "--out", str(root / "m")]) == 0
    for k in range(2):
        assert main(["train", "--manifest", str(root / "m"), "--island", str(k), "--out", str(root / f"e{k}"), *TRAIN]) == 0
    assert main(["train-router", "--manifest", str(root / "m"), "--experts", str(root / "e0"), str(root / "e1"),
                 "--out", str(root / "router"), "--steps", "20", "--batch-size", "32"]) == 0
    return root


def images(pipe, seed=0, **kw):
    return pipe(["a handwritten seven", "the digit one"], negative_prompt="", num_inference_steps=3, guidance_scale=2.0,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def test_router_reads_the_pooled_text(world):
    config = json.loads((world / "router" / "config.json").read_text())
    assert config["text_dim"] == 32 and config["num_classes"] is None
    pipe = ensemble_pipeline(world / "router", [world / "e0", world / "e1"], "top1")
    ensemble = pipe.transformer
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0)
    _, _, pooled = pipe.encode_prompt(["a handwritten seven", "the digit one"])
    with pytest.raises(UsageError, match="conditioned on text"):
        ensemble.router(x, t)
    swapped = ensemble.router(x, t, None, pooled.flip(0))
    assert not torch.allclose(ensemble.router(x, t, None, pooled), swapped)


def test_pipeline_call_like_diffusers_and_folder_round_trip(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    pipe = ensemble_pipeline(world / "router", [world / "e0", world / "e1"], "top1")
    assert isinstance(pipe, TextDDMPipeline) and isinstance(pipe.transformer, DDMEnsemble)
    pil = pipe("a handwritten seven", num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=3,
               generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 3 and pil[0].size == (8, 8)
    expected = images(pipe)
    assert expected.shape == (4, 1, 8, 8)
    weights = pipe.transformer.routing_weights
    assert len(weights) == 3 and weights[0].shape == (8, 2)
    assert torch.equal(weights[0][:4], weights[0][4:])  # the negative rows follow their prompt's routing
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "TextDDMPipeline" and index["transformer"] == ["router.ensemble", "DDMEnsemble"]
    assert index["text_encoder"][0] == "transformers" and not list(folder.rglob("*.bin"))
    for loaded in (TextDDMPipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, custom_pipeline=router.text_pipeline.__file__, trust_remote_code=True),
                   load_pipeline(folder)):
        assert type(loaded).__name__ == "TextDDMPipeline"
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(images(loaded), expected, rtol=0, atol=0)


def test_one_expert_ensemble_equals_the_expert(tmp_path):
    assert main(["partition", "--data", "digits", "--k", "1", "--features", "text", "--out", str(tmp_path / "m")]) == 0
    assert main(["train", "--manifest", str(tmp_path / "m"), "--island", "0", "--out", str(tmp_path / "e"), *TRAIN]) == 0
    assert main(["train-router", "--manifest", str(tmp_path / "m"), "--experts", str(tmp_path / "e"), "--out", str(tmp_path / "r"),
                 "--steps", "2"]) == 0
    single = load_pipeline(tmp_path / "e")
    assert isinstance(single, TextDDMPipeline) and type(single.transformer).__name__ == "PixArtTransformer2DModel"
    both = ensemble_pipeline(tmp_path / "r", [tmp_path / "e"], "top1")
    torch.testing.assert_close(images(both), images(single), rtol=0, atol=0)


def test_ddm_sample_with_prompts(world, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a handwritten seven\nthe digit one\n")
    out = tmp_path / "grid.png"
    assert main(["sample", "--router", str(world / "router"), "--experts", str(world / "e0"), str(world / "e1"),
                 "--prompts", str(tmp_path / "prompts.txt"), "--negative-prompt", "", "--n", "3", "--steps", "2",
                 "--cfg", "2.0", "--seed", "1", "--out", str(out)]) == 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["prompts"] == ["a handwritten seven", "the digit one"]
    assert [s["prompt"] for s in stats["samples"]] == [0, 0, 0, 1, 1, 1]
    assert len(stats["samples"][0]["experts"]) == 2
    from safetensors.torch import load_file

    saved = load_file(out.with_suffix(".safetensors"))
    assert saved["images"].shape == (6, 1, 8, 8) and saved["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_text_input_is_one_line_exit_2(world, tmp_path, capsys):
    experts = ["--experts", str(world / "e0"), str(world / "e1")]
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe seven")
    cases = [
        (["--router", str(world / "router"), *experts, "--prompts", str(tmp_path / "empty.txt")], "holds no prompt"),
        (["--router", str(world / "router"), *experts, "--prompts", str(tmp_path / "bad.txt")], "not UTF-8"),
        (["--router", str(world / "router"), *experts, "--classes", "3"], "--classes"),
    ]
    # a router trained without text, used with text experts
    assert main(["partition", "--data", "digits", "--k", "2", "--out", str(tmp_path / "cm")]) == 0
    assert main(["train", "--manifest", str(tmp_path / "cm"), "--island", "0", "--out", str(tmp_path / "c0"), *CLASS_TRAIN]) == 0
    assert main(["train", "--manifest", str(tmp_path / "cm"), "--island", "1", "--out", str(tmp_path / "c1"), *CLASS_TRAIN]) == 0
    assert main(["train-router", "--manifest", str(tmp_path / "cm"), "--experts", str(tmp_path / "c0"), str(tmp_path / "c1"),
                 "--out", str(tmp_path / "crouter"), "--steps", "2"]) == 0
    capsys.readouterr()
    cases.append((["--router", str(tmp_path / "crouter"), *experts, "--prompt", "a handwritten seven"], "trained without text"))
    cases.append((["--router", str(world / "router"), "--experts", str(world / "e0"), str(tmp_path / "c1"), "--prompt", "x"], "mixed conditioning"))
    from ddm.data.captions import digit_vocabulary
    from ddm.data.text_encoder import build_clip_encoder

    wide = build_clip_encoder(tmp_path / "wide", digit_vocabulary(), hidden_size=48)
    cases.append((["--router", str(world / "router"), *experts, "--prompt", "x", "--text-encoder", str(wide)], "hidden size 48"))
    for args, message in cases:
        out = tmp_path / "x.png"
        assert main(["sample", *args, "--steps", "1", "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and (message is None or message in err[0]), err
        assert not out.exists()
    with pytest.raises(UsageError, match="mixed conditioning"):
        DDMEnsemble.from_dirs(world / "router", [world / "e0", tmp_path / "c1"])


def test_app_images_tab_takes_a_prompt_for_a_text_ensemble(world, tmp_path):
    import gradio as gr

    from app_actions import Actions, AllowedRoots

    folder = world / "app" / "text-ensemble"
    ensemble_pipeline(world / "router", [world / "e0", world / "e1"], "top1").save_pretrained(folder)
    assert main(["train", "--manifest", str(world / "m"), "--island", "all", "--out", str(world / "app" / "monolith"), *TRAIN]) == 0
    actions = Actions(AllowedRoots([world]), tmp_path / "scratch")
    assert actions.ensemble_kind(str(folder)) and actions.ensemble_kind(str(world / "app" / "monolith")) is False
    common = dict(ensemble_dir=str(folder), strategy="top1", steps=2, cfg=2.0, seed=3, class_label="random", count=3)
    tiles, routing, monolith = actions.generate_images(**common, compare=True, monolith_dir=str(world / "app" / "monolith"),
                                                       prompt="a handwritten seven", negative_prompt="")
    assert len(tiles) == 3 and len(monolith) == 3
    assert all(caption.startswith("a handwritten seven · expert ") for _, caption in tiles)
    assert all(caption == "a handwritten seven · monolith" for _, caption in monolith)
    assert tiles[0][0].size == (8 * 20 + 8, 8 * 20 + 8 + 2 * 26)  # enlarged, framed, with the label bar
    with pytest.raises(gr.Error, match="enter a prompt"):
        actions.generate_images(**common, compare=False, monolith_dir="", prompt="  ")
