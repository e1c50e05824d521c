"""docs/api.md's whole-flow script runs as written (shrunk with STEPS=5), and the API keeps the CLI's checks."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddm import UsageError
from ddm.partition.cluster import partition
from ddm.training.train import train_island

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_script_runs_as_written(tmp_path):
    script = re.search(r"```python\n(.*?)```", (ROOT / "docs/api.md").read_text(), re.S).group(1)
    env = {**os.environ, "STEPS": "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "runs/grid.png").is_file() and (tmp_path / "runs/ensemble/model_index.json").is_file()
    assert (tmp_path / "runs/three.png").is_file()


def test_api_checks_like_the_cli(tmp_path):
    with pytest.raises(UsageError, match="unknown option 'kk'"):
        partition(data="digits", kk=4, out=str(tmp_path / "m"))
    with pytest.raises(UsageError, match="missing required option 'k'"):
        partition(data="digits", out=str(tmp_path / "m"))
    with pytest.raises(UsageError, match="k must be int"):
        partition(data="digits", k="four", out=str(tmp_path / "m"))
    with pytest.raises(UsageError, match="mixed_precision must be one of"):
        train_island(manifest=str(tmp_path), island=0, out=str(tmp_path / "e"), mixed_precision="fp8")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()
