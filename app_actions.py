"""What the Gradio app (app.py) does when a button is pressed: validate, read only allowed paths, call the back ends.

Each action turns bad input into a friendly `gr.Error` before any heavy work. Every path typed into the UI goes
through `AllowedRoots.dir`, which resolves it (symlinks too) and refuses anything outside the allowed folders.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path

import gradio as gr
import torch

from ddm import UsageError
from ddm.io import recorded_folder
from ddm.models.experts import read_expert_meta
from frontends.app_figures import (cluster_sizes_plot, labelled_tile, read_metrics, routing_plot, tile_grid,
                                   training_curves_plot)

APP_DIR = Path(__file__).resolve().parent
# A user's mistake: shown in the UI, not logged as a server traceback.
UserError = functools.partial(gr.Error, print_exception=False)
MAX_STEPS = 200
BUILT_IN_DATA = ("digits", "moving-digits")  # data specs of ddm.data.load_dataset that name no folder
MAX_IMAGES = 16
MAX_SECONDS = 600
MAX_PIXELS = 1280
MAX_WORKERS = max(1, os.cpu_count() or 1)
# Gradio's streaming video output probes and re-muxes each segment with the ffmpeg and ffprobe on PATH (the
# imageio-ffmpeg binary that writes our MP4s is not there); without them the Video tab shows only the complete MP4.
STREAMING = all(shutil.which(tool) for tool in ("ffmpeg", "ffprobe"))


class AllowedRoots:
    """The only folders the app reads from. Relative UI paths are taken from the folder the app was started in,
    as relative `--allow-dir` and `--demo-dir` are, so `python app.py --allow-dir runs` can open `runs/...`."""

    def __init__(self, roots: list[Path], base: Path | None = None):
        self.base = (base or Path.cwd()).resolve()
        self.roots = [(self.base / Path(r).expanduser()).resolve() for r in roots]

    def dir(self, text: str | None, what: str) -> Path:
        """The resolved directory, if it and every symlink inside it stay within the roots; else a UserError."""
        text = (text or "").strip()
        if not text:
            raise UserError(f"{what}: please enter a directory.")
        path = Path(text).expanduser()
        try:
            resolved = (self.base / path).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
            raise UserError(f"{what} {text!r} is not a valid path.") from None
        # Checked before existence, so the app says nothing about what lies outside its roots.
        if not self.allows(resolved):
            raise UserError(f"{what} {text!r} is outside the folders this app may read ({self.describe()}); start the app with --allow-dir DIR to add one.")
        if not resolved.is_dir():
            raise UserError(f"{what} {text!r} is not a directory.")
        for folder, dirs, files in os.walk(resolved):  # does not follow links: each is checked instead
            for name in dirs + files:
                entry = Path(folder, name)
                if entry.is_symlink() and not self.allows(entry.resolve()):
                    raise UserError(
                        f"{what} {text!r} holds a link ({entry.relative_to(resolved)}) to a place outside "
                        f"the folders this app may read ({self.describe()})."
                    )
        return resolved

    def allows(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(root) for root in self.roots)

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def friendly(fn):
    """Back-end usage errors (UsageError, a bad config) reach the user as one readable gr.Error line; also those a
    generator raises while Gradio iterates it."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UsageError as e:
                raise UserError(str(e)) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            raise UserError(str(e)) from None

    return wrapper


def int_in_range(value, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not low <= number <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {number}.")
    return number


def float_in_range(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number between {low} and {high}, got {value!r}.") from None
    if not low <= number <= high:  # also refuses NaN
        raise UserError(f"{name} must be between {low} and {high}, got {value!r}.")
    return number


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


class Actions:
    """The app's actions, bound to the folders it may read."""

    def __init__(self, roots: AllowedRoots, scratch: Path):
        self.roots = roots
        # Rendered MP4s land here (app.py removes the folder when the app exits); Gradio serves copies of them.
        self.scratch = Path(scratch)
        # The Video tab's DualParal ranks, kept warm while the model folder and the worker count stay the same.
        self.video_pool = None
        self.video_pool_lock = threading.Lock()

    def close(self) -> None:
        """Let the video ranks go (the app calls this as it exits)."""
        with self.video_pool_lock:
            if self.video_pool is not None:
                self.video_pool.close()
                self.video_pool = None

    def warm_pool(self, model_path: Path, workers: int):
        """The pool for this model and worker count: the warm one, or a new one (the old one closed)."""
        from parallel_infer.pool import RenderPool, model_key

        pool = self.video_pool
        if pool is not None and pool.alive and pool.key == model_key(model_path, workers, None):
            return pool
        if pool is not None:
            pool.close()
        self.video_pool = RenderPool(model_path, ranks=workers)
        return self.video_pool

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

    def video_model_settings(self, model_dir: str):
        """The settings a video model carries (to fill the Video tab's fields) and a note on its prompts; a folder
        that is not a video model leaves the fields as they are and says why."""
        from parallel_infer.loader import inspect_model
        from parallel_infer.model_settings import describe_sources, prompt_hints, resolve_settings
        from parallel_infer.render import VideoSettings

        keep = [gr.update()] * 7
        try:
            info = inspect_model(self.roots.dir(model_dir, "Video model directory"))
            settings, sources = resolve_settings(info, VideoSettings(seconds=1))
        except (gr.Error, UsageError) as e:
            return *keep, f"*{getattr(e, 'message', None) or e}*"
        root = str(APP_DIR)
        note = describe_sources(settings, sources).replace(root + os.sep, "")
        values = (settings.fps, settings.height, settings.width, settings.steps, settings.block, settings.cat, settings.cfg)
        return *values, f"**Prompts**: {prompt_hints(info)}.  \n**Settings** below: " + note.replace("\n", "; ")

    def video_request(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers,
    ) -> tuple[Path, int, dict]:
        """The Video tab's fields, checked: (model folder, worker count, `RenderPool.render`'s keyword arguments)."""
        model_path = self.roots.dir(model_dir, "Video model directory")
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("Prompt: please enter a prompt.")
        seconds = float_in_range(seconds, "Length (seconds)", 0.05, MAX_SECONDS)
        fps = int_in_range(fps, "fps", 1, 60)
        # 0 = the model's own size
        height = int_in_range(height, "Height (pixels, 0 = the model's)", 0, MAX_PIXELS) or None
        width = int_in_range(width, "Width (pixels, 0 = the model's)", 0, MAX_PIXELS) or None
        steps = int_in_range(steps, "Steps", 1, MAX_STEPS)
        block = int_in_range(block, "Block size", 1, 64)
        cat = int_in_range(cat, "Context size", 1, 63)
        if cat >= block:
            raise UserError(f"Context size ({cat}) must be smaller than the block size ({block}).")
        cfg = float_in_range(cfg, "CFG scale", 1.0, 20.0)
        seed = int_in_range(seed, "Seed", 0, 2**31 - 1)
        workers = int_in_range(workers, "Worker processes", 1, MAX_WORKERS)
        settings = dict(prompt=prompt, seconds=seconds, fps=fps, height=height, width=width, steps=steps, block=block,
                        cat=cat, cfg=cfg, seed=seed, negative_prompt=(negative_prompt or "").strip())
        return model_path, workers, settings

    @friendly
    def render_video(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers, progress=gr.Progress(),
    ):
        """One MP4 from `prompt` through DualParal on `workers` local processes kept warm between renders
        (parallel_infer/pool.py); progress = blocks done / total. Returns (MP4 path, record) once complete."""
        fields = (model_dir, prompt, negative_prompt, seconds, fps, height, width, steps, block, cat, cfg, seed, workers)
        *_, (_, video, record) = self.render_steps(fields, progress, live=False)  # its only item: the result
        return video, record

    @friendly
    def render_video_live(
        self, model_dir: str, prompt: str, negative_prompt: str, seconds, fps, height, width, steps, block, cat, cfg,
        seed, workers, progress=gr.Progress(),
    ):
        """As `render_video`, showing the video as it grows: yields (segment, skip, skip) as each block's segment
        is written, for the streaming player, then (skip, MP4 path, record); only the latter without STREAMING."""
        fields = (model_dir, prompt, negative_prompt, seconds, fps, height, width, steps, block, cat, cfg, seed, workers)
        yield from self.render_steps(fields, progress, live=STREAMING)

    def render_steps(self, fields: tuple, progress, live: bool):
        """Check the fields, render on the warm pool, yield each segment (`live` only) and then the result.

        The pool renders on a thread of its own, so that this generator can hand each segment to Gradio while later
        blocks render; progress is reported from here, the thread Gradio runs the event on. Gradio has read a
        segment once the generator resumes, so the segments are removed when the render is over (one whose client
        went away leaves them to the run folder's removal at exit)."""
        model_path, workers, settings = self.video_request(*fields)
        self.scratch.mkdir(parents=True, exist_ok=True)
        out = self.scratch / f"video-{uuid.uuid4().hex[:12]}.mp4"
        segments = out.with_name(f"{out.stem}-live") if live else None
        events: queue.Queue = queue.Queue()

        def render() -> None:
            try:
                with self.video_pool_lock:
                    pool = self.warm_pool(model_path, workers)
                    events.put(("start", "rendering" if pool.ready else "loading the model"))
                    record = pool.render(
                        out_path=out, segments=segments, segment_callback=lambda path, _: events.put(("segment", path)),
                        progress_callback=lambda done, total: events.put(("block", (done, total))), **settings,
                    )
                events.put(("done", record))
            except BaseException as e:  # noqa: BLE001 - raised again below, in Gradio's thread
                events.put(("error", e))

        threading.Thread(target=render, name="video-render", daemon=True).start()
        while (event := events.get())[0] not in ("done", "error"):
            kind, payload = event
            if kind == "start":
                progress(0, desc=payload)
            elif kind == "block":
                progress(payload, desc="blocks", unit="blocks")
            else:
                yield str(payload), gr.skip(), gr.skip()
        if segments is not None:
            shutil.rmtree(segments, ignore_errors=True)  # the render is over: no segment comes any more
        kind, payload = event
        if kind == "error":
            raise payload
        yield gr.skip(), str(out), payload
