"""Two-process CPU (gloo) DDP run of the tiny continual-learning config through the ``lightning`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING = Path(sys.executable).parent / "lightning"


@pytest.mark.ddp
def test_ddp_two_cpu_processes_finish_and_write_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [str(LIGHTNING), "fit", "-c", str(ROOT / "configs" / "cl_tiny.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "MEMBER: 2/2" in out and "distributed_backend=gloo" in out

    written = list(tmp_path.glob("lightning_logs/cl_tiny/version_*/cl_metrics.json"))
    assert len(written) == 1  # rank zero writes, once
    metrics = json.loads(written[0].read_text())
    R = metrics["accuracy_matrix"]
    assert len(R) == 3 and all(R[i][j] is not None for i in range(3) for j in range(i + 1))
    assert 0.0 <= metrics["average_accuracy"] <= 1.0
    assert (written[0].parent / "accuracy_matrix.png").is_file()
