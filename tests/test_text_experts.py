"""Text-conditional experts: PixArt presets, `ddm train --modality text` on the captioned digits, caption dropout to
the empty caption, and `ddm partition --features text`."""
import json

import pytest
import torch

from ddm import UsageError
from ddm.data.text_encoder import DIGIT_ENCODER, TextEncoder
from ddm.models.experts import build_text_expert, load_expert
from ddm.partition.manifest import Manifest
from frontends.cli import main

TRAIN = ["--modality", "text", "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "3"]


def test_preset_sizes_reach_pixart_xl():
    with torch.device("meta"):
        tiny = build_text_expert("tiny", 8, 1, 32)
        xl = build_text_expert("DiT-XL/2", 32, 4, 4096)  # PixArt-α XL/2 on SD-VAE latents of 256px images, T5-XXL states
    assert sum(p.numel() for p in tiny.parameters()) < 200_000
    assert 590e6 < sum(p.numel() for p in xl.parameters()) < 640e6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-experts")
    assert main(["partition", "--data", "digits", "--k", "2", "--features", "text", "--out", str(root / "m")]) == 0
    assert main(["train", "--manifest", str(root / "m"), "--island", "0", "--out", str(root / "e0"), *TRAIN]) == 0
    return root


def test_text_partition_keeps_each_caption_on_one_island(trained):
    from ddm.data.images import DigitsDataset

    manifest = Manifest.load(trained / "m")
    assert manifest.extractor.startswith("text:clip:")
    captions = DigitsDataset().captions()
    island_of = {}
    for caption, island in zip(captions, manifest.assignments.tolist()):
        assert island_of.setdefault(caption, island) == island
    assert set(island_of.values()) == {0, 1}


def test_text_expert_is_a_pixart_with_its_text_encoder_recorded(trained):
    model, meta = load_expert(trained / "e0")
    assert type(model).__name__ == "PixArtTransformer2DModel"
    assert meta["conditioning"] == "text" and meta["num_classes"] == 0
    assert meta["text_encoder"]["hash"] == TextEncoder(DIGIT_ENCODER).hash
    assert model.config.caption_channels == meta["text_encoder"]["hidden_size"] == 32
    hidden, mask, _ = TextEncoder(DIGIT_ENCODER).encode(["a handwritten seven", ""])
    out = model(torch.randn(2, 1, 8, 8), encoder_hidden_states=hidden, timestep=torch.tensor([500.0, 500.0]),
                encoder_attention_mask=mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    log = [json.loads(line) for line in (trained / "e0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_caption_dropout_uses_the_empty_captions_embedding(trained):
    import argparse

    from ddm.training.text_modality import TextModality

    args = argparse.Namespace(preset="tiny", patch_size=None, text_encoder=None, allow_empty_captions=False)
    modality = TextModality(Manifest.load(trained / "m"), args)
    batch = modality.dataset(torch.arange(4)).__getitems__([0, 1, 2, 3])
    _, (hidden, mask) = modality.training_pair(batch, torch.device("cpu"), lambda shape: torch.zeros(4, *shape))
    dropped, dropped_mask = modality.drop_condition((hidden, mask), torch.tensor([True, False, True, False]))
    empty_hidden, empty_mask, _ = TextEncoder(DIGIT_ENCODER).encode([""])
    torch.testing.assert_close(dropped[0], empty_hidden[0].half().float())
    assert torch.equal(dropped[1], hidden[1]) and torch.equal(dropped_mask[2], empty_mask[0])
    assert not torch.equal(dropped[0], hidden[0])


def test_text_modality_needs_captions_and_an_encoder_that_exists(tmp_path, trained, capsys):
    code = main(["train", "--manifest", str(trained / "m"), "--island", "1", "--out", str(tmp_path / "e"), *TRAIN,
                 "--text-encoder", str(tmp_path / "nowhere")])
    assert code == 2 and "text encoder folder not found" in capsys.readouterr().err and not (tmp_path / "e").exists()
    code = main(["train", "--manifest", str(trained / "m"), "--island", "1", "--out", str(tmp_path / "e"), "--preset", "tiny",
                 "--text-encoder", str(DIGIT_ENCODER)])
    assert code == 2 and "go with --modality text" in capsys.readouterr().err and not (tmp_path / "e").exists()
    with pytest.raises(UsageError, match="goes with --features text"):
        from ddm.partition.features import extract_features

        extract_features("pixels-pca", None, text_encoder=str(DIGIT_ENCODER))


def test_latent_cache_with_t5_captions_end_to_end(tmp_path):
    """Captioned images -> `ddm encode` (VAE + T5) -> text partition -> PixArt experts on latents -> router ->
    TextDDMPipeline that decodes with the experts' VAE, saved and loaded as a folder."""
    from ddm.data.text_encoder import build_t5_encoder
    from router.pipeline import load_pipeline
    from test_latents import save_vae
    from test_text_data import WORDS, make_images

    root = make_images(tmp_path / "imgs", 8)
    for i in range(8):
        (root / f"{i:02d}.txt").write_text(["a red square", "a blue circle"][i % 2])
    t5 = build_t5_encoder(tmp_path / "t5", WORDS, max_length=8)
    vae = save_vae(tmp_path / "vae", 0)
    assert main(["encode", "--data", str(root), "--vae", str(vae), "--image-size", "16", "--workers", "0", "--text-encoder", str(t5),
                 "--out", str(tmp_path / "lat")]) == 0
    assert main(["partition", "--data", str(tmp_path / "lat"), "--k", "2", "--features", "text", "--out", str(tmp_path / "m")]) == 0
    manifest = Manifest.load(tmp_path / "m")
    assert manifest.extractor.startswith("text:t5:") and manifest.sizes == [4, 4]  # the two captions, one island each
    experts = []
    for k in range(2):
        experts.append(tmp_path / f"e{k}")
        assert main(["train", "--manifest", str(tmp_path / "m"), "--island", str(k), "--out", str(experts[-1]), *TRAIN]) == 0
    assert main(["train-router", "--manifest", str(tmp_path / "m"), "--experts", *map(str, experts), "--out", str(tmp_path / "r"),
                 "--steps", "3"]) == 0
    out = tmp_path / "grid.png"
    assert main(["sample", "--router", str(tmp_path / "r"), "--experts", *map(str, experts), "--prompt", "a red square",
                 "--prompt", "a blue circle", "--n", "2", "--steps", "2", "--out", str(out), "--save-ensemble", str(tmp_path / "pipe")]) == 0
    pipe = load_pipeline(tmp_path / "pipe")
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel" and pipe.vae is not None
    images = pipe("a red square", num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (16, 16)  # latents 4x8x8 decoded by the VAE to 16x16 pixels


def test_image_folder_experts_and_changed_captions(tmp_path, capsys):
    """A captioned image folder trains text experts in pixel space (captions embedded at start-up); a router trained
    after a caption changed is refused."""
    from ddm.data.text_encoder import build_clip_encoder
    from test_text_data import WORDS, make_images

    root = make_images(tmp_path / "imgs", 6)
    for i in range(6):
        (root / f"{i:02d}.txt").write_text(["a red square", "a blue circle", "a big photo"][i % 3])
    clip = str(build_clip_encoder(tmp_path / "clip", WORDS, max_length=8))
    assert main(["partition", "--data", str(root), "--image-size", "8", "--k", "2", "--features", "text", "--text-encoder", clip,
                 "--out", str(tmp_path / "m")]) == 0
    experts = [str(tmp_path / f"e{k}") for k in range(2)]
    for k, out in enumerate(experts):
        assert main(["train", "--manifest", str(tmp_path / "m"), "--island", str(k), "--out", out, *TRAIN, "--text-encoder", clip]) == 0
    _, meta = load_expert(experts[0])
    assert meta["channels"] == 3 and meta["text_encoder"]["hash"] == TextEncoder(clip).hash
    (root / "00.txt").write_text("a small square")
    capsys.readouterr()
    assert main(["train-router", "--manifest", str(tmp_path / "m"), "--experts", *experts, "--out", str(tmp_path / "r"), "--steps", "2"]) == 2
    assert "captions of" in capsys.readouterr().err and not (tmp_path / "r").exists()
