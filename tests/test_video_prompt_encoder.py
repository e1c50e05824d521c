"""The demo prompt encoder: a UMT5-shaped (B, L, D) interface with a learned null prompt and strict words."""
import pytest
import torch

from ddm import UsageError
from ddm.models.prompt_encoder import PromptEncoder
from ddm.data.moving_digits import VOCABULARY


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return PromptEncoder(vocabulary=list(VOCABULARY), max_length=8, dim=16).eval()


def test_encode_shape_padding_and_null(encoder):
    with torch.inference_mode():
        out = encoder.encode(["a 3 moving right", "", "7 and 1 bouncing"])
    assert out.shape == (3, 8, 16) and out.dtype == torch.float32
    assert torch.equal(out[1], encoder.null_embedding)  # "" is the learned unconditional embedding
    assert (out[0, 4:] == 0).all() and (out[0, :4].abs().sum(-1) > 0).all()  # padding zeroed, as Wan pipelines do
    assert not torch.allclose(out[0], out[2])


def test_prompt_words_change_the_embedding_in_context(encoder):
    with torch.inference_mode():
        a, b = encoder.encode(["a 3 moving right", "a 3 moving left"])
    assert torch.equal(a[4:], b[4:]) and not torch.allclose(a[:3], b[:3])  # the layer mixes words


def test_unknown_words_raise_listing_the_vocabulary(encoder):
    with pytest.raises(UsageError, match=r"'cat'.*known words: a and moving"):
        encoder.encode(["a cat moving right"])
    with pytest.raises(UsageError, match="at most 8"):
        encoder.encode(["a 1 and 2 and 3 and 4 moving"])


def test_save_and_load_round_trip(tmp_path, encoder):
    encoder.save_pretrained(tmp_path / "prompt_encoder")
    assert (tmp_path / "prompt_encoder" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "prompt_encoder").iterdir())
    loaded = PromptEncoder.from_pretrained(tmp_path / "prompt_encoder")
    prompts = ["a 9 bouncing", "", "5 and 5 moving up"]
    with torch.inference_mode():
        assert torch.equal(loaded.encode(prompts), encoder.encode(prompts))
    assert loaded.config.vocabulary == list(VOCABULARY)


def test_conditions_a_wan_transformer_like_a_text_encoder(encoder):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=1,
                                out_channels=1, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1).eval()
    x = torch.randn(2, 1, 3, 8, 8)
    with torch.inference_mode():
        out = wan(x, timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=encoder.encode(["a 1 bouncing", ""])).sample
    assert out.shape == x.shape and not torch.allclose(out[0], out[1])
