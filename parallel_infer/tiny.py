"""Tiny random-weight Wan model folders, written offline, for tests, benchmarks and the CPU smoke runs.

They have the layout of a local `Wan2.1-T2V-1.3B-Diffusers` folder (see loader.py), so they load through
the same code path: transformer/, optionally vae/ (a tiny AutoencoderKLWan), and either a tiny UMT5
text_encoder/ + tokenizer/ (a word-level tokenizer built here) or prompt_embeds.safetensors + prompts.json.
Two Wan2.2 layouts (wan22.py): "a14b" adds transformer_2/ (other random weights) and a model_index.json with
its boundary_ratio; "ti2v" has TI2V-5B's VAE design (patch size 2, 48 latent channels, spatial factor 16,
temporal factor 4) and a 48-channel transformer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WORDS = ["a", "cat", "dog", "runs", "jumps", "in", "the", "park", "snow", "red", "blue"]


def tiny_transformer(layers: int = 5, channels: int = 3, text_dim: int = 16, heads: int = 2, head_dim: int = 12, ffn: int = 32, patch: int = 2):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=16, ffn_dim=ffn, num_layers=layers, rope_max_seq_len=256,
    ).eval()


def write_tiny_model(
    path: str | Path,
    *,
    layers: int = 5,
    vae: bool = False,
    text_encoder: bool = False,
    prompts: tuple[str, ...] = ("a cat runs", ""),
    text_tokens: int = 8,
    seed: int = 0,
    layout: str = "wan2.1",
    boundary_ratio: float = 0.875,
    **transformer_kwargs,
) -> Path:
    """A model folder with random weights. Pixel space (3 channels) unless `vae` (always for "ti2v")."""
    from safetensors.torch import save_file

    path = Path(path)
    torch.manual_seed(seed)
    text_dim = transformer_kwargs.pop("text_dim", 16)
    channels = 48 if layout == "ti2v" else 4 if vae else 3
    tiny_transformer(layers, channels, text_dim, **transformer_kwargs).save_pretrained(path / "transformer")
    if layout == "a14b":
        tiny_transformer(layers, channels, text_dim, **transformer_kwargs).save_pretrained(path / "transformer_2")
        index = {"_class_name": "WanPipeline", "boundary_ratio": boundary_ratio,
                 "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}
        (path / "model_index.json").write_text(json.dumps(index))
    if layout == "ti2v":
        from diffusers import AutoencoderKLWan

        AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, scale_factor_temporal=4, scale_factor_spatial=16,
        ).save_pretrained(path / "vae")
    elif vae:
        from diffusers import AutoencoderKLWan

        AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.1, 0.2, -0.1, 0.0], latents_std=[1.5, 1.0, 2.0, 0.5], scale_factor_temporal=2, scale_factor_spatial=4,
        ).save_pretrained(path / "vae")
    if text_encoder:
        _write_tiny_umt5(path, text_dim)
    else:
        embeds = {str(i): torch.randn(text_tokens, text_dim) for i in range(len(prompts))}
        save_file(embeds, path / "prompt_embeds.safetensors")
        (path / "prompts.json").write_text(json.dumps(list(prompts)))
    return path


def _write_tiny_umt5(path: Path, dim: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *TINY_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path / "tokenizer")
    config = UMT5Config(vocab_size=len(vocab), d_model=dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)
    UMT5EncoderModel(config).eval().save_pretrained(path / "text_encoder")
