"""The Gradio app: images through the router ensemble, long videos through DualParal, and the islands behind them.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--allow-dir DIR ...] [--demo-dir outputs/demo]

It binds to 127.0.0.1 unless told otherwise, makes no public link unless `--share`, sends no analytics, and reads
only below outputs/ and the `--allow-dir` folders. Every button is also an HTTP API endpoint (see `api_name`s).
No component takes a file, so the upload route is turned off. Rendered videos and Gradio's own copies of what it
serves live in one folder per run, outputs/app-tmp/run-PID/, removed when the app exits (also on SIGINT or
SIGTERM; a killed run's folder goes at the next start). The actions themselves live in app_actions.py.
"""
from __future__ import annotations

import os
from pathlib import Path

# Before gradio is imported, which reads both at import time: no analytics, and its temp files in our run folder.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
RUN_ROOT = Path(__file__).resolve().parent / "outputs" / "app-tmp"
RUN_DIR = RUN_ROOT / f"run-{os.getpid()}"
os.environ["GRADIO_TEMP_DIR"] = str(RUN_DIR / "gradio")

import argparse
import atexit
import shutil
import signal
import sys

import gradio as gr
from starlette.middleware import Middleware

from app_actions import MAX_IMAGES, Actions
from frontends.app_inputs import MAX_STEPS, AllowedRoots
from frontends.app_video import APP_DIR, MAX_SECONDS, MAX_WORKERS, STREAMING
from router.strategies import DEFAULT_STRATEGY

MAX_FILE_SIZE = "1mb"  # Gradio's upload limit, should an upload route ever be turned back on

# Small images (8×8 digits) stay crisp when the browser enlarges them.
CSS = ".pixelated img, .pixelated video { image-rendering: pixelated; }"
STRATEGIES = [DEFAULT_STRATEGY, "top1", "full", "topk:2", "threshold:0.1", "sample:1", "trajectory"]
CLASSES = ["random", *map(str, range(10))]


def build_app(actions: Actions, demo_dir: str) -> gr.Blocks:
    with gr.Blocks(title="ddm-suite", analytics_enabled=False) as app:
        gr.Markdown(
            "# ddm-suite\nDecentralized diffusion (islands → experts → router ensemble) and DualParal long videos. "
            f"The defaults point at `{demo_dir}` (run `make demo` first). "
            f"Paths are read only below: `{actions.roots.describe()}`."
        )
        images_tab(actions, demo_dir)
        video_tab(app, actions, demo_dir)
        islands_tab(actions, demo_dir)
    return app


def images_tab(actions: Actions, demo_dir: str) -> None:
    with gr.Tab("Images", id="images"):
        with gr.Row():
            with gr.Column(scale=1):
                ensemble_dir = gr.Textbox(f"{demo_dir}/ensemble", label="Ensemble directory (router + experts)")
                strategy = gr.Dropdown(STRATEGIES, value=DEFAULT_STRATEGY, allow_custom_value=True, label="Routing strategy")
                image_class = gr.Dropdown(CLASSES, value="random", allow_custom_value=True, label="Class")
                prompt = gr.Textbox("", label="Prompt (text ensembles)", visible=False, elem_id="prompt")
                negative_prompt = gr.Textbox("", label="Negative prompt", visible=False, elem_id="negative-prompt")
                with gr.Row():
                    image_steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
                    image_cfg = gr.Slider(1.0, 20.0, value=1.5, step=0.1, label="CFG scale")
                with gr.Row():
                    image_seed = gr.Number(0, precision=0, label="Seed")
                    image_count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="Number of images")
                compare = gr.Checkbox(False, label="Compare with the monolith (same noise)")
                monolith_dir = gr.Textbox(f"{demo_dir}/experts/monolith", label="Monolith directory")
                generate_button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                with gr.Row():
                    ensemble_gallery = gr.Gallery(
                        label="Ensemble (framed in the colour of the expert that drew each sample)", columns=2,
                        height="auto", format="png", object_fit="contain", elem_id="ensemble-gallery",
                        elem_classes="pixelated",
                    )
                    monolith_gallery = gr.Gallery(
                        label="Monolith (same noise)", columns=2, height="auto", format="png", object_fit="contain",
                        visible=False,
                        elem_id="monolith-gallery", elem_classes="pixelated",
                    )
                routing = gr.Plot(label="Routing weights per expert over the sampling steps")
    compare.change(lambda on: gr.Gallery(visible=on), compare, monolith_gallery, api_visibility="private", queue=False)

    def show_fields(directory):  # a text ensemble takes prompts, a class ensemble keeps the class picker
        text = actions.ensemble_kind(directory)
        return gr.Dropdown(visible=not text), gr.Textbox(visible=text), gr.Textbox(visible=text)

    ensemble_dir.change(show_fields, ensemble_dir, [image_class, prompt, negative_prompt], api_visibility="private", queue=False)
    generate_button.click(
        actions.generate_images,
        inputs=[
            ensemble_dir, strategy, image_steps, image_cfg, image_seed, image_class, image_count, compare, monolith_dir,
            prompt, negative_prompt,
        ],
        outputs=[ensemble_gallery, routing, monolith_gallery],
        api_name="generate_images",
        concurrency_id="images",
        concurrency_limit=2,
    )


def video_tab(app: gr.Blocks, actions: Actions, demo_dir: str) -> None:
    with gr.Tab("Video", id="video"):
        with gr.Row():
            with gr.Column(scale=1):
                video_model_dir = gr.Textbox(
                    f"{demo_dir}/video-model",
                    label="Model directory (our video expert or a local Wan2.1 diffusers folder)",
                )
                model_notes = gr.Markdown(elem_id="video-model-notes")
                prompt = gr.Textbox("a 3 moving right", label="Prompt")
                negative_prompt = gr.Textbox(
                    "", label="Negative prompt (guidance's unconditional branch; empty = none)",
                    elem_id="video-negative-prompt",
                )
                with gr.Row():
                    seconds = gr.Number(
                        4, minimum=0.05, maximum=MAX_SECONDS, label="Length (seconds)", elem_id="video-seconds"
                    )
                    fps = gr.Slider(1, 60, value=16, step=1, label="fps")
                with gr.Row():
                    height = gr.Number(
                        0, precision=0, minimum=0, label="Height (0 = the model's)", elem_id="video-height"
                    )
                    width = gr.Number(
                        0, precision=0, minimum=0, label="Width (0 = the model's)", elem_id="video-width"
                    )
                with gr.Row():
                    video_steps = gr.Slider(1, MAX_STEPS, value=10, step=1, label="Steps", elem_id="video-steps")
                    video_cfg = gr.Slider(1.0, 20.0, value=3.0, step=0.1, label="CFG scale")
                with gr.Row():
                    block = gr.Slider(1, 64, value=5, step=1, label="Block size (latent frames)")
                    cat = gr.Slider(1, 63, value=3, step=1, label="Context size (latent frames)")
                with gr.Row():
                    video_seed = gr.Number(0, precision=0, label="Seed")
                    workers = gr.Slider(
                        1, MAX_WORKERS, value=min(2, MAX_WORKERS), step=1, label="Worker processes",
                        elem_id="video-workers",
                    )
                render_button = gr.Button("Render", variant="primary")
            with gr.Column(scale=2):
                # Streams each block as it is written (HLS of per-block H.264 segments); the complete MP4 below.
                live = gr.Video(
                    label="Live: blocks as they are written", height=420, streaming=True, autoplay=True,
                    visible=STREAMING, elem_id="video-live", elem_classes="pixelated",
                )
                if not STREAMING:
                    gr.Markdown("*Install ffmpeg (with ffprobe) to watch the video as it grows; until then the "
                                "complete MP4 shows once rendered.*")
                video = gr.Video(
                    label="Video (the complete MP4)", height=420, autoplay=True, loop=True,
                    elem_id="video-player", elem_classes="pixelated",
                )
                video_record = gr.JSON(label="Settings, frames and timings")
    # The fields take the settings the model carries (its video_settings.json) when the folder is entered.
    gr.on(
        [app.load, video_model_dir.submit, video_model_dir.blur],
        actions.video_model_settings,
        inputs=video_model_dir,
        outputs=[fps, height, width, video_steps, block, cat, video_cfg, model_notes],
        api_name="video_model_settings",
        concurrency_id="video-settings",
    )
    render_inputs = [
        video_model_dir, prompt, negative_prompt, seconds, fps, height, width, video_steps, block, cat, video_cfg,
        video_seed, workers,
    ]
    render_button.click(
        actions.render_video_live,
        inputs=render_inputs,
        outputs=[live, video, video_record],
        api_name="render_video_live",
        concurrency_id="video",
        concurrency_limit=1,  # a render already uses several processes; the next one waits in the queue
    )
    # The same render as an API endpoint that returns (MP4, record) once complete, with no stream: no trigger in
    # the page, only clients call it.
    gr.on(
        [], actions.render_video, inputs=render_inputs, outputs=[video, video_record], api_name="render_video",
        concurrency_id="video", concurrency_limit=1,
    )


def islands_tab(actions: Actions, demo_dir: str) -> None:
    with gr.Tab("Islands", id="islands"):
        with gr.Row():
            manifest_dir = gr.Textbox(f"{demo_dir}/manifest", label="Manifest directory")
            experts_dir = gr.Textbox(f"{demo_dir}/experts", label="Experts directory (one sub-folder per expert)")
            per_cluster = gr.Slider(1, 32, value=8, step=1, label="Samples per cluster")
        islands_button = gr.Button("Show islands", variant="primary")
        with gr.Row():
            sizes_plot = gr.Plot(label="Cluster sizes")
            curves_plot = gr.Plot(label="Training curves")
        cluster_gallery = gr.Gallery(
            label="Sample images per cluster", columns=4, format="png", object_fit="contain", elem_classes="pixelated"
        )
        with gr.Row():
            sample_steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
            sample_seed = gr.Number(0, precision=0, label="Seed")
            sample_class = gr.Dropdown(CLASSES, value="random", allow_custom_value=True, label="Class")
        samples_button = gr.Button("One sample per expert")
        expert_gallery = gr.Gallery(
            label="One sample per expert (same noise)", columns=6, format="png", elem_classes="pixelated"
        )
    islands_button.click(
        actions.islands,
        inputs=[manifest_dir, experts_dir, per_cluster],
        outputs=[sizes_plot, cluster_gallery, curves_plot],
        api_name="islands",
        concurrency_id="islands",
        concurrency_limit=2,
    )
    samples_button.click(
        actions.expert_samples,
        inputs=[experts_dir, sample_steps, sample_seed, sample_class],
        outputs=expert_gallery,
        api_name="expert_samples",
        concurrency_id="islands",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument(
        "--allow-dir", action="append", default=[], metavar="DIR", help="another folder the app may read (repeatable)"
    )
    parser.add_argument("--demo-dir", default="outputs/demo", help="where the UI's defaults point (make demo's output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for folder in args.allow_dir:
        if not Path(folder).is_dir():
            print(f"error: --allow-dir {folder!r} is not a directory", file=sys.stderr)
            return 2
    if not 0 < args.port < 65536:
        print(f"error: --port {args.port} is outside 1..65535", file=sys.stderr)
        return 2
    roots = AllowedRoots([APP_DIR / "outputs", *args.allow_dir])
    start_run_dir()
    videos = RUN_DIR / "videos"
    actions = Actions(roots, videos)
    app = build_app(actions, args.demo_dir)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=args.host, server_port=args.port, share=args.share, css=CSS, max_file_size=MAX_FILE_SIZE,
            allowed_paths=[str(videos)],  # Gradio serves only files it made, from the temp dir or these folders
            app_kwargs={"middleware": [Middleware(NoUploads)]},
        )
    finally:
        actions.close()  # the Video tab's warm worker processes
    return 0


class NoUploads:
    """ASGI middleware: refuses Gradio's upload route (POST .../upload), which no component of this app needs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").lower().endswith("/upload"):
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("uploads are turned off in this app", status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def start_run_dir() -> None:
    """This run's temp folder, removed at exit and on SIGINT/SIGTERM; folders of runs that were killed go now."""
    for old in RUN_ROOT.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    atexit.register(remove_run_dir)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_on_signal)


def remove_run_dir() -> None:
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def stop_on_signal(signum, frame) -> None:
    remove_run_dir()
    os._exit(128 + signum)  # the server threads would keep a plain exit waiting; the temp files are gone already


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
