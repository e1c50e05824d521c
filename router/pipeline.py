"""DDMPipeline: class-conditional flow-matching Euler sampling with classifier-free guidance.

The transformer is one expert, a monolith or a `DDMEnsemble`: the loop is the same for all of them.
`load_pipeline(path)` is the one way from a directory on disk (a pipeline folder, an ensemble or one expert) to a
ready pipeline; the experts' flow shift travels in the scheduler config, so nothing else reads it by hand.

A pipeline folder is an ordinary diffusers folder (`model_index.json`, `scheduler/`, `transformer/`):
`DDMPipeline.from_pretrained(folder)` loads it, and so does
`DiffusionPipeline.from_pretrained(folder, custom_pipeline=router.pipeline.__file__, trust_remote_code=True)`, the
diffusers way for a pipeline class that lives outside diffusers (the "remote" code is this installed module).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ddm import UsageError
from ddm.io import replacing_dir, verify_owned
from router.strategies import DEFAULT_GUIDANCE_ROUTING, check_guidance_routing

OUTPUT_TYPES = ("pil", "np", "pt")


class DDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler: FlowMatchEulerDiscreteScheduler, vae=None):
        super().__init__()
        # vae: the AutoencoderKL of latent-space experts (ddm/data/vae.py); None for pixel-space ones
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)

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
        if self.vae is not None:  # model-space latents -> the VAE's own -> images in [-1, 1]
            scaling, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor or 0.0
            latents = self.vae.decode(latents.to(self.vae.dtype) / scaling + shift).sample
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.float().permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        """The diffusers folder, written whole or not at all (staged beside it, then swapped in)."""
        if not safe_serialization:
            raise UsageError("pipelines are saved as safetensors only")
        with replacing_dir(Path(save_directory), "pipeline", "the pipeline folder") as staging:
            super().save_pretrained(staging, safe_serialization=True, **kwargs)


def make_pipeline(transformer, flow_shift: float = 1.0, vae=None) -> DDMPipeline:
    """The pipeline with its scheduler on the experts' SD3 shift (and the VAE of latent-space experts)."""
    pipe = DDMPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=flow_shift), vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensemble_pipeline(router_dir, expert_dirs, strategy: str | None = None, device=None, dtype=None, device_map=None) -> DDMPipeline:
    """Router directory + any subset of expert directories → a pipeline over their ensemble (experts on the
    devices of `device_map`, see DDMEnsemble.from_dirs)."""
    from ddm.data.vae import expert_vae
    from router.ensemble import DDMEnsemble
    from router.strategies import DEFAULT_STRATEGY

    ensemble = DDMEnsemble.from_dirs(router_dir, expert_dirs, strategy or DEFAULT_STRATEGY, device, dtype, device_map=device_map)
    return make_pipeline(ensemble, ensemble.flow_shift, expert_vae(ensemble.metas[0], ensemble.router.device))


def load_pipeline(path, strategy: str | None = None, device=None, dtype=None, device_map=None) -> DDMPipeline:
    """A pipeline from a pipeline folder (model_index.json), an ensemble (ensemble.json) or one expert (expert.json).

    `strategy` overrides an ensemble's routing strategy and `device_map` places its experts (DDMEnsemble.from_dirs);
    a single expert has neither.
    """
    from ddm.data.vae import expert_vae
    from ddm.models.experts import load_expert
    from router.ensemble import DDMEnsemble

    path = Path(path)
    if (path / "model_index.json").is_file():
        try:
            class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{path / 'model_index.json'} is unreadable: {e}") from None
        if class_name != DDMPipeline.__name__:
            raise UsageError(f"{path} holds a {class_name} pipeline, not a {DDMPipeline.__name__}")
        verify_owned(path, "pipeline")  # every file as ddm wrote it (SHA-256)
        if device_map is not None:  # the ensemble inside, placed by hand; the rest as diffusers would load it
            ensemble = DDMEnsemble.from_pretrained(path / "transformer", strategy=strategy, torch_dtype=dtype, device_map=device_map)
            vae = None
            if (path / "vae").is_dir():
                from diffusers import AutoencoderKL

                vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True).to(ensemble.router.device)
            return make_pipeline(ensemble, ensemble.flow_shift, vae)
        try:
            pipe = DDMPipeline.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UsageError(f"cannot load the pipeline in {path}: {str(e).splitlines()[0]}") from None
        pipe.set_progress_bar_config(disable=True)
        if isinstance(pipe.transformer, DDMEnsemble):
            if strategy:
                pipe.transformer.set_strategy(strategy)
        elif strategy:
            raise UsageError(f"--strategy {strategy} needs an ensemble; {path} holds a single expert")
        return pipe.to(device) if device is not None else pipe
    if (path / DDMEnsemble.config_name).is_file():
        ensemble = DDMEnsemble.from_pretrained(path, strategy=strategy, device=device, torch_dtype=dtype, device_map=device_map)
        return make_pipeline(ensemble, ensemble.flow_shift, expert_vae(ensemble.metas[0], ensemble.router.device))
    if (path / "expert.json").is_file():
        if strategy or device_map:
            raise UsageError(f"--strategy / --expert-devices need an ensemble; {path} is a single expert")
        model, meta = load_expert(path, device=device, dtype=dtype)
        return make_pipeline(model, meta["flow"]["shift"], expert_vae(meta, device))
    raise UsageError(f"{path} is not a pipeline folder (model_index.json), an ensemble (ensemble.json) or an expert (expert.json)")
