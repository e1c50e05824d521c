"""The Gradio app over real HTTP (gradio_client) and in headless Chromium (playwright).

One app process serves the whole module: it is started as `python app.py` on a free localhost port, with its
defaults pointed at a tiny demo tree built here (a manifest, three tiny island experts, a monolith, a router
ensemble), exactly the layout `make demo` writes under outputs/demo.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import imageio_ffmpeg
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from ddm.data.images import DigitsDataset
from ddm.models.experts import build_dit, load_expert, write_expert
from ddm.flow import FlowConfig
from ddm.partition.manifest import Manifest
from ddm.data.moving_digits import MovingDigitsDataset
from parallel_infer.tiny import write_tiny_model
from router.ensemble import DDMEnsemble
from router.model import RouterModel

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "outputs" / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
K = 3
VIDEO_PROMPT = "a cat runs"


def build_demo_tree(demo: Path) -> None:
    """manifest/, experts/island-K/ + experts/monolith/ (with metrics.jsonl), ensemble/ (router + experts)."""
    torch.manual_seed(0)
    data = DigitsDataset()
    manifest = Manifest(
        k=K, data="digits", data_fingerprint=data.fingerprint, method="kmeans", extractor="pixels", seed=0,
        assignments=data.labels % K, centroids=torch.zeros(K, 64), image_size=8,
    )
    manifest.save(demo / "manifest")
    clips = MovingDigitsDataset("moving-digits:clips=12,frames=4,size=12")
    Manifest(k=2, data=clips.config.spec(), data_fingerprint=clips.fingerprint, method="random", extractor="clips",
             seed=0, assignments=torch.arange(12) % 2, centroids=torch.zeros(2, 4)).save(demo / "video-manifest")
    flow = FlowConfig().to_dict()
    for island in [*range(K), "all"]:
        out = demo / "experts" / (f"island-{island}" if island != "all" else "monolith")
        model = build_dit("tiny", 8, 1, 10)
        meta = {"island": island, "k": K, "manifest_fingerprint": manifest.fingerprint, "flow": flow, "num_classes": 10}
        write_expert(out, model, model, meta)
        log = [{"step": s, "loss": 1.0 / (s + 1) + 0.05 * (island == "all")} for s in range(0, 50, 5)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 55, "lo')
    experts = [load_expert(demo / "experts" / f"island-{k}") for k in range(K)]
    router = RouterModel(num_experts=K, sample_size=8, in_channels=1, num_classes=10, hidden_dim=32, flow=flow,
                         manifest_fingerprint=manifest.fingerprint)
    ensemble = DDMEnsemble(router, [model for model, _ in experts], [meta for _, meta in experts], "top1")
    ensemble.save_pretrained(demo / "ensemble")
    write_tiny_model(demo / "video-model", layers=3, prompts=(VIDEO_PROMPT, ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, demo dir, allowed root) of a running `python app.py`."""
    root = tmp_path_factory.mktemp("app")
    demo = root / "demo"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--allow-dir", str(root), "--demo-dir", str(demo)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        build_demo_tree(demo)  # while the app starts: it reads nothing before a button is pressed
        (demo / "escape").symlink_to("/etc")  # inside an allowed root, but resolves outside it
        (demo / "leaky").mkdir()  # a folder inside, holding a link out
        (demo / "leaky" / "config.json").symlink_to("/etc/hostname")
        (demo / "forged-ensemble").mkdir()  # an ensemble.json that names folders outside
        forged = {"router": "/etc", "experts": ["../../../etc"]}
        (demo / "forged-ensemble" / "ensemble.json").write_text(json.dumps(forged))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"app did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url, demo, root
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    # SIGTERM removes the app's temp folder (rendered videos, Gradio's copies); SIGINT: test_app_limits.py
    assert not (REPO / "outputs" / "app-tmp" / f"run-{server.pid}").exists()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def png(path) -> Image.Image:
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def test_generate_images_with_routing_and_monolith(client, served):
    _, demo, _ = served
    args = dict(ensemble_dir=str(demo / "ensemble"), strategy="topk:2", steps=4, cfg=1.5, seed=7, class_label="random",
                count=3, compare=True, monolith_dir=str(demo / "experts" / "monolith"))
    images, routing, monolith = client.predict(**args, api_name="/generate_images")
    assert len(images) == 3 and len(monolith) == 3
    for item in images + monolith:  # 8x8 samples enlarged 20x, framed, the caption also written in a bar above
        assert png(item["image"]).size == (8 * 20 + 8, 8 * 20 + 8 + 2 * 26)
    assert all(item["caption"].startswith("class ") and "expert " in item["caption"] for item in images)
    bar = png(images[0]["image"]).convert("L").crop((0, 0, 8 * 20 + 8, 26))
    assert bar.getextrema()[1] == 255  # the white label is drawn in the bar
    assert routing["type"] == "matplotlib" and routing["plot"].startswith("data:image/")
    again, _, _ = client.predict(**args, api_name="/generate_images")  # same seed, same images
    assert [png(a["image"]).tobytes() for a in again] == [png(b["image"]).tobytes() for b in images]
    assert [png(a["image"]).tobytes() for a in again] != [png(b["image"]).tobytes() for b in monolith]


def test_islands_and_one_sample_per_expert(client, served):
    _, demo, _ = served
    sizes, clusters, curves = client.predict(str(demo / "manifest"), str(demo / "experts"), 5, api_name="/islands")
    assert sizes["type"] == curves["type"] == "matplotlib"
    expected = [f"island {k}: {n} samples" for k, n in enumerate(Manifest.load(demo / "manifest").sizes)]
    assert [c["caption"].split(" · ")[0] for c in clusters] == expected
    assert png(clusters[0]["image"]).size == (3 * 9 - 1, 2 * 9 - 1)  # five 8×8 samples on a 3×2 grid, 1-pixel gaps
    _, clips, _ = client.predict(str(demo / "video-manifest"), str(demo / "experts"), 4, api_name="/islands")
    assert [c["caption"].split(" · ")[0] for c in clips] == ["island 0: 6 samples", "island 1: 6 samples"]
    assert png(clips[1]["image"]).size == (2 * 13 - 1, 2 * 13 - 1)  # first frames of four 12×12 clips, 2×2
    samples = client.predict(str(demo / "experts"), 3, 0, "4", api_name="/expert_samples")
    names = ["island-0", "island-1", "island-2", "monolith"]
    assert [s["caption"] for s in samples] == [f"{name} · class 4" for name in names]
    assert all(png(s["image"]).size == (8, 8) for s in samples)


def test_render_video_on_two_worker_processes(client, served):
    _, demo, _ = served
    # A core test, like the browser one: the live player needs both on PATH, and `make test` installs them.
    assert shutil.which("ffmpeg") and shutil.which("ffprobe"), "ffmpeg/ffprobe missing: `make test` installs Debian's ffmpeg"
    args = dict(model_dir=str(demo / "video-model"), prompt=VIDEO_PROMPT, seconds=1.5, fps=8, height=16, width=24,
                steps=3, block=4, cat=2, cfg=1.0, seed=3)
    job = client.submit(**args, workers=2, api_name="/render_video_live")  # the Render button's endpoint
    unchanged, video, record = job.result()
    assert unchanged == {"__type__": "update"}  # the live player keeps its stream; the MP4 comes in its own player
    assert imageio_ffmpeg.count_frames_and_secs(video)[0] == 12 == record["frames_written"]  # 1.5 s at 8 fps
    # 12 frames → 14 latent frames = block + cat + 2 blocks (6, 4, 4 frames, the last cut to 2): one yield per block
    # to the streaming player, whose HLS playlist then lists that block's segment (Gradio re-muxed it; the client
    # fetches the playlist as each yield arrives, so a later one may already hold the next segment)
    playlists = [Path(live).read_text() for live, _, _ in job.outputs()[:-1]]
    assert len(playlists) == 3 and len(job.outputs()) == 4
    segments = [[float(line[8:-1]) for line in text.splitlines() if line.startswith("#EXTINF:")] for text in playlists]
    assert segments[-1] == [6 / 8, 4 / 8, 2 / 8] and all(len(s) > i for i, s in enumerate(segments))
    assert not list((REPO / "outputs" / "app-tmp").glob("run-*/videos/*-live"))  # removed once the render was over
    updates = []
    while not job.communicator.updates.empty():
        updates += getattr(job.communicator.updates.get_nowait(), "progress_data", None) or []
    # Gradio sends only the latest progress at each 10 ms tick, so a busy machine may merge updates: the bar counts
    # the 3 blocks written and only moves forward.
    blocks = [(u.index, u.length) for u in updates if u.unit == "blocks"]
    assert blocks and set(blocks) <= {(1, 3), (2, 3), (3, 3)} and blocks == sorted(set(blocks))
    assert record["ranks"] == 2 and (record["settings"]["height"], record["settings"]["width"]) == (16, 24)
    meta, *frames = imageio_ffmpeg.read_frames(video)
    assert meta["size"] == (24, 16) and len(frames) == 12
    # /render_video: the same render, no stream, (MP4, record) once complete. DualParal: the same video on one process
    single, first = client.predict(**args, workers=1, api_name="/render_video")
    assert list(imageio_ffmpeg.read_frames(single))[1:] == frames
    # The worker count changed, so that render loaded the model again; the next one finds it warm.
    _, again = client.predict(**{**args, "seed": 4}, workers=1, negative_prompt="", api_name="/render_video")
    assert first["timings_s"]["load"] > 0.5 and again["timings_s"]["load"] < 0.1 and again["settings"]["seed"] == 4


def test_the_video_model_fills_in_its_settings_and_prompt_hints(client, served):
    _, demo, _ = served
    (demo / "video-model" / "video_settings.json").write_text('{"steps": 7, "block": 6, "cat": 2, "cfg": 2.5, "fps": 12, "size": 24}')
    try:
        fps, height, width, steps, block, cat, cfg, notes = client.predict(str(demo / "video-model"), api_name="/video_model_settings")
    finally:
        (demo / "video-model" / "video_settings.json").unlink()
    assert (fps, height, width, steps, block, cat, cfg) == (12, 24, 24, 7, 6, 2, 2.5)
    assert "video_settings.json" in notes and "a cat runs" in notes  # where they came from; the known prompts
    *_, notes = client.predict(str(demo / "missing"), api_name="/video_model_settings")
    assert "not a directory" in notes


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cat=4), "Context size \\(4\\) must be smaller than the block size \\(4\\)"),
        (dict(prompt="  "), "Prompt: please enter a prompt"),
        (dict(workers=99), "Value 99 is greater than maximum value"),
        (dict(model_dir="../../etc/passwd"), "outside the folders this app may read"),
        (dict(prompt="a cow"), "'a cow' has no precomputed embedding"),  # the pool's check, on the render's thread
    ],
)
@pytest.mark.parametrize("endpoint", ["/render_video", "/render_video_live"])
def test_bad_video_inputs_get_friendly_errors(client, served, change, message, endpoint):
    _, demo, _ = served
    args = dict(model_dir=str(demo / "video-model"), prompt=VIDEO_PROMPT, seconds=1, fps=8, height=16, width=16,
                steps=2, block=4, cat=2, cfg=1.0, seed=0, workers=1)
    with pytest.raises(AppError, match=message):
        client.predict(**{**args, **change}, api_name=endpoint)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc", "escape", "escape/ssl", "leaky", "forged-ensemble"])
def test_paths_outside_allowed_roots_are_refused(client, served, path):
    _, demo, _ = served
    path = str(demo / path) if not path.startswith(("/", "..")) else path
    with pytest.raises(AppError, match="outside the folders this app may read"):
        client.predict(path, "top1", 2, 1.0, 0, "1", 1, False, "", api_name="/generate_images")
    if "forged" not in path:  # only an ensemble.json names other folders
        with pytest.raises(AppError, match="outside the folders this app may read"):
            client.predict(path, str(demo / "experts"), 4, api_name="/islands")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(strategy="topk:9"), "k must be an integer in 1..3"),
        (dict(strategy="bogus"), "unknown strategy 'bogus'"),
        (dict(class_label="12"), "Class must be 'random' or a number in 0..9, got '12'"),
        (dict(ensemble_dir="experts/nowhere"), "is not a directory"),
        (dict(compare=True, monolith_dir=""), "Monolith directory: please enter a directory"),
    ],
)
def test_bad_image_inputs_get_friendly_errors(client, served, change, message):
    _, demo, _ = served
    args = dict(ensemble_dir=str(demo / "ensemble"), strategy="top1", steps=2, cfg=1.0, seed=0, class_label="1",
                count=1, compare=False, monolith_dir="")
    if change.get("ensemble_dir"):
        change["ensemble_dir"] = str(demo / change["ensemble_dir"])
    with pytest.raises(AppError, match=message):
        client.predict(**{**args, **change}, api_name="/generate_images")


def test_browser_generates_and_screenshots_every_tab(served):
    url, _, _ = served
    # A core test: no browser fails it (`make test` installs Debian's chromium with apt-get), it is never skipped.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs it with apt-get (Debian's chromium package)"
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="Images").click()
        page.get_by_label("Compare with the monolith (same noise)").check()
        page.get_by_role("button", name="Generate").click()
        page.locator("#ensemble-gallery img").first.wait_for(timeout=60_000)
        page.locator("#monolith-gallery img").first.wait_for(timeout=60_000)
        page.get_by_text("Routing weights per expert").wait_for()
        page.screenshot(path=ARTIFACTS / "app-images.png", full_page=True)
        page.get_by_role("tab", name="Video").click()
        page.get_by_label("Prompt", exact=True).fill(VIDEO_PROMPT)
        for field, value in [("seconds", "1"), ("height", "32"), ("width", "32"), ("steps", "3"), ("workers", "1")]:
            page.locator(f"#video-{field} input[type=number]").fill(value)
            page.locator(f"#video-{field} input[type=number]").press("Enter")
        segments = set()
        page.on("response", lambda r: segments.add(r.url) if "/stream/" in r.url and r.url.endswith(".ts") else None)
        page.get_by_role("button", name="Render").click()
        page.locator("#video-player video").wait_for(timeout=60_000)
        # The live player (hls.js) fetched a segment per block and played the stream, which ends as long as the MP4.
        page.wait_for_function("""() => {
            const [live, mp4] = ["#video-live video", "#video-player video"].map(s => document.querySelector(s));
            return live && !live.error && live.currentTime > 0 && Math.abs(live.duration - mp4.duration) < 0.1;
        }""", timeout=30_000)
        assert len(segments) >= 2
        page.screenshot(path=ARTIFACTS / "app-video.png", full_page=True)
        page.get_by_role("tab", name="Islands").click()
        page.get_by_role("button", name="Show islands").click()
        page.get_by_text("island 0:").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="One sample per expert").click()
        page.get_by_text("monolith · class").first.wait_for(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "app-islands.png", full_page=True)
        browser.close()
    for name in ("app-images.png", "app-video.png", "app-islands.png"):
        assert png(ARTIFACTS / name).size[0] >= 1280


def test_an_expert_recording_a_vae_outside_the_roots_is_refused_before_loading(tmp_path):
    import gradio as gr

    from app_actions import Actions
    from frontends.app_inputs import AllowedRoots
    from ddm.models.experts import EXPERT_FORMAT

    outside, allowed = tmp_path / "elsewhere" / "vae", tmp_path / "allowed"
    outside.mkdir(parents=True)
    record = {"path": str(outside), "abspath": str(outside), "hash": "0" * 64}
    for name in ("router", "island-0"):
        (allowed / "ens" / name).mkdir(parents=True)
    (allowed / "ens" / "island-0" / "expert.json").write_text(json.dumps(
        {"format": EXPERT_FORMAT, "model_class": "DiTTransformer2DModel", "island": 0, "vae": record}))
    (allowed / "ens" / "ensemble.json").write_text(json.dumps({"router": "router", "experts": ["island-0"]}))
    actions = Actions(AllowedRoots([allowed]), tmp_path / "scratch")
    common = dict(strategy="top1", steps=2, cfg=1.0, seed=0, class_label="random", count=1, compare=False, monolith_dir="")
    with pytest.raises(gr.Error, match="The experts' VAE of island-0 .*outside the folders this app may read"):
        actions.generate_images(ensemble_dir=str(allowed / "ens"), **common)
    with pytest.raises(gr.Error, match="The experts' VAE of island-0 .*outside the folders this app may read"):
        actions.expert_samples(str(allowed / "ens"), 2, 0, "random")
