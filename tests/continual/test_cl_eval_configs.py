"""The baseline configs of ``configs/cl_eval/``: each parses, and each offline method runs a tiny task pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifelong_delta.cli import lightning_main

CL_EVAL = Path(__file__).resolve().parents[2] / "configs" / "cl_eval"
OFFLINE = [
    "ft",
    "ftpp",
    "joint",
    "l2p",
    "dualprompt",
    "codap",
    "predkd",
    "predkd_featkd",
    "predkd_ewc",
    "predkd_l2",
    "l2",
]
IMAGENET_R = ["l2p", "dualprompt", "codap", "l2"]
CLASS_PATH = {"l2p": "prompts.L2P", "dualprompt": "prompts.DualPrompt", "codap": "prompts.CodaPrompt"}
# The offline ViT's shape (4 blocks, width 64, mean pooling) at 8x8 px: every method config fits it unchanged.
TINY_VIT = (
    "{img_size: 8, patch_size: 4, in_chans: 1, embed_dim: 64, depth: 4, num_heads: 4, class_token: false, "
    "global_pool: avg}"
)


def test_every_method_has_a_config() -> None:
    assert sorted(p.stem for p in (CL_EVAL / "mnist").glob("*.yaml")) == sorted(OFFLINE + ["base"])
    assert sorted(p.stem for p in (CL_EVAL / "imagenet_r").glob("*.yaml")) == sorted(IMAGENET_R + ["base"])


@pytest.mark.parametrize(
    ("stream", "method"), [("mnist", m) for m in OFFLINE] + [("imagenet_r", m) for m in IMAGENET_R]
)
def test_print_config(stream: str, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(
            [
                "fit",
                "-c",
                str(CL_EVAL / stream / "base.yaml"),
                "-c",
                str(CL_EVAL / stream / f"{method}.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (None, 0)
    out = capsys.readouterr().out
    assert f"class_path: lifelong_delta.continual.{CLASS_PATH.get(method, 'ContinualModule')}" in out
    assert f"name: {method}" in out  # each method logs under its own name


def _tiny(tmp_path: Path, method: str) -> Path:
    n_tasks, per_task = (1, 4) if method == "joint" else (2, 2)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"""
trainer:
  enable_progress_bar: false
  log_every_n_steps: 1
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: {method}}}}}
  callbacks: []
  enable_checkpointing: false
model:
  init_args:
    pretrained: false
    backbone_kwargs: {TINY_VIT}
data:
  init_args: {{dataset: digits, n_tasks: {n_tasks}, classes_per_task: {per_task}, max_per_class: 24, batch_size: 16,
               eval_batch_size: 64, val_fraction: 0.2, max_eval_per_class: null}}
""")
    return tiny


@pytest.mark.parametrize("method", OFFLINE)
def test_each_offline_method_runs_a_tiny_task_pair(tmp_path: Path, method: str, capsys) -> None:
    cfg = CL_EVAL / "mnist"
    lightning_main(
        ["fit", "-c", str(cfg / "base.yaml"), "-c", str(cfg / f"{method}.yaml"), "-c", str(_tiny(tmp_path, method))]
    )
    log_dir = tmp_path / method / "version_0"
    metrics = json.loads((log_dir / "cl_metrics.json").read_text())
    R = metrics["accuracy_matrix"]
    n = 1 if method == "joint" else 2
    assert len(R) == n and all(R[i][j] is not None for i in range(n) for j in range(i + 1))
    assert 0.0 <= metrics["average_accuracy"] <= 1.0
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    expected = {
        "l2p": "train/pull",
        "dualprompt": "train/pull",
        "predkd": "train/pred_kd",
        "predkd_featkd": "train/feat_kd",
        "predkd_ewc": "train/penalty0",
        "predkd_l2": "train/penalty0",
        "l2": "train/penalty0",
    }.get(method, "train/cls")
    assert expected in header
