"""Captioned data: both caption conventions, missing captions, the digit captions, tiny random CLIP and T5 encoders
built offline in temp folders, `ddm encode --text-encoder` caching sequence and pooled embeddings, prompt files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddm import UsageError
from ddm.data.captions import digit_captions, folder_captions, read_prompts_file
from ddm.data.images import ImageFolderDataset
from ddm.data.text_encoder import DIGIT_ENCODER, TextEncoder, build_clip_encoder, build_t5_encoder
from frontends.cli import main
from test_latents import save_vae

WORDS = "a red blue square circle photo of the big small".split()


def make_images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"clip": build_clip_encoder(root / "clip", WORDS, max_length=8), "t5": build_t5_encoder(root / "t5", WORDS, max_length=8)}


def test_sidecar_and_metadata_captions_and_missing_ones(tmp_path):
    root = make_images(tmp_path / "imgs", 4)
    (root / "00.txt").write_text("  a red square \n")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "01.png", "text": "a blue circle"}) + "\n"
                                         + json.dumps({"file_name": "00.png", "text": "overridden by the sidecar"}) + "\n")
    data = ImageFolderDataset(root, 16)
    with pytest.raises(UsageError, match=r"2 of 4 images .* no caption.*02\.png, 03\.png.*--allow-empty-captions"):
        data.captions()
    assert data.captions(allow_empty=True) == ["a red square", "a blue circle", "", ""]
    (root / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(UsageError, match="metadata.jsonl:1: not JSON"):
        folder_captions(root, data.files)


def test_digit_captions_name_the_class_in_several_phrasings():
    captions = digit_captions(torch.tensor([7, 7, 7, 7, 0]))
    assert all("seven" in c for c in captions[:4]) and len(set(captions[:4])) == 4 and "zero" in captions[4]


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_tiny_encoders_load_and_encode(encoders, kind):
    enc = TextEncoder(encoders[kind])
    assert (enc.kind, enc.hidden_size, enc.max_length) == (kind, 32, 8)
    hidden, mask, pooled = enc.encode(["a red square", "", "a blue circle"])
    assert hidden.shape == (3, 8, 32) and pooled.shape == (3, 32)
    assert mask.sum(1).tolist() == ([5, 2, 5] if kind == "clip" else [4, 1, 4])  # <s> ... </s> vs ... </s>
    assert (pooled[0] - pooled[2]).abs().max() > 1e-3  # captions stay apart
    again = TextEncoder(encoders[kind]).encode(["a red square"])
    torch.testing.assert_close(again[2], pooled[:1])


def test_long_prompt_is_truncated_with_one_warning(encoders, capsys):
    enc = TextEncoder(encoders["clip"])
    long = "a " + "big " * 20 + "square"
    hidden, mask, _ = enc.encode([long, long])
    enc.encode([long])
    assert mask.sum(1).tolist() == [8, 8]
    assert capsys.readouterr().err.count("is truncated") == 1


def test_embedded_digit_encoder_ships_and_groups_captions_by_digit():
    """Trained like CLIP on the digits (ddm/data/digit_encoder.py): two phrasings of one digit embed closer than the
    same phrasing of two digits."""
    enc = TextEncoder(DIGIT_ENCODER)
    captions = digit_captions(torch.arange(10).repeat_interleave(4))  # 4 phrasings per digit
    pooled = torch.nn.functional.normalize(enc.encode(captions)[2], dim=1)
    cos = pooled @ pooled.T
    same = torch.arange(40)[:, None] // 4 == torch.arange(40)[None] // 4
    assert cos[same & ~torch.eye(40, dtype=torch.bool)].mean() > cos[~same].mean() + 0.5


def test_encode_caches_caption_embeddings_beside_the_latents(tmp_path, encoders):
    root = make_images(tmp_path / "imgs", 5)
    for i in range(5):
        (root / f"{i:02d}.txt").write_text(["a red square", "a blue circle", "a big photo"][i % 3])
    vae = save_vae(tmp_path / "vae", 0)
    base = ["encode", "--data", str(root), "--vae", str(vae), "--image-size", "16", "--flip", "--batch-size", "2",
            "--shard-size", "3", "--workers", "0", "--text-encoder", str(encoders["t5"])]
    assert main([*base, "--out", str(tmp_path / "lat")]) == 0
    from ddm.data import load_dataset

    table = load_dataset(str(tmp_path / "lat")).text_table()
    enc = TextEncoder(encoders["t5"])
    captions = ImageFolderDataset(root, 16).captions()
    hidden, mask, pooled = enc.encode([c for c in captions for _ in range(2)])  # image i, then its mirror image
    assert table.hidden.shape == (10, 8, 32) and table.hidden.dtype == torch.float16
    torch.testing.assert_close(table.hidden.float(), hidden, atol=2e-3, rtol=2e-3)
    assert torch.equal(table.mask, mask)
    torch.testing.assert_close(table.pooled, pooled)
    torch.testing.assert_close(table.empty_pooled, enc.encode([""])[2])
    assert table.record["hash"] == enc.hash and table.record["kind"] == "t5"
    # the same cache, encoded again with another text encoder, is refused; nothing is overwritten
    before = {p.name: p.read_bytes() for p in (tmp_path / "lat").iterdir()}
    assert main([*base[:-1], str(encoders["clip"]), "--out", str(tmp_path / "lat")]) == 2
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "lat").iterdir()}


def test_missing_captions_fail_encode_before_any_write(tmp_path, encoders, capsys):
    root = make_images(tmp_path / "imgs", 3)
    vae = save_vae(tmp_path / "vae", 0)
    args = ["encode", "--data", str(root), "--vae", str(vae), "--image-size", "16", "--workers", "0",
            "--text-encoder", str(encoders["clip"]), "--out", str(tmp_path / "lat")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 3 images" in err[0] and "00.png" in err[0]
    assert not (tmp_path / "lat").exists()
    assert main([*args, "--allow-empty-captions"]) == 0
    table = __import__("ddm.data", fromlist=["load_dataset"]).load_dataset(str(tmp_path / "lat")).text_table()
    torch.testing.assert_close(table.pooled, table.empty_pooled.expand(3, -1))


def test_prompt_files(tmp_path):
    (tmp_path / "ok.txt").write_text("a red square\n\n  a blue circle  \n")
    assert read_prompts_file(tmp_path / "ok.txt") == ["a red square", "a blue circle"]
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(UsageError, match="holds no prompt"):
        read_prompts_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        read_prompts_file(tmp_path / "latin1.txt")
