"""``lifelong-delta demo``: configs/cl_demo.yaml, plain fine-tuning and FT++ side by side, on a tiny stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lifelong_delta.cli import main
from lifelong_delta.studies.demo import DEFAULT_CONFIG


def test_demo_trains_the_three_runs_and_ends_with_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_torch_thread
) -> None:
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("""
trainer: {enable_progress_bar: false, callbacks: [], enable_checkpointing: false, log_every_n_steps: 1}
data:
  init_args: {dataset: digits, image_size: 32, n_tasks: 2, classes_per_task: 2, max_per_class: 8, batch_size: 8,
              eval_batch_size: 64, val_fraction: 0.25, max_eval_per_class: 4}
""")
    out = tmp_path / "demo"
    main(["demo", "--out_dir", str(out), "--override", json.dumps(["-c", str(tiny)])])
    lines = capsys.readouterr().out.rstrip().splitlines()

    # the last lines: the table (FT, FT++, then the config's method) and the differences
    assert lines[-6].startswith("Class-incremental stream of cl_demo.yaml, seed 0")
    assert lines[-5].split() == [
        "method",
        "A_N",
        "(all",
        "classes)",
        "F_N",
        "(forgetting)",
        "task",
        "0",
        "at",
        "the",
        "end",
    ]
    assert lines[-4].lstrip().startswith("FT (plain fine-tuning)") and lines[-3].lstrip().startswith("FT++")
    assert lines[-2].lstrip().startswith("PredKD+L2")
    assert lines[-1].lstrip().startswith("PredKD+L2 - FT: ") and "points of A_N" in lines[-1]
    assert any(line.startswith(f"wrote {out / 'summary.md'}") for line in lines)
    assert "demo [1/3] FT (plain fine-tuning): lightning fit" in "\n".join(lines)

    runs = ("ft", "ftpp", "method")
    metrics = {n: json.loads((out / "runs" / n / "seed0" / "cl_metrics.json").read_text()) for n in runs}
    assert len({str(m["class_order"]) for m in metrics.values()}) == 1  # the same stream
    summary = (out / "summary.md").read_text()
    labels = {"ft": "FT (plain fine-tuning)", "ftpp": "FT++ (past logits masked)", "method": "PredKD+L2"}
    for name, label in labels.items():
        assert f"| {label} | {100 * metrics[name]['average_accuracy']:.1f} | " in summary
    assert (out / "accuracy_matrices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # FT is the demo config with the method switched off: no anchor penalty, no distillation, no masking; FT++ masks
    hparams = {n: yaml.safe_load((out / "runs" / n / "seed0" / "hparams.yaml").read_text()) for n in runs}
    assert hparams["ft"]["pred_kd"] == 0 and hparams["ft"]["mask_past_logits"] is False
    assert hparams["ftpp"]["pred_kd"] == 0 and hparams["ftpp"]["mask_past_logits"] is True
    assert hparams["method"]["pred_kd"] == 1.0 and hparams["method"]["mask_past_logits"] is True
    header = {n: (out / "runs" / n / "seed0" / "metrics.csv").read_text().splitlines()[0].split(",") for n in runs}
    assert "train/penalty0" in header["method"] and "train/pred_kd" in header["method"]
    for n in ("ft", "ftpp"):
        assert not any(h.startswith(("train/penalty", "train/pred_kd")) for h in header[n])
    assert Path(DEFAULT_CONFIG).name == "cl_demo.yaml"
