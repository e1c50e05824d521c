"""The diffusers internals DualParal relies on, each checked by name, so that a diffusers upgrade that moves
or changes one fails here with the internal's name instead of deep inside a render.

parallel_infer/feature_cache.py replaces Wan's self-attention processor (using `_get_qkv_projections` and
`dispatch_attention_fn`), wan_adapter.py runs the transformer's parts one by one, and stream.py drives the Wan
VAE's causal decoder cache (`_feat_map`, `_conv_idx`). Tested range: diffusers >= 0.36 (the first with
`WanRotaryPosEmbed.t_dim`) and < 0.43 (the newest release tested).
"""
from __future__ import annotations

import importlib
import inspect

import diffusers
import pytest
import torch

from parallel_infer.feature_cache import CachedSelfAttnProcessor, FeatureCache
from parallel_infer.tiny import tiny_transformer

torch.set_num_threads(1)
TESTED = ">=0.36,<0.43"


def missing(internal: str, user: str) -> None:
    pytest.fail(f"diffusers {diffusers.__version__}: {internal} is missing or changed; parallel_infer/{user} "
                f"uses it (tested with diffusers{TESTED})", pytrace=False)


def require_attributes(obj, names: list[str], where: str, user: str) -> None:
    for dotted in names:
        target = obj
        for part in dotted.split("."):
            if not hasattr(target, part):
                missing(f"{where}.{dotted}", user)
            target = getattr(target, part)


def require_parameters(fn, names: list[str], internal: str, user: str, positional: bool = False) -> None:
    """`names` among fn's parameters; `positional`: its first parameters, in this order (we pass them so)."""
    parameters = list(inspect.signature(fn).parameters)
    if (parameters[: len(names)] != names) if positional else not set(names) <= set(parameters):
        missing(f"{internal}({', '.join(names)})", user)


@pytest.mark.parametrize(
    "module, name, parameters, user",
    [
        ("diffusers.models.attention_dispatch", "dispatch_attention_fn",
         ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"], "feature_cache.py"),
        ("diffusers.models.transformers.transformer_wan", "_get_qkv_projections",
         ["attn", "hidden_states", "encoder_hidden_states"], "feature_cache.py"),
        ("diffusers.models.autoencoders.autoencoder_kl_wan", "unpatchify", ["x", "patch_size"], "stream.py"),
    ],
)
def test_private_functions_exist_with_their_parameters(module, name, parameters, user):
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        missing(f"{module}.{name}", user)
    require_parameters(fn, parameters, f"{module}.{name}", user)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return tiny_transformer(layers=2)


def test_wan_transformer_parts_the_adapter_runs(wan):
    require_attributes(wan, [
        "rope.t_dim", "rope.h_dim", "rope.w_dim", "rope.freqs_cos", "rope.freqs_sin",
        "condition_embedder.text_embedder", "condition_embedder.timesteps_proj", "condition_embedder.time_embedder",
        "condition_embedder.act_fn", "condition_embedder.time_proj",
        "patch_embedding", "blocks", "scale_shift_table", "norm_out", "proj_out",
        "config.image_dim", "config.added_kv_proj_dim", "config.rope_max_seq_len",
    ], "WanTransformer3DModel", "wan_adapter.py")
    require_parameters(type(wan.blocks[0]).forward, ["self", "hidden_states", "encoder_hidden_states", "temb", "rotary_emb"],
                       "WanTransformerBlock.forward", "wan_adapter.py", positional=True)


def test_wan_self_attention_is_what_the_cached_processor_replaces(wan):
    attn = wan.blocks[0].attn1
    require_attributes(attn, ["heads", "norm_q", "norm_k", "to_out", "set_processor", "processor"],
                       "WanTransformerBlock.attn1", "feature_cache.py")
    if type(attn.processor).__name__ != "WanAttnProcessor":
        missing(f"WanAttnProcessor as the self-attention processor (found {type(attn.processor).__name__})", "feature_cache.py")
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, text = torch.tensor([500.0, 500.0]), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        own = wan(x, t, text, return_dict=False)[0]
        processors = {i: block.attn1.processor for i, block in enumerate(wan.blocks)}
        cache = FeatureCache(store_tokens=slice(0, 0), context_rotary=(torch.empty(0), torch.empty(0)))
        for block in wan.blocks:
            block.attn1.set_processor(CachedSelfAttnProcessor(cache))
        try:
            ours = wan(x, t, text, return_dict=False)[0]
        finally:
            for i, block in enumerate(wan.blocks):
                block.attn1.set_processor(processors[i])
    if not torch.equal(own, ours):
        missing("WanAttnProcessor's computation (the cached processor with the cache off no longer equals it)", "feature_cache.py")


def test_wan_vae_causal_decoder_cache():
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])
    require_attributes(vae, ["clear_cache"], "AutoencoderKLWan", "stream.py")
    vae.clear_cache()  # sets the per-conv cache up, as FrameDecoder does before the first block
    require_attributes(vae, ["_feat_map", "_conv_idx", "post_quant_conv", "decoder",
                             "config.z_dim", "config.latents_mean", "config.latents_std", "config.patch_size"],
                       "AutoencoderKLWan", "stream.py")
    require_parameters(type(vae.decoder).forward, ["self", "x", "feat_cache", "feat_idx", "first_chunk"],
                       "AutoencoderKLWan.decoder.forward", "stream.py", positional=True)
