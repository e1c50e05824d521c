"""Model folders through the one loader, streaming decode, `render_video`, and the render CLI (one process)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from ddm import UsageError
from parallel_infer.api import render_video
from parallel_infer.loader import TEXT_TOKENS, inspect_model, load_model
from parallel_infer.stream import FrameDecoder
from parallel_infer.tiny import write_tiny_model

torch.set_num_threads(1)
SMALL = dict(steps=2, block=4, cat=2, height=16, width=16)


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("pixel"), layers=3, prompts=("a cat runs", "a dog jumps", ""))


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    """The layout of a local Wan2.1-T2V-Diffusers folder: transformer, VAE, UMT5 text encoder + tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("wan"), layers=2, vae=True, text_encoder=True)


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("render_videos", Path(__file__).parents[1] / "scripts" / "render_videos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_umt5_folder_encodes_like_the_wan_pipeline(wan_model):
    info = inspect_model(wan_model)
    assert (info.kind, info.temporal_scale, info.spatial_scale, info.channels) == ("diffusers", 2, 4, 4)
    model = load_model(info)
    embeds = model.encode_prompts(["a cat runs", ""])
    assert embeds.shape == (2, TEXT_TOKENS, 16)
    assert embeds[0, :3].abs().sum() > 0 and embeds[0, 3:].abs().sum() == 0  # 3 words, zeros after
    assert not torch.equal(embeds[0], embeds[1])


def test_precomputed_embeddings_by_prompt(pixel_model):
    model = load_model(inspect_model(pixel_model))
    assert model.vae is None and model.encode_prompts(["a dog jumps", ""]).shape == (2, TEXT_TOKENS, 16)
    with pytest.raises(UsageError, match="'a cow' has no precomputed embedding"):
        model.encode_prompts(["a cow"])


def write_embeddings(model_dir: Path, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    from safetensors.torch import save_file

    tensors = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) + 1 for i, shape in enumerate(shapes)]
    save_file({str(i): t for i, t in enumerate(tensors)}, model_dir / "prompt_embeds.safetensors")
    return tensors


def test_precomputed_embeddings_of_different_lengths_are_padded_with_zeros(tmp_path):
    """[L, D] each, as documented: padded to Wan's 512 tokens as the UMT5 path pads, so they batch."""
    model_dir = write_tiny_model(tmp_path / "m", layers=2, prompts=("a cat runs", ""))
    short, long = write_embeddings(model_dir, (3, 16), (11, 16))
    embeds = load_model(inspect_model(model_dir)).encode_prompts(["a cat runs", ""])
    assert embeds.shape == (2, TEXT_TOKENS, 16)
    assert torch.equal(embeds[0, :3], short) and torch.equal(embeds[1, :11], long)
    assert embeds[0, 3:].abs().sum() == 0 and embeds[1, 11:].abs().sum() == 0
    record = render_video(model_dir, "a cat runs", tmp_path / "v.mp4", frames=6, steps=1, block=4, cat=2, height=16, width=16)
    assert record["frames_written"] == 6


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(8, 16), (8, 32)], r"tensor '1' is \[8, 32\]: width 32, but the transformer's text_dim is 16"),
        ([(8, 16), (8,)], r"tensor '1' is \[8\]: expected \[L, D\]"),
        ([(8, 16), (513, 16)], r"tensor '1' has 513 tokens, more than Wan's 512"),
        ([(8, 16)], r"no tensor '1' for line 1 \(''\) of"),
    ],
)
def test_bad_precomputed_embeddings_fail_before_any_process_starts(tmp_path, shapes, message):
    model_dir = write_tiny_model(tmp_path / "m", layers=2, prompts=("a cat runs", ""))
    write_embeddings(model_dir, *shapes)
    with pytest.raises(UsageError, match=message) as error:
        inspect_model(model_dir)
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match=message):  # ranks=2: before the worker is spawned
        render_video(model_dir, "a cat runs", tmp_path / "v.mp4", frames=6, ranks=2, steps=1, block=4, cat=2)
    assert not (tmp_path / "v.mp4").exists()


def test_a_damaged_embeddings_file_is_a_usage_error(tmp_path):
    model_dir = write_tiny_model(tmp_path / "m", layers=2)
    (model_dir / "prompt_embeds.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="cannot read .*prompt_embeds.safetensors"):
        inspect_model(model_dir)


class FrameList:
    """Stands in for Mp4Stream: keeps the frames."""

    def __init__(self):
        self.frames, self.written, self.closed = [], 0, False

    def write(self, frames):
        self.frames.append(frames)
        self.written += len(frames)

    def close(self):
        self.closed = True

    abort = close


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_streaming_vae_decode_equals_one_whole_decode(wan_model, threaded):
    """Blocks decoded as they leave the queue (on the denoising thread, or in the writer's thread while later
    blocks are put) give exactly the frames of one vae.decode of the whole video."""
    import numpy as np

    from parallel_infer.block_writer import BlockWriter

    vae = load_model(inspect_model(wan_model)).vae
    latents = torch.randn(1, 4, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    decoder, frames = FrameDecoder(vae), FrameList()
    written = []
    writer = BlockWriter(decoder, frames, threaded, on_written=written.append)
    for block, (a, b) in enumerate([(0, 5), (5, 7), (7, 9)]):
        writer.put(block, latents[:, :, a:b])
    timings = writer.close()
    assert frames.closed and written == [0, 1, 2] and timings["decode_write"] > 0
    assert [len(f) for f in frames.frames] == [1 + 4 * 2, 2 * 2, 2 * 2]  # causal: the first latent frame is one frame
    with torch.inference_mode():
        whole = vae.decode(latents * decoder.std + decoder.mean).sample
    whole = ((whole.clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(np.concatenate(frames.frames), whole)


def test_a_failing_decode_thread_is_raised_by_the_writer(wan_model):
    from parallel_infer.block_writer import BlockWriter

    frames = FrameList()
    writer = BlockWriter(FrameDecoder(load_model(inspect_model(wan_model)).vae), frames, threaded=True)
    writer.put(0, torch.randn(1, 3, 2, 4, 4))  # 3 channels: the 4-channel VAE fails
    with pytest.raises(RuntimeError, match="decoding failed"):
        writer.close()
    assert frames.closed  # aborted: Mp4Stream.abort removes the partial file


def test_render_video_with_vae_and_text_encoder(wan_model, tmp_path):
    blocks = []
    out = tmp_path / "v.mp4"
    record = render_video(wan_model, "a red dog jumps", out, frames=2 * (6 + 4 * 2 - 1) + 1, **{**SMALL, "height": 32, "width": 32},
                          progress_callback=lambda done, total: blocks.append((done, total)))
    assert blocks == [(1, 3), (2, 3), (3, 3)]
    video = iio.imread(out)
    assert video.shape == (27, 32, 32, 3) and record["frames_written"] == 27
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["prompt"] == "a red dog jumps"
    assert set(record["timings_s"]) == {"load", "encode_prompt", "denoise", "decode_write", "decode_tail", "total"}


def test_seconds_are_cut_to_fps_times_seconds(pixel_model, tmp_path):
    record = render_video(pixel_model, "a cat runs", tmp_path / "s.mp4", seconds=1.5, fps=10, **SMALL)
    assert record["settings"]["frames"] == 18 and iio.imread(tmp_path / "s.mp4").shape[0] == 15


def test_bad_requests_fail_before_any_work(pixel_model, tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(UsageError, match="4 ranks but the model has only 3 layers"):
        render_video(pixel_model, "a cat runs", out, frames=26, ranks=4, **SMALL)
    with pytest.raises(UsageError, match="frame size 15x16"):
        render_video(pixel_model, "a cat runs", out, frames=26, **{**SMALL, "height": 15})
    with pytest.raises(UsageError, match="exactly one of --frames or --seconds"):
        render_video(pixel_model, "a cat runs", out, **SMALL)
    with pytest.raises(UsageError, match="not a model directory"):
        render_video(tmp_path, "a cat runs", out, frames=26, **SMALL)
    with pytest.raises(UsageError, match="'a cow' has no precomputed embedding"):
        render_video(pixel_model, "a cow", out, frames=26, **SMALL)
    with pytest.raises(UsageError, match="'the void' has no precomputed embedding"):  # the unconditional branch
        render_video(pixel_model, "a cat runs", out, frames=26, negative_prompt="the void", **SMALL)
    with pytest.raises(UsageError, match="threads must be a positive integer, got 0"):  # as the CLI checks them
        render_video(pixel_model, "a cat runs", out, frames=26, threads=0, **SMALL)
    with pytest.raises(UsageError, match="timeout -1 is out of range"):
        render_video(pixel_model, "a cat runs", out, frames=26, timeout=-1, **SMALL)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ranks=2, layer_split="2,2"), r"--layer-split 2,2 sums to 4, but the model has 3 layers"),
        (dict(ranks=2, layer_split="3,0"), r"--layer-split 3,0 gives stage 1 no layers \(0\)"),
        (dict(ranks=3, layer_split="2,1"), r"--layer-split 2,1 has 2 entries for 3 pipeline stages"),
        (dict(ranks=2, layer_split="two,one"), r"--layer-split 'two,one': give 'auto' or layers per stage"),
        (dict(ranks=3, cfg_parallel=True), r"--cfg-parallel needs an even number of ranks .*got 3"),
        (dict(ranks=2, cfg_parallel=True, cfg=1.0), r"--cfg-parallel needs guidance"),
        (dict(ranks=8, cfg_parallel=True), r"4 ranks but the model has only 3 layers"),  # 4 stages per group
        (dict(ranks=2, decode_on="middle"), r"--decode-on 'middle': choose first or last"),
        (dict(decode="gpu"), r"--decode 'gpu': choose auto, thread or inline"),
    ],
)
def test_bad_placements_fail_before_any_process_starts(pixel_model, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        render_video(pixel_model, "a cat runs", tmp_path / "x.mp4", frames=26, **{**SMALL, **options})
    assert not any(tmp_path.iterdir())


def test_expert_directory_with_prompt_encoder(tmp_path):
    from ddm.models.experts import write_expert
    from ddm.flow import FlowConfig
    from ddm.models.prompt_encoder import PromptEncoder
    from parallel_infer.tiny import tiny_transformer

    torch.manual_seed(0)
    wan = tiny_transformer(layers=2, channels=1)
    write_expert(tmp_path / "expert", wan, wan, {"flow": FlowConfig(shift=2.0).to_dict(), "size": 16, "channels": 1})
    PromptEncoder(vocabulary=["cat", "runs"], max_length=4, dim=16).save_pretrained(tmp_path / "expert" / "prompt_encoder")
    record = render_video(tmp_path / "expert", "cat runs", tmp_path / "e.mp4", frames=10, steps=2, block=4, cat=2)
    assert record["settings"]["flow_shift"] == 2.0 and iio.imread(tmp_path / "e.mp4").shape == (10, 16, 16, 3)
    with pytest.raises(UsageError, match="unknown word"):
        render_video(tmp_path / "expert", "dog", tmp_path / "f.mp4", frames=10, steps=2, block=4, cat=2)


def test_cli_renders_skips_and_refuses(cli, pixel_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat runs\n\na dog jumps\n")
    out = tmp_path / "out"

    def args(**change):
        options = {"model": pixel_model, "prompts": prompts, "frames": 10, "steps": 2, "block": 4, "cat": 2,
                   "height": 16, "width": 16, "seed": 5, "out": out, **change}
        return [a for k, v in options.items() for a in (f"--{k}", str(v))]

    assert cli.main(args()) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".ddm-owner.json", "a-cat-runs-seed5.json", "a-cat-runs-seed5.mp4", "a-dog-jumps-seed5.json", "a-dog-jumps-seed5.mp4"]
    sidecar = json.loads((out / "a-dog-jumps-seed5.json").read_text())
    assert sidecar["settings"]["seed"] == 5 and sidecar["ranks"] == 1 and sidecar["bytes_sent"] == 0
    stamp = (out / "a-cat-runs-seed5.mp4").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args()) == 0
    assert "skip" in capsys.readouterr().err and (out / "a-cat-runs-seed5.mp4").stat().st_mtime_ns == stamp
    assert cli.main(args(steps=3)) == 2  # same files, other settings: refused, nothing overwritten
    assert "exists with other settings" in capsys.readouterr().err
    # a record written before samplers existed has no "sampler": it was rendered with Euler
    old = tmp_path / "old"
    assert cli.main(args(out=old, sampler="euler")) == 0
    sidecar = json.loads((old / "a-cat-runs-seed5.json").read_text())
    assert sidecar["settings"].pop("sampler") == "euler"
    (old / "a-cat-runs-seed5.json").write_text(json.dumps(sidecar))
    capsys.readouterr()
    assert cli.main(args(out=old, sampler="euler")) == 0 and "skip" in capsys.readouterr().err
    assert cli.main(args(out=old)) == 2 and "exists with other settings" in capsys.readouterr().err  # unipc, the default
    assert cli.main(args(threads=0)) == 2 and "threads must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main(args(**{"layer-split": "4"})) == 2
    assert capsys.readouterr().err.strip() == "error: --layer-split 4 sums to 4, but the model has 3 layers"
    assert cli.main(args(frames=11)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: 11 latent frames do not fit")
    assert (out / "a-cat-runs-seed5.mp4").stat().st_mtime_ns == stamp
