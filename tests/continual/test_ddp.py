"""Two-process CPU (gloo) DDP run of the tiny continual-learning config through the ``lightning`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.continual.prompt_probe import run_ddp

ROOT = Path(__file__).resolve().parents[2]
LIGHTNING = Path(sys.executable).parent / "lightning"


@pytest.mark.ddp
def test_ddp_two_cpu_processes_finish_and_write_metrics(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [
        str(LIGHTNING),
        "fit",
        "-c",
        str(ROOT / "configs" / "cl_tiny.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    ]
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


def _tree_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["ft", "ftpp", "joint", "predkd", "predkd_featkd", "predkd_ewc", "predkd_l2", "l2"])
def test_every_method_config_runs_under_two_process_ddp(tmp_path: Path, method: str) -> None:
    """Each configs/cl_eval method (the prompt ones: tests/continual/test_prompts.py) on a tiny stream with 2 gloo
    processes: the ranks end with equal weights, equal anchors (EWC: the all-reduced Fisher) and equal R."""
    # 2 tasks of 2 classes; joint: one task of 4 classes
    run_ddp(tmp_path, method, "StateDump", **({"n_tasks": 1, "classes_per_task": 4} if method == "joint" else {}))
    dumps = [torch.load(tmp_path / f"state_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert _tree_equal(dumps[0], dumps[1])
    R = dumps[0]["R"]
    assert len(R) == (1 if method == "joint" else 2)
    assert all(R[i][j] is not None for i in range(len(R)) for j in range(i + 1))
    if method in ("predkd_ewc", "predkd_l2", "l2"):
        assert dumps[0]["anchors"] and all(s for s in dumps[0]["anchors"])
    assert len(list(tmp_path.glob("ddp/version_*/cl_metrics.json"))) == 1
