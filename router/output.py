"""What the sampling pipelines here (DDMPipeline, TextDDMPipeline) share: the guided Euler loop, the decode to images
of the requested output type, and the atomic save. Functions, not a base class: diffusers' `custom_pipeline` loader
refuses a module that holds two DiffusionPipeline classes."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ddm import UsageError
from ddm.io import replacing_dir

OUTPUT_TYPES = ("pil", "np", "pt")


def guided_euler(pipe: DiffusionPipeline, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
                 **conditions) -> torch.Tensor:
    """Flow-matching Euler steps of `pipe.transformer` from `latents`. With guidance (scale != 1) the conditions'
    rows are the conditional batch, then the unconditional one."""
    use_cfg = guidance_scale != 1.0
    pipe.scheduler.set_timesteps(num_inference_steps, device=latents.device)
    for t in pipe.progress_bar(pipe.scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        velocity = pipe.transformer(model_input, timestep=t.expand(model_input.shape[0]), **conditions).sample
        if use_cfg:
            cond, uncond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        latents = pipe.scheduler.step(velocity, t, latents).prev_sample
    return latents


def save_whole(pipe: DiffusionPipeline, save_directory, safe_serialization: bool, **kwargs) -> None:
    """The diffusers folder, written whole or not at all (staged beside it, then swapped in); safetensors only."""
    if not safe_serialization:
        raise UsageError("pipelines are saved as safetensors only")
    with replacing_dir(Path(save_directory), "pipeline", "the pipeline folder") as staging:
        DiffusionPipeline.save_pretrained(pipe, staging, safe_serialization=True, **kwargs)


def finish(pipe: DiffusionPipeline, latents: torch.Tensor, output_type: str, return_dict: bool):
    """Decode model-space latents with the pipeline's VAE (if any) and return images of `output_type`."""
    vae = pipe.vae
    if vae is not None:  # model-space latents -> the VAE's own -> images in [-1, 1]
        scaling, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        latents = vae.decode(latents.to(vae.dtype) / scaling + shift).sample
    images = (latents / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        images = images.float().permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            images = pipe.numpy_to_pil(images)
    pipe.maybe_free_model_hooks()
    return ImagePipelineOutput(images=images) if return_dict else (images,)
