"""TextDDMPipeline: text-to-image flow-matching Euler sampling with classifier-free guidance, called like a
diffusers text-to-image pipeline:

    pipe(prompt, negative_prompt=..., num_inference_steps=..., guidance_scale=..., num_images_per_prompt=...,
         generator=...).images  ->  PIL images

The transformer is one text expert (PixArtTransformer2DModel), a monolith or a text `DDMEnsemble`; the text
encoder and tokenizer are the experts' own (transformers CLIP or T5, checked by hash when the pipeline is built).
Prompts are encoded once per call, before the loop (never per step); each prompt's rows are repeated
`num_images_per_prompt` times. An ensemble also gets the prompts' pooled embeddings (`pooled_projections`), which
its router reads. A pipeline folder (`save_pretrained`) holds transformer/, scheduler/, text_encoder/, tokenizer/
(and vae/): `TextDDMPipeline.from_pretrained(folder)` loads it, so does `DiffusionPipeline.from_pretrained(folder,
custom_pipeline=router.text_pipeline.__file__, trust_remote_code=True)`.
"""
from __future__ import annotations

import inspect
import time

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ddm import UsageError
from ddm.data.text_encoder import encode_with
from ddm.models.experts import NO_EXTRA_CONDITIONS
from router.output import OUTPUT_TYPES, finish, guided_euler, save_whole
from router.strategies import DEFAULT_GUIDANCE_ROUTING, check_guidance_routing


def as_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


class TextDDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder, tokenizer, vae=None,
                 text_length: int = 77):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(text_length=text_length)
        self.encode_seconds = 0.0  # time spent in the text encoder by the last call (benchmarks)
        self.truncation_warned: list = []

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]):
        """(hidden, mask, pooled) of the prompts, on the execution device."""
        kind = "t5" if "T5" in type(self.text_encoder).__name__ else "clip"
        return encode_with(self.text_encoder, self.tokenizer, kind, prompts, self.config.text_length, self.truncation_warned)

    @torch.inference_mode()
    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_routing: str = DEFAULT_GUIDANCE_ROUTING,
    ):
        """`negative_prompt` (one, or one per prompt; default "") is the guidance's unconditional branch;
        `guidance_routing` as in DDMPipeline (an ensemble's null rows follow their conditional rows by default)."""
        prompts = as_list(prompt, "prompt")
        negatives = as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) not in (1, len(prompts)):
            raise UsageError(f"give one negative prompt or one per prompt ({len(prompts)}), got {len(negatives)}")
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise UsageError(f"num_inference_steps and num_images_per_prompt must be >= 1, got {num_inference_steps}, {num_images_per_prompt}")
        check_guidance_routing(guidance_routing)
        use_cfg = guidance_scale != 1.0
        start = time.perf_counter()
        # once per prompt: the conditional rows, then (with guidance) the negative ones
        texts = prompts + ((negatives * len(prompts))[: len(prompts)] if use_cfg else [])
        hidden, mask, pooled = (t.repeat_interleave(num_images_per_prompt, 0) for t in self.encode_prompt(texts))
        self.encode_seconds = time.perf_counter() - start
        cfg, device = self.transformer.config, self._execution_device
        batch = len(prompts) * num_images_per_prompt
        dtype = self.transformer.dtype
        latents = randn_tensor((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator, device=device, dtype=dtype)
        reset_routing = getattr(self.transformer, "reset_routing", None)  # only an ensemble routes
        if reset_routing is not None:
            reset_routing(generator, guidance_pairs=batch if use_cfg and guidance_routing == "conditional" else 0)
        cond = {"encoder_hidden_states": hidden.to(device, dtype), "encoder_attention_mask": mask.to(device),
                "added_cond_kwargs": NO_EXTRA_CONDITIONS}
        if "pooled_projections" in inspect.signature(self.transformer.forward).parameters:
            cond["pooled_projections"] = pooled.to(device, dtype)
        latents = guided_euler(self, latents, num_inference_steps, guidance_scale, **cond)
        return finish(self, latents, output_type, return_dict)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        save_whole(self, save_directory, safe_serialization, **kwargs)


def make_text_pipeline(transformer, meta: dict, vae=None, text_encoder=None, device=None) -> TextDDMPipeline:
    """The pipeline of text experts (`meta`: one expert.json): their recorded text encoder, or `text_encoder` (a
    folder), refused unless it is that same encoder (hash; a hidden size that does not fit is named first)."""
    from ddm.data.text_encoder import load_recorded_encoder

    encoder = load_recorded_encoder(meta["text_encoder"], device, text_encoder)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=meta["flow"]["shift"])
    pipe = TextDDMPipeline(transformer, scheduler, encoder.model, encoder.tokenizer, vae, text_length=encoder.max_length)
    pipe.set_progress_bar_config(disable=True)
    return pipe
