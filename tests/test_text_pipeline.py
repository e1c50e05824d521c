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

    from app_actions import Actions
    from frontends.app_inputs import AllowedRoots

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


def tiny_clip(path):
    """A tiny random CLIPModel + CLIPProcessor (word tokenizer of the digit captions), saved offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ddm.data.captions import digit_vocabulary
    from ddm.data.text_encoder import word_tokenizer

    tokenizer = word_tokenizer(digit_vocabulary(), 16, bos=True)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


def test_eval_prompted_samples_clip_score_and_grids(world, tmp_path, capsys):
    from evaluation.text_metrics import clip_cosines, clip_scores

    clip = tiny_clip(tmp_path / "clip")
    pipe_dir = tmp_path / "pipe"
    ensemble_pipeline(world / "router", [world / "e0", world / "e1"], "top1").save_pretrained(pipe_dir)
    (tmp_path / "p.txt").write_text("a handwritten seven\nthe digit one\n")
    out = tmp_path / "m.json"
    assert main(["eval", "--ensemble", str(pipe_dir), "--prompts", str(tmp_path / "p.txt"), "--n", "6", "--steps", "2",
                 "--clip-model", str(clip), "--grids", str(tmp_path / "grids"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == ["a handwritten seven", "the digit one"] and result["num_samples"] == 6
    assert 0 <= result["clip_score"] <= 100 and len(result["clip_score_per_prompt"]) == 2
    assert "accuracy" in result and len(result["per_class_accuracy"]) == 10  # prompts name digits: 7 and 1
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["00-a-handwritten-seven.png", "01-the-digit-one.png"]
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    texts = ["a handwritten seven", "the digit one", "the digit two", "a handwritten zero"]
    cosines = clip_cosines(images, texts, clip)
    torch.testing.assert_close(clip_scores(images, texts, clip), 100 * cosines.clamp_min(0))
    assert not torch.allclose(cosines, clip_cosines(images, texts[::-1], clip))  # each image is scored against its own text
    torch.testing.assert_close(clip_cosines(images[1:2], texts[1:2], clip), cosines[1:2])
    assert main(["eval", "--ensemble", str(pipe_dir), "--n", "4", "--steps", "1"]) == 2
    assert "text-conditional: give --prompts" in capsys.readouterr().err
