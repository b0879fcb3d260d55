"""``lifelong-delta pretrain`` with stderr redirected to a file (``make demo | tee log``) prints progress lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

LIFELONG_DELTA = Path(sys.executable).parent / "lifelong-delta"


def test_pretrain_writes_progress_lines_to_a_log_file(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFELONG_DELTA_PROGRESS_INTERVAL": "0"}
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:  # a file, not a terminal
        run = subprocess.run(
            [
                str(LIFELONG_DELTA),
                "pretrain",
                "--epochs",
                "1",
                "--max_per_class",
                "20",
                "--embed_dim",
                "16",
                "--depth",
                "1",
                "--num_heads",
                "2",
                "--cache_dir",
                str(tmp_path / "cache"),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
            timeout=300,
            check=False,
        )
    text = log.read_text()
    assert run.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("fit: ")]
    assert lines[0] == "fit: 0/2 steps (0%), 0 s elapsed — epoch 1/1"  # 200 images, batch 128
    step_1 = r"fit: 1/2 steps \(50%\), \d+ s elapsed, about \d+ s left — epoch 1/1, loss \d\.\d+"
    assert re.fullmatch(step_1, lines[1]), lines[1]
    assert re.fullmatch(r"fit: 2/2 steps \(100%\), done in \d+ s — epoch 1/1, loss \d\.\d+", lines[-1])
    assert "\r" not in text and "━" not in text  # Lightning's own bar is off
    assert "cached at" in run.stdout
