"""DDMPipeline: class-conditional flow-matching Euler sampling with classifier-free guidance.

The transformer is one expert, a monolith or a `DDMEnsemble`: the loop is the same for all of them.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ddm import UsageError
from router.strategies import DEFAULT_GUIDANCE_ROUTING, check_guidance_routing

OUTPUT_TYPES = ("pil", "np", "pt")


class DDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.inference_mode()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_routing: str = DEFAULT_GUIDANCE_ROUTING,
    ):
        """`guidance_routing` (an ensemble with CFG): "conditional" routes a sample's null-label row with its
        conditional row's weights, so guidance contrasts one expert's two velocities; "per-row" routes each row alone."""
        cfg = self.transformer.config
        num_classes = cfg.num_embeds_ada_norm
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if labels.numel() == 0 or bad.numel():
            raise UsageError(f"class labels must be in 0..{num_classes - 1}, got {bad.tolist() or 'none'}")
        if output_type not in OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        check_guidance_routing(guidance_routing)
        if num_inference_steps < 1:
            raise UsageError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device, dtype = self._execution_device, self.transformer.dtype
        batch = labels.numel()
        latents = randn_tensor(
            (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator, device=device, dtype=dtype
        )
        use_cfg = guidance_scale != 1.0
        reset_routing = getattr(self.transformer, "reset_routing", None)  # only an ensemble routes
        if reset_routing is not None:
            reset_routing(generator, guidance_pairs=batch if use_cfg and guidance_routing == "conditional" else 0)
        labels = labels.to(device)
        if use_cfg:  # cond rows first, then the null-label rows
            labels = torch.cat([labels, torch.full_like(labels, num_classes)])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            velocity = self.transformer(model_input, timestep=t.expand(model_input.shape[0]), class_labels=labels).sample
            if use_cfg:
                cond, uncond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.float().permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def make_pipeline(transformer, flow_shift: float = 1.0) -> DDMPipeline:
    """The pipeline with its scheduler on the experts' SD3 shift."""
    pipe = DDMPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=flow_shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe
