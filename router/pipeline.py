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
from diffusers.utils.torch_utils import randn_tensor

from ddm import UsageError
from ddm.io import verify_owned
from router.output import OUTPUT_TYPES, finish, guided_euler, save_whole
from router.strategies import DEFAULT_GUIDANCE_ROUTING, check_guidance_routing



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
        latents = guided_euler(self, latents, num_inference_steps, guidance_scale, class_labels=labels)
        return finish(self, latents, output_type, return_dict)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        save_whole(self, save_directory, safe_serialization, **kwargs)


def make_pipeline(transformer, flow_shift: float = 1.0, vae=None) -> DDMPipeline:
    """The pipeline with its scheduler on the experts' SD3 shift (and the VAE of latent-space experts)."""
    pipe = DDMPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=flow_shift), vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_for(transformer, meta: dict, device=None, text_encoder=None):
    """The pipeline of a model (an expert or an ensemble; `meta` one expert.json): text experts get a TextDDMPipeline
    with their text encoder (or `text_encoder`, a folder checked to be the same), class experts a DDMPipeline."""
    from ddm.data.vae import expert_vae
    from router.members import conditioning

    vae = expert_vae(meta, device)
    if conditioning(meta) == "text":
        from router.text_pipeline import make_text_pipeline

        return make_text_pipeline(transformer, meta, vae, text_encoder, device)
    if text_encoder is not None:
        raise UsageError("--text-encoder goes with text-conditional experts; these are class-conditional")
    return make_pipeline(transformer, meta["flow"]["shift"], vae)


def ensemble_pipeline(router_dir, expert_dirs, strategy: str | None = None, device=None, dtype=None, device_map=None,
                      text_encoder=None):
    """Router directory + any subset of expert directories → a pipeline over their ensemble (experts on the
    devices of `device_map`, see DDMEnsemble.from_dirs): a DDMPipeline, or a TextDDMPipeline for text experts."""
    from router.ensemble import DDMEnsemble
    from router.strategies import DEFAULT_STRATEGY

    ensemble = DDMEnsemble.from_dirs(router_dir, expert_dirs, strategy or DEFAULT_STRATEGY, device, dtype, device_map=device_map)
    return pipeline_for(ensemble, ensemble.metas[0], ensemble.router.device, text_encoder)


def load_pipeline(path, strategy: str | None = None, device=None, dtype=None, device_map=None, text_encoder=None):
    """A pipeline from a pipeline folder (model_index.json), an ensemble (ensemble.json) or one expert (expert.json):
    a DDMPipeline, or a TextDDMPipeline (router/text_pipeline.py) for text-conditional experts.

    `strategy` overrides an ensemble's routing strategy and `device_map` places its experts (DDMEnsemble.from_dirs);
    a single expert has neither. `text_encoder` gives the folder of the experts' text encoder when it moved.
    """
    from ddm.models.experts import load_expert
    from router.ensemble import DDMEnsemble

    path = Path(path)
    if (path / "model_index.json").is_file():
        try:
            class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{path / 'model_index.json'} is unreadable: {e}") from None
        if class_name not in (DDMPipeline.__name__, "TextDDMPipeline"):
            raise UsageError(f"{path} holds a {class_name} pipeline, not a {DDMPipeline.__name__} or TextDDMPipeline")
        verify_owned(path, "pipeline")  # every file as ddm wrote it (SHA-256)
        if class_name == "TextDDMPipeline":
            return load_text_folder(path, strategy, device, dtype, device_map)
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
        return loaded_folder(pipe, path, strategy, device, device_map)
    if (path / DDMEnsemble.config_name).is_file():
        ensemble = DDMEnsemble.from_pretrained(path, strategy=strategy, device=device, torch_dtype=dtype, device_map=device_map)
        return pipeline_for(ensemble, ensemble.metas[0], ensemble.router.device, text_encoder)
    if (path / "expert.json").is_file():
        if strategy or device_map:
            raise UsageError(f"--strategy / --expert-devices need an ensemble; {path} is a single expert")
        model, meta = load_expert(path, device=device, dtype=dtype)
        return pipeline_for(model, meta, device, text_encoder)
    raise UsageError(f"{path} is not a pipeline folder (model_index.json), an ensemble (ensemble.json) or an expert (expert.json)")


def load_text_folder(path: Path, strategy, device, dtype, device_map):
    """A TextDDMPipeline folder; with `device_map` its ensemble is loaded placed by hand and handed to diffusers."""
    from router.ensemble import DDMEnsemble
    from router.text_pipeline import TextDDMPipeline

    parts = {}
    if device_map is not None:
        parts["transformer"] = DDMEnsemble.from_pretrained(path / "transformer", strategy=strategy, torch_dtype=dtype, device_map=device_map)
    try:
        pipe = TextDDMPipeline.from_pretrained(path, torch_dtype=dtype, use_safetensors=True, **parts)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"cannot load the pipeline in {path}: {str(e).splitlines()[0]}") from None
    return loaded_folder(pipe, path, strategy, device, device_map)


def loaded_folder(pipe, path: Path, strategy, device, device_map):
    """A pipeline just read from a folder, made ready: quiet, on `strategy` (an ensemble only), on `device` (unless
    `device_map` placed its experts)."""
    from router.ensemble import DDMEnsemble

    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe.transformer, DDMEnsemble):
        if strategy:
            pipe.transformer.set_strategy(strategy)
    elif strategy:
        raise UsageError(f"--strategy {strategy} needs an ensemble; {path} holds a single expert")
    return pipe.to(device) if device is not None and device_map is None else pipe
