"""What `--model DIR` accepts, read by one loader.

(a) A diffusers Wan folder (e.g. a local `Wan2.1-T2V-1.3B-Diffusers`, `Wan2.2-T2V-A14B-Diffusers` or
    `Wan2.2-TI2V-5B-Diffusers`; what Wan2.2 adds is read by wan22.py):
      transformer/               WanTransformer3DModel (required)
      transformer_2/             the low-noise expert, when model_index.json names it (with boundary_ratio)
      vae/                       AutoencoderKLWan; absent = pixel space (channels are pixels in [-1, 1])
      text_encoder/ + tokenizer/ UMT5EncoderModel + its tokenizer, or instead
      prompt_embeds.safetensors  precomputed embeddings: tensor "i" [L, D] is the embedding of line i of
      prompts.json               (a JSON list of prompt strings); "" there is the unconditional prompt;
                                 L <= 512 (zero-padded to 512 as UMT5's), D = the transformer's text_dim
      scheduler/                 optional; its shift (or flow_shift) is the default flow shift
(b) One of our video expert directories: expert.json (model_class WanTransformer3DModel, EMA weights at the
    top, read by ddm.models.experts.load_expert) and prompt_encoder/ (ddm.models.prompt_encoder.PromptEncoder).

`inspect_model` reads only JSON, so every setting can be checked before any weight loads or process starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddm import UsageError, first_line
from ddm.io import load_pretrained, verify_owned
from parallel_infer import wan22

TEXT_TOKENS = 512  # Wan's text length: UMT5 output padded with zeros to this many tokens
DEFAULT_FLOW_SHIFT = 3.0  # Wan2.1 T2V at 480p
DEFAULT_SIZE = wan22.WAN21_SIZE  # Wan2.1 T2V 1.3B resolution, pixels


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


@dataclass
class ModelInfo:
    """What settings are checked against, from JSON alone."""

    path: Path
    kind: str  # "diffusers" or "expert"
    num_layers: int
    channels: int
    patch_size: tuple[int, int, int]
    vae: dict | None = None  # the VAE config, None in pixel space
    scheduler: dict | None = None
    flow_shift: float = DEFAULT_FLOW_SHIFT
    size: tuple[int, int] = DEFAULT_SIZE  # default output height, width in pixels
    prompts: str = ""  # where prompt embeddings come from, for messages
    known_prompts: list[str] | None = None  # precomputed embeddings: the prompts they cover
    vocabulary: list[str] | None = None  # our prompt encoder: the words it knows
    max_words: int | None = None  # our prompt encoder: the longest prompt it takes
    boundary_ratio: float | None = None  # Wan2.2 A14B: transformer_2 below this fraction of the timesteps

    def check_prompts(self, prompts: list[str]) -> None:
        """UsageError for a prompt this model cannot encode, found from JSON before anything loads."""
        for prompt in prompts:
            if self.known_prompts is not None and prompt not in self.known_prompts:
                raise UsageError(f"prompt {prompt!r} has no precomputed embedding in {self.path / 'prompts.json'}")
            unknown = [w for w in prompt.lower().split() if self.vocabulary is not None and w not in self.vocabulary]
            if unknown:
                raise UsageError(f"prompt {prompt!r}: unknown word(s) {', '.join(map(repr, unknown))}; known words: {' '.join(self.vocabulary)}")
            if self.max_words is not None and len(prompt.split()) > self.max_words:
                raise UsageError(f"prompt {prompt!r} has {len(prompt.split())} words; this model's prompt encoder takes at most {self.max_words}")

    @property
    def temporal_scale(self) -> int:
        return self.vae.get("scale_factor_temporal", 4) if self.vae else 1

    @property
    def spatial_scale(self) -> int:
        return self.vae.get("scale_factor_spatial", 8) if self.vae else 1

    def latent_frames(self, frames: int) -> int:
        """Video frames -> latent frames (Wan's VAE: the first frame alone, then `temporal_scale` per latent)."""
        s = self.temporal_scale
        if s == 1:
            return frames
        if frames < 1 or (frames - 1) % s:
            raise UsageError(f"{frames} frames: with this VAE the frame count must be {s}*n + 1 (e.g. {s * max(1, (frames - 1) // s) + 1})")
        return (frames - 1) // s + 1

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        s, (_, p_h, p_w) = self.spatial_scale, self.patch_size
        if height <= 0 or width <= 0 or height % (s * p_h) or width % (s * p_w) or height % 2 or width % 2:
            raise UsageError(f"frame size {height}x{width} must be even and divisible by {s * p_h}x{s * p_w} for this model")
        return height // s, width // s


def inspect_model(path: str | Path) -> ModelInfo:
    path = Path(path)
    if (path / "expert.json").is_file():
        meta = _read_json(path / "expert.json")
        if not isinstance(meta, dict) or meta.get("model_class") != "WanTransformer3DModel":
            found = meta.get("model_class") if isinstance(meta, dict) else None
            raise UsageError(f"{path}: expert model class {found!r} is not a WanTransformer3DModel")
        if not (path / "prompt_encoder").is_dir():
            raise UsageError(f"{path}: video expert without a prompt_encoder/ folder")
        config = _transformer_config(path / "config.json")
        encoder = _read_json(path / "prompt_encoder" / "config.json")
        size = meta.get("size", DEFAULT_SIZE[0])
        size = (size, size) if isinstance(size, int) else tuple(size)
        shift = meta["flow"].get("shift", DEFAULT_FLOW_SHIFT) if isinstance(meta.get("flow"), dict) else DEFAULT_FLOW_SHIFT
        vocabulary, max_words = encoder.get("vocabulary"), encoder.get("max_length")
        if not (isinstance(vocabulary, list) and isinstance(max_words, int) and max_words > 0):
            raise UsageError(f"{path / 'prompt_encoder' / 'config.json'}: needs a 'vocabulary' list and a positive 'max_length'")
        return ModelInfo(path, "expert", config["num_layers"], config["in_channels"], tuple(config["patch_size"]),
                         flow_shift=shift, size=size, prompts="prompt_encoder/", vocabulary=vocabulary, max_words=max_words)
    if not (path / "transformer" / "config.json").is_file():
        raise UsageError(f"{path}: not a model directory (need transformer/config.json or expert.json)")
    config = _transformer_config(path / "transformer" / "config.json")
    vae = _read_json(path / "vae" / "config.json") if (path / "vae").is_dir() else None
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler").is_dir() else None
    known = None
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        prompts = "text_encoder/ + tokenizer/"
    elif (path / "prompt_embeds.safetensors").is_file() and (path / "prompts.json").is_file():
        prompts, known = "prompt_embeds.safetensors", _read_prompt_list(path)
        _check_embedding_shapes(path, known, config["text_dim"])
    else:
        raise UsageError(f"{path}: no prompt encoder: need text_encoder/ + tokenizer/, or prompt_embeds.safetensors + prompts.json")
    if vae is None and config["in_channels"] not in (1, 3):
        raise UsageError(f"{path}: no vae/ and {config['in_channels']} channels: a pixel-space model needs 1 or 3")
    if vae is not None and vae.get("z_dim", config["in_channels"]) != config["in_channels"]:
        raise UsageError(f"{path}: the VAE has {vae['z_dim']} latent channels, the transformer {config['in_channels']}")
    shift = (scheduler or {}).get("shift") or (scheduler or {}).get("flow_shift") or DEFAULT_FLOW_SHIFT
    return ModelInfo(path, "diffusers", config["num_layers"], config["in_channels"], tuple(config["patch_size"]),
                     vae=vae, scheduler=scheduler, flow_shift=shift, size=wan22.default_size(vae), prompts=prompts,
                     known_prompts=known, boundary_ratio=wan22.read_experts(path, config))


def _transformer_config(path: Path) -> dict:
    """A Wan transformer config.json with the keys planning reads, of the right types."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a JSON object")
    for key in ("num_layers", "in_channels"):
        if not isinstance(config.get(key), int) or isinstance(config.get(key), bool) or config[key] < 1:
            raise UsageError(f"{path}: {key}={config.get(key)!r} is not a positive integer")
    patch = config.get("patch_size")
    if not (isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)):
        raise UsageError(f"{path}: patch_size={patch!r} is not three positive integers")
    return config


@dataclass
class VideoModel:
    info: ModelInfo
    transformer: torch.nn.Module
    encode_prompts: Callable[[list[str]], torch.Tensor]  # prompts -> [B, L, D]
    vae: torch.nn.Module | None = None
    scheduler_config: dict | None = field(default=None)
    transformer_2: torch.nn.Module | None = None  # Wan2.2 A14B's low-noise expert

    @property
    def boundary_timestep(self) -> float | None:
        return wan22.boundary_timestep(self.info.boundary_ratio, self.scheduler_config)


def load_model(info: ModelInfo, device=None, dtype=torch.float32, load_vae: bool = True, layers: range | None = None) -> VideoModel:
    """The transformer(s) (and, when asked, the VAE) in eval mode, and a prompt encoder function.
    `layers`: keep only these transformer layers (a rank's slice; the others never reach `device`)."""
    from diffusers import AutoencoderKLWan

    path = info.path
    if info.kind == "expert":
        from ddm.models.experts import load_expert
        from ddm.models.prompt_encoder import PromptEncoder  # written by the training side; imported only here

        transformer, _ = load_expert(path, device=device, dtype=dtype)
        verify_owned(path / "prompt_encoder", "prompt encoder")
        encoder = _load(PromptEncoder, path / "prompt_encoder").to(device).eval()
        return VideoModel(info, transformer, _no_grad(encoder.encode))
    transformer = _load_transformer(path, "transformer", device, dtype, layers)
    second = _load_transformer(path, "transformer_2", device, dtype, layers) if info.boundary_ratio is not None else None
    vae = None
    if info.vae is not None and load_vae:  # the VAE decodes in float32: it is small and sensitive
        vae = _load(AutoencoderKLWan, path, subfolder="vae", torch_dtype=torch.float32).to(device).eval()
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        encode = _umt5_encoder(path, device, dtype)
    else:
        encode = _precomputed_embeddings(path)
    return VideoModel(info, transformer, encode, vae, info.scheduler, second)


def _load_transformer(path: Path, subfolder: str, device, dtype: torch.dtype, layers: range | None) -> torch.nn.Module:
    """Loaded on the CPU, cut to `layers`, then moved: a rank's device only ever holds its own slice."""
    from diffusers import WanTransformer3DModel

    from parallel_infer.wan_adapter import keep_layers

    model = _load(WanTransformer3DModel, path, subfolder=subfolder, torch_dtype=dtype)  # safetensors only
    if layers is not None:
        keep_layers(model, layers)
    return model.to(device).eval().requires_grad_(False)


def _load(cls, path: Path, **kwargs):
    return load_pretrained(cls, path, cls.__name__, **kwargs)


def _no_grad(fn):
    def wrapped(prompts):
        with torch.inference_mode():
            return fn(prompts)

    return wrapped


def _umt5_encoder(path: Path, device, dtype: torch.dtype) -> Callable[[list[str]], torch.Tensor]:
    """As WanPipeline._get_t5_prompt_embeds: UMT5 output up to each prompt's length, zeros after."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    encoder = _load(UMT5EncoderModel, path / "text_encoder", dtype=dtype).to(device).eval()  # bf16 on GPU

    @torch.inference_mode()
    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=TEXT_TOKENS,
                           truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    return encode


def _read_prompt_list(path: Path) -> list[str]:
    prompts = _read_json(path / "prompts.json")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"{path / 'prompts.json'}: expected a JSON list of prompt strings")
    return prompts


def _check_embedding_shapes(path: Path, prompts: list[str], text_dim: int) -> None:
    """Every line of prompts.json has a tensor [L <= TEXT_TOKENS, text_dim], read from the file's header alone."""
    from safetensors import SafetensorError, safe_open

    file = path / "prompt_embeds.safetensors"
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UsageError(f"cannot read {file}: {e}") from None
    for i, prompt in enumerate(prompts):
        shape = shapes.get(str(i))
        if shape is None:
            raise UsageError(f"{file}: no tensor '{i}' for line {i} ({prompt!r}) of prompts.json")
        if len(shape) != 2:
            raise UsageError(f"{file}: tensor '{i}' is {list(shape)}: expected [L, D] (tokens, text width)")
        if shape[1] != text_dim:
            raise UsageError(f"{file}: tensor '{i}' is {list(shape)}: width {shape[1]}, but the transformer's text_dim is {text_dim}")
        if shape[0] > TEXT_TOKENS:
            raise UsageError(f"{file}: tensor '{i}' has {shape[0]} tokens, more than Wan's {TEXT_TOKENS}")


def _precomputed_embeddings(path: Path) -> Callable[[list[str]], torch.Tensor]:
    """As the UMT5 path: each [L, D] embedding padded with zeros to TEXT_TOKENS, so prompts of any length batch."""
    from safetensors.torch import load_file

    prompts = _read_prompt_list(path)
    try:
        tensors = load_file(path / "prompt_embeds.safetensors")
    except Exception as e:  # safetensors' error for a damaged file is no OSError
        raise UsageError(f"cannot read {path / 'prompt_embeds.safetensors'}: {first_line(e)}") from None
    index = {p: i for i, p in enumerate(prompts)}

    def encode(requested: list[str]) -> torch.Tensor:
        missing = [p for p in requested if p not in index]
        if missing:
            raise UsageError(f"prompt {missing[0]!r} has no precomputed embedding in {path / 'prompts.json'}")
        chosen = [tensors[str(index[p])] for p in requested]
        out = chosen[0].new_zeros(len(chosen), TEXT_TOKENS, chosen[0].shape[1])
        for row, embedding in zip(out, chosen):
            row[: len(embedding)] = embedding
        return out

    return encode
