"""What the Gradio app (app.py) does when a button is pressed: validate, read only allowed paths, call the back ends.

Each action turns bad input into a friendly `gr.Error` before any heavy work. Every path typed into the UI goes
through `AllowedRoots.dir` (frontends/app_inputs.py), which resolves it (symlinks too) and refuses anything outside
the allowed folders. The Images and Islands tabs' actions are here; the Video tab's are in frontends/app_video.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import torch

from ddm import UsageError
from ddm.io import recorded_folder
from ddm.models.experts import read_expert_meta
from frontends.app_figures import (cluster_sizes_plot, labelled_tile, read_metrics, routing_plot, tile_grid,
                                   training_curves_plot)
from frontends.app_inputs import MAX_STEPS, UserError, float_in_range, friendly, int_in_range
from frontends.app_video import VideoActions

BUILT_IN_DATA = ("digits", "moving-digits")  # data specs of ddm.data.load_dataset that name no folder
MAX_IMAGES = 16


def ensemble_parts(path: Path) -> list[str]:
    """The folders a pipeline folder (transformer/, scheduler/, a text pipeline's text_encoder/ and tokenizer/) or an
    ensemble.json (router, experts) makes us read."""
    if (path / "model_index.json").is_file():
        text = [part for part in ("text_encoder", "tokenizer", "vae") if (path / part).is_dir()]
        return ["transformer", "scheduler", *text, *(f"transformer/{part}" for part in ensemble_parts(path / "transformer"))]
    try:
        spec = json.loads((path / "ensemble.json").read_text())
        return [spec["router"], *spec["experts"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []  # not an ensemble: load_pipeline says so


def recorded_folders(path: Path) -> dict[str, Path]:
    """The folders outside an ensemble or expert directory that loading it reads, as its experts' expert.json
    records them ("text encoder", "VAE"): the loaders' own rule (ddm.io.recorded_folder) picks which path."""
    try:
        if (path / "ensemble.json").is_file():
            experts = [path / e for e in json.loads((path / "ensemble.json").read_text())["experts"]]
        else:
            experts = [path] if (path / "expert.json").is_file() else []
        metas = {expert.name: read_expert_meta(expert) for expert in experts}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UsageError):
        return {}  # not loadable: load_pipeline says why
    return {f"{what} of {name}": recorded_folder(meta[key])
            for name, meta in metas.items() for key, what in (("text_encoder", "text encoder"), ("vae", "VAE")) if meta.get(key)}


def is_text_ensemble(path: Path) -> bool:
    """Whether a pipeline folder or ensemble directory holds text-conditional experts (read from JSON only)."""
    try:
        if (path / "model_index.json").is_file():
            return json.loads((path / "model_index.json").read_text()).get("_class_name") == "TextDDMPipeline"
    except (OSError, json.JSONDecodeError):
        return False
    return (path / "ensemble.json").is_file() and any(name.startswith("text encoder") for name in recorded_folders(path))


def class_labels(choice: str | None, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """`random` (drawn from the seed) or one class index for every image."""
    choice = str(choice if choice is not None else "random").strip().lower()
    if choice == "random":
        return torch.randint(0, num_classes, (count,), generator=torch.Generator().manual_seed(seed))
    if not choice.isdigit() or int(choice) >= num_classes:
        raise UserError(f"Class must be 'random' or a number in 0..{num_classes - 1}, got {choice!r}.")
    return torch.full((count,), int(choice))


class Actions(VideoActions):
    """The app's actions, bound to the folders it may read: the Images and Islands tabs' here, the Video tab's in
    `VideoActions`."""

    @friendly
    def islands(self, manifest_dir: str, experts_dir: str, per_cluster: int = 8):
        """Cluster sizes, sample images per cluster, and training curves of every expert under `experts_dir`."""
        from ddm.partition.manifest import Manifest

        manifest_path = self.roots.dir(manifest_dir, "Manifest directory")
        experts_path = self.roots.dir(experts_dir, "Experts directory")
        per_cluster = int_in_range(per_cluster, "Samples per cluster", 1, 32)
        manifest = Manifest.load(manifest_path)
        if manifest.data not in BUILT_IN_DATA and manifest.data.partition(":")[0] not in BUILT_IN_DATA:
            self.roots.dir(manifest.data, "The manifest's data folder")  # an image folder: allowed roots only
        dataset = manifest.load_dataset()
        if hasattr(dataset, "source_images"):  # a latent cache: show the images it was encoded from
            self.roots.dir(dataset.index["source"], "The latent cache's image folder")
            dataset = dataset.source_images()
        sizes = manifest.sizes
        clusters = []
        for k in range(manifest.k):
            indices = manifest.island_indices(k)[:per_cluster]
            if not len(indices):
                continue
            samples = [dataset[i][0] for i in indices.tolist()]
            images = torch.stack([x[:, 0] if x.dim() == 4 else x for x in samples])  # a clip: its first frame
            labels = dataset.labels[indices].tolist()
            caption = f"island {k}: {sizes[k]} samples" + (f" · labels {labels}" if min(labels) >= 0 else "")
            clusters.append((tile_grid(images), caption))
        curves = {}
        for expert in sorted(p for p in experts_path.iterdir() if (p / "metrics.jsonl").is_file()):
            steps, losses = read_metrics(expert / "metrics.jsonl")
            if steps:
                curves[expert.name] = (steps, losses)
        return cluster_sizes_plot(sizes), clusters, training_curves_plot(curves)

    def ensemble_kind(self, ensemble_dir: str) -> bool:
        """Whether the Images tab shows prompt fields (a text ensemble) or the class picker; reads JSON only."""
        try:
            return is_text_ensemble(self.roots.dir(ensemble_dir, "Ensemble directory"))
        except gr.Error:
            return False

    def check_recorded_folders(self, path: Path) -> None:
        """Experts load their text encoder and VAE from the folders their expert.json records: those must be allowed
        too (the shipped digit encoder is part of the app)."""
        from ddm.data.text_encoder import DIGIT_ENCODER

        for name, folder in recorded_folders(path).items():
            if folder.resolve() != DIGIT_ENCODER:
                self.roots.dir(str(folder), f"The experts' {name}")

    @friendly
    def generate_images(
        self, ensemble_dir: str, strategy: str, steps, cfg, seed, class_label: str, count,
        compare: bool, monolith_dir: str, prompt: str = "", negative_prompt: str = "",
    ):
        """Images through the router ensemble, its routing weights per step, optionally the monolith's (same noise).
        A text ensemble takes `prompt` (and `negative_prompt`) instead of the class."""
        from router.ensemble import DDMEnsemble
        from router.pipeline import load_pipeline

        ensemble_path = self.roots.dir(ensemble_dir, "Ensemble directory")
        for part in ensemble_parts(ensemble_path):  # ensemble.json names the folders it loads: roots only
            self.roots.dir(str(ensemble_path / part), "The ensemble's part")
        self.check_recorded_folders(ensemble_path)
        monolith_path = self.roots.dir(monolith_dir, "Monolith directory") if compare else None
        if monolith_path is not None:
            self.check_recorded_folders(monolith_path)
        steps = int_in_range(steps, "Steps", 1, MAX_STEPS)
        cfg = float_in_range(cfg, "CFG scale", 1.0, 20.0)
        seed = int_in_range(seed, "Seed", 0, 2**31 - 1)
        count = int_in_range(count, "Number of images", 1, MAX_IMAGES)
        text = is_text_ensemble(ensemble_path)
        prompt, negative_prompt = (prompt or "").strip(), (negative_prompt or "").strip()
        if text and not prompt:
            raise UserError("This ensemble is text-conditional: please enter a prompt.")
        pipe = load_pipeline(ensemble_path, strategy or None)
        ensemble = pipe.transformer
        if not isinstance(ensemble, DDMEnsemble):
            raise UserError(f"Ensemble directory {ensemble_dir!r} holds a single expert, not an ensemble.")
        if text:
            return self.generate_from_prompt(pipe, prompt, negative_prompt, steps, cfg, seed, count, monolith_path)
        num_classes = ensemble.metas[0]["num_classes"]
        labels = class_labels(class_label, count, num_classes, seed)
        images = pipe(
            labels, num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed)
        ).images
        # With CFG the ensemble also routes the unconditional rows; those of the conditional ones are plotted.
        weights = torch.stack([w[:count] for w in ensemble.routing_weights]).float().cpu()
        experts = weights.sum(0).argmax(1).tolist()  # the expert that carried most of each sample's routing weight
        captions = [f"class {c} · expert {e}" for c, e in zip(labels.tolist(), experts)]
        images = [labelled_tile(image, caption, e) for image, caption, e in zip(images, captions, experts)]
        monolith = []
        if monolith_path is not None:
            monolith_pipe = load_pipeline(monolith_path)
            model = monolith_pipe.transformer
            if model.config.sample_size != ensemble.config.sample_size or model.config.num_embeds_ada_norm != num_classes:
                raise UserError(
                    f"Monolith {monolith_dir!r} does not make the samples the ensemble makes (size or classes differ)."
                )
            monolith_images = monolith_pipe(
                labels, num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed)
            ).images
            monolith = [(labelled_tile(image, f"class {c} · monolith", None), f"class {c} · monolith")
                        for image, c in zip(monolith_images, labels.tolist())]
        return list(zip(images, captions)), routing_plot(weights, ensemble.islands), monolith

    def generate_from_prompt(self, pipe, prompt: str, negative_prompt: str, steps: int, cfg: float, seed: int, count: int,
                             monolith_path: Path | None):
        """The text ensemble's images of one prompt, each labelled with the expert that drew it, and the monolith's."""
        from router.pipeline import load_pipeline

        def sample(p):
            return p(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
                     num_images_per_prompt=count, generator=torch.Generator().manual_seed(seed)).images

        images = sample(pipe)
        ensemble = pipe.transformer
        weights = torch.stack([w[:count] for w in ensemble.routing_weights]).float().cpu()
        experts = weights.sum(0).argmax(1).tolist()
        tiles = [(labelled_tile(image, f"expert {e}", e), f"{prompt} · expert {e}") for image, e in zip(images, experts)]
        monolith = []
        if monolith_path is not None:
            monolith_pipe = load_pipeline(monolith_path)
            model = monolith_pipe.transformer
            if not hasattr(monolith_pipe, "encode_prompt") or model.config.sample_size != ensemble.config.sample_size:
                raise UserError(f"Monolith {str(monolith_path)!r} does not make the samples the ensemble makes (not text-conditional, or another size).")
            monolith = [(labelled_tile(image, "monolith", None), f"{prompt} · monolith") for image in sample(monolith_pipe)]
        return tiles, routing_plot(weights, ensemble.islands), monolith

    @friendly
    def expert_samples(self, experts_dir: str, steps, seed, class_label: str):
        """One sample per expert directory under `experts_dir`, all from the same noise and class."""
        from router.pipeline import load_pipeline

        experts_path = self.roots.dir(experts_dir, "Experts directory")
        steps = int_in_range(steps, "Steps", 1, MAX_STEPS)
        seed = int_in_range(seed, "Seed", 0, 2**31 - 1)
        expert_dirs = sorted(
            p for p in experts_path.iterdir()
            if (p / "expert.json").is_file() and read_expert_meta(p).get("model_class") == "DiTTransformer2DModel"
        )
        if not expert_dirs:
            raise UserError(
                f"Experts directory {experts_dir!r} holds no image expert (no sub-folder with a DiT expert.json)."
            )
        samples = []
        for expert_dir in expert_dirs:
            self.check_recorded_folders(expert_dir)
            pipe = load_pipeline(expert_dir)
            labels = class_labels(class_label, 1, pipe.transformer.config.num_embeds_ada_norm, seed)
            image = pipe(
                labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)
            ).images[0]
            samples.append((image, f"{expert_dir.name} · class {labels.item()}"))
        return samples

