"""The end of every sampling pipeline here: final model-space latents -> images of the requested output type."""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

OUTPUT_TYPES = ("pil", "np", "pt")


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
