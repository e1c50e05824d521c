"""The README's tour runs exactly as written, shrunk by its own variables (STEPS=5 N=16 VIDEO_SECONDS=1), in a
fresh folder; its last step starts the app, which must open the tour's runs/ folder."""
import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import httpx
from gradio_client import Client

ROOT = Path(__file__).resolve().parents[1]


def tour_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A short tour"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_tour_runs_as_written(tmp_path):
    for name in (".venv", "scripts", "ddm", "app.py", "app_actions.py"):  # the paths the tour names, as in a checkout
        (tmp_path / name).symlink_to(ROOT / name)
    block = tour_block()
    commands, app_line = block.rsplit("\npython app.py", 1)
    env = {**os.environ, "STEPS": "5", "N": "16", "VIDEO_SECONDS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"the tour failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.glob("island-?")) == ["island-0", "island-1", "island-2", "island-3"]
    assert (runs / "ensemble/model_index.json").is_file() and (runs / "grid.png").is_file()
    assert len(list((runs / "videos").glob("*.mp4"))) == 1
    assert "fid" in run.stdout and "fidelity" in run.stdout

    port = free_port()
    app = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && python app.py{app_line.rstrip()} --port {port}"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if app.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the tour's app did not start: {app.stderr.read()[-2000:] if app.poll() is not None else 'timeout'}")
            time.sleep(0.3)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, _, _ = client.predict(
            ensemble_dir="runs/ensemble", strategy="top1", steps=2, cfg=1.0, seed=0, class_label="3", count=2,
            compare=True, monolith_dir="runs/monolith", api_name="/generate_images",
        )
        assert len(gallery) == 2, "the app could not sample from the tour's runs/ensemble"
    finally:
        app.terminate()
        app.wait(timeout=20)
    assert shlex.split(app_line.strip())[:2] == ["--allow-dir", "runs"]
