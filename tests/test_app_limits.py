"""The app's limits (docs/app.md, docs/reliability.md): no upload route, Gradio's temp files and rendered videos in
one folder per run under the app's own outputs/app-tmp/, removed on SIGTERM and SIGINT (and, for a run that was
killed, at the next start)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ROOT = REPO / "outputs" / "app-tmp"


def start_app(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(root / f"server-{port}.log", "w")
    app = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--allow-dir", str(root)],
                           cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return app, url
        except httpx.HTTPError:
            pass
        if app.poll() is not None or time.monotonic() > deadline:
            app.kill()
            pytest.fail(f"app did not start:\n{(root / f'server-{port}.log').read_text()}")
        time.sleep(0.3)


def test_uploads_are_off_and_the_run_folder_holds_gradio_files_until_sigint(tmp_path):
    """SIGTERM is checked where test_app.py stops its app."""
    from gradio_client import Client

    from router.ensemble import DDMEnsemble
    from test_router_fixtures import make_ensemble_dirs

    router, experts = make_ensemble_dirs(tmp_path / "parts", k=2, num_classes=10)
    DDMEnsemble.from_dirs(router, experts, "top1").save_pretrained(tmp_path / "ensemble")
    killed_run = RUN_ROOT / "run-999999999"  # a PID no process has: a run that was killed
    (killed_run / "videos").mkdir(parents=True, exist_ok=True)
    (killed_run / "videos" / "left.mp4").write_bytes(b"left behind")
    app, url = start_app(tmp_path)
    run_dir = RUN_ROOT / f"run-{app.pid}"
    try:
        assert run_dir.is_dir() and not killed_run.exists()
        for route in ("gradio_api/upload", "upload", "gradio_api/upload?upload_id=x"):
            response = httpx.post(url + route, files={"files": ("a.txt", b"x" * 1000)}, timeout=10)
            assert response.status_code == 403, (route, response.status_code, response.text)
        images, _, _ = Client(url, verbose=False).predict(
            str(tmp_path / "ensemble"), "top1", 1, 1.0, 0, "3", 1, False, "", api_name="/generate_images"
        )
        assert len(images) == 1
        served = [p for p in (run_dir / "gradio").rglob("*") if p.is_file()]
        assert served and all(p.suffix == ".png" for p in served)  # Gradio's copy of the image it served
        (run_dir / "videos").mkdir(exist_ok=True)
        (run_dir / "videos" / "video-0.mp4").write_bytes(b"as a render leaves it")  # where Actions.render_video writes
    finally:
        app.send_signal(signal.SIGINT)
        app.wait(timeout=30)
    assert not run_dir.exists()
