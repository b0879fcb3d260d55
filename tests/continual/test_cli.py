"""``lightning`` on the continual-learning configs: an end-to-end run, --print_config, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lifelong_delta.cli import lightning_main, one_line_error

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LIGHTNING = Path(sys.executable).parent / "lightning"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _lightning(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LIGHTNING), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900, check=False
    )


def test_fit_cl_tiny_end_to_end(tmp_path: Path) -> None:
    run = _lightning("fit", "-c", str(CONFIGS / "cl_tiny.yaml"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "cl_tiny" / "version_0"
    metrics = json.loads((log_dir / "cl_metrics.json").read_text())
    assert {"accuracy_matrix", "average_accuracy", "forgetting", "bwt"} <= set(metrics)
    R = metrics["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert all(R[i][j] is not None for i in range(3) for j in range(i + 1))
    assert all(R[i][j] is None for i in range(3) for j in range(i + 1, 3))
    assert (log_dir / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cl_metrics.json" in run.stdout  # the path is printed
    assert {"val/acc_task0", "val/acc_seen", "train/pred_kd", "train/penalty0"} <= set(
        (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    )


def test_bad_config_key_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    foo: 1\n")
    run = _lightning("fit", "-c", str(CONFIGS / "cl_tiny.yaml"), "-c", str(bad), cwd=tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ") and "'foo'" in lines[0] and "usage" not in run.stderr


@pytest.mark.parametrize("config", ["cl_vit.yaml", "cl_mnist.yaml", "cl_tiny.yaml"])
def test_print_config(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "-c", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    out = capsys.readouterr().out
    assert "class_path: lifelong_delta.continual.ContinualModule" in out
    assert "class_path: lifelong_delta.anchors.L2Anchor" in out


def test_cl_vit_blocks_are_set_in_one_place(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lightning_main(["fit", "-c", str(CONFIGS / "cl_vit.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert out.count("blocks.[0-4].attn.qkv.*") == 2  # trainable and the L2 anchor's include
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in out and "epochs_per_task: 50" in out


def test_bad_value_and_missing_data_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "-c", str(CONFIGS / "cl_tiny.yaml"), "--model.init_args.loss", "hinge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "hinge" in err

    # ImageNet-R absent: the data module says where to put it (num_classes null: the data is read first)
    args = [
        "fit",
        "-c",
        str(CONFIGS / "cl_vit.yaml"),
        "--model.init_args.num_classes",
        "null",
        "--data.init_args.data_root",
        str(tmp_path / "imagenet-r"),
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "imagenet-r" in err


def test_one_line_error_keeps_the_nested_messages() -> None:
    message = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, B]\n'
        "  Errors:\n    - Problem with given class_path 'X':\n        Option 'foo' is not accepted\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>\n  Given value: {}\n"
    )
    assert one_line_error(message) == (
        "Parser key \"model\": Problem with given class_path 'X': Option 'foo' is not accepted"
    )
