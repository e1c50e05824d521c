"""`ddm train --modality video`: moving-digit clips partitioned into islands, a Wan expert + prompt encoder
trained by the island trainer, read back by the expert loader and by DualParal."""
import json

import pytest
import torch

from frontends.cli import main

SPEC = "moving-digits:size=12,frames=4,clips=48"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    assert main(["partition", "--data", SPEC, "--k", "2", "--features", "clip-params", "--out", str(root / "manifest")]) == 0
    assert main(["train", "--manifest", str(root / "manifest"), "--island", "0", "--out", str(root / "expert"),
                 "--modality", "video", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--log-every", "1"]) == 0
    return root


def test_partition_of_clips_follows_their_features(trained):
    from ddm.partition.manifest import Manifest
    from ddm.data.moving_digits import load_video_dataset

    manifest = Manifest.load(trained / "manifest")
    data = load_video_dataset(SPEC)
    assert manifest.data == SPEC and manifest.data_fingerprint == data.fingerprint and manifest.extractor == "clip-params"
    features = data.features()
    centroids = manifest.centroids
    nearest = torch.cdist(features, centroids).argmin(1)
    assert torch.equal(nearest, manifest.assignments)  # k-means: every clip sits on its nearest centroid


def test_expert_directory_holds_wan_and_prompt_encoder(trained):
    from diffusers import WanTransformer3DModel

    from ddm.models.experts import load_expert
    from ddm.models.prompt_encoder import PromptEncoder

    expert = trained / "expert"
    model, meta = load_expert(expert)
    assert isinstance(model, WanTransformer3DModel) and meta["modality"] == "video"
    assert (meta["frames"], meta["size"], meta["channels"]) == (4, 12, 1)
    ema = PromptEncoder.from_pretrained(expert / "prompt_encoder")
    raw = PromptEncoder.from_pretrained(expert / "raw" / "prompt_encoder")
    assert model.config.text_dim == ema.config.dim
    assert not torch.equal(ema.token_embedding.weight, raw.token_embedding.weight)  # EMA view vs raw weights
    with torch.inference_mode():
        v = model(torch.randn(1, 1, 4, 12, 12), timestep=torch.tensor([500.0]), encoder_hidden_states=ema.encode(["a 4 bouncing"])).sample
    assert v.shape == (1, 1, 4, 12, 12) and torch.isfinite(v).all()
    assert len((expert / "metrics.jsonl").read_text().splitlines()) == 2


def test_prompt_dropout_gives_the_null_embedding(trained):
    from argparse import Namespace

    from ddm.partition.manifest import Manifest
    from ddm.training.video_modality import VideoModality

    modality = VideoModality(Manifest.load(trained / "manifest"), Namespace(preset="tiny"))
    torch.manual_seed(0)
    net = modality.build("tiny").eval()
    clips, ids, labels = next(iter(torch.utils.data.DataLoader(modality.dataset(torch.arange(4)), batch_size=4)))
    assert clips.shape == (4, 1, 4, 12, 12) and ids.shape == (4, 8)
    dropped = modality.drop_condition(ids, torch.tensor([True, False, True, False]))
    with torch.inference_mode():
        text = net.prompt_encoder(dropped)
    assert torch.equal(text[0], net.prompt_encoder.null_embedding) and torch.equal(text[2], text[0])
    assert torch.equal(dropped[1], ids[1])


def test_dualparal_renders_the_trained_expert(trained, tmp_path):
    from parallel_infer.api import render_video

    record = render_video(trained / "expert", "a 4 moving left", tmp_path / "v.mp4", frames=13, steps=2, block=3, cat=1, cfg=2.0)
    assert record["frames_written"] == 13 and (tmp_path / "v.mp4").is_file()
    out = tmp_path / "m.json"
    assert main(["eval-video", str(tmp_path / "v.mp4"), "--out", str(out)]) == 0  # prompt and blocks from the sidecar
    r = json.loads(out.read_text())["results"][0]
    assert r["prompt"] == "a 4 moving left" and (r["block"], r["first_block"]) == (3, 4) and r["seam"] is not None


@pytest.mark.parametrize("spec, preset, message", [
    ("moving-digits:size=13,frames=4,clips=8", "tiny", "not divisible by the patch size"),
    ("moving-digits:size=12,frames=4,clips=8", "huge", "unknown video preset"),
])
def test_bad_canvas_or_preset_fails_before_training(tmp_path, capsys, spec, preset, message):
    assert main(["partition", "--data", spec, "--k", "1", "--random", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    rc = main(["train", "--manifest", str(tmp_path / "m"), "--island", "0", "--out", str(tmp_path / "e"),
               "--modality", "video", "--preset", preset, "--steps", "1", "--batch-size", "2"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_init_from_starts_at_the_experts_ema_weights(trained, tmp_path):
    from safetensors.torch import load_file

    from ddm.io import sha256_file

    source = trained / "expert"
    out = tmp_path / "tuned"
    assert main(["train", "--manifest", str(trained / "manifest"), "--island", "1", "--out", str(out), "--init-from", str(source),
                 "--modality", "video", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--lr", "1e-9"]) == 0
    for rel in ["diffusion_pytorch_model.safetensors", "prompt_encoder/diffusion_pytorch_model.safetensors"]:
        theirs, ours = load_file(source / rel), load_file(out / "raw" / rel)
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)  # one step at lr 1e-9 from their EMA
    meta = json.loads((out / "expert.json").read_text())
    assert meta["init_from"]["path"] == str(source.resolve()) and meta["init_from"]["step"] == 2
    assert meta["init_from"]["files"] == meta["train_config"]["init_from"] and len(meta["init_from"]["files"]) == 2
    assert all(digest == sha256_file(source / rel) for rel, digest in meta["init_from"]["files"].items())
    # a resume must start from the same weights: without --init-from the run's config differs
    rc = main(["train", "--manifest", str(trained / "manifest"), "--island", "1", "--out", str(out),
               "--modality", "video", "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--lr", "1e-9"])
    assert rc == 2


@pytest.mark.parametrize("preset, source, message", [
    ("small", "expert", "its denoiser has attention_head_dim=12, this run builds attention_head_dim=16"),
    ("tiny", "manifest", "not an expert folder"),
])
def test_init_from_another_architecture_fails_before_training(trained, tmp_path, capsys, preset, source, message):
    capsys.readouterr()
    rc = main(["train", "--manifest", str(trained / "manifest"), "--island", "0", "--out", str(tmp_path / "e"),
               "--init-from", str(trained / source), "--modality", "video", "--preset", preset, "--steps", "1", "--batch-size", "2"])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
