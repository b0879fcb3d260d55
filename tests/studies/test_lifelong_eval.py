"""make lifelong-eval end to end on a tiny stream: the runs, results.csv, summary.md and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lifelong_delta.studies.lifelong_eval import COLUMNS, lifelong_eval

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.init_args.pred_kd=0", "--model.init_args.feat_kd=0", "--model.init_args.anchors=[]",
        "--data.init_args.max_per_class=20", "--trainer.enable_progress_bar=false"]


def test_lifelong_eval_on_a_tiny_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "lifelong.yaml"
    config.write_text((ROOT / "configs" / "lifelong_deltas.yaml").read_text()
                      .replace('"blocks.[0-3].attn.qkv.*"', '"blocks.*.attn.qkv.*"')
                      .replace("p: [0.0, 0.9, 0.99]", "p: [0.0, 0.9]"))
    out = tmp_path / "study"
    summary = lifelong_eval(seeds=[0], streams=["2x5"], out_dir=str(out), config=str(config),
                            base_config=str(ROOT / "configs" / "cl_tiny.yaml"), override=TINY)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    mine = [r for r in rows if r["method"] == "lifelong-deltas"]
    assert [(r["stream"], r["seed"], r["p"]) for r in mine] == [("2x5", "0", "0"), ("2x5", "0", "0.9")]
    metrics = json.loads((out / "runs" / "2x5" / "lifelong-deltas" / "seed0" / "lifelong_metrics.json").read_text())
    assert metrics["tasks"] == 2  # the stream's overrides reached the run
    for r in mine:
        m = metrics["by_p"][r["p"]]
        assert float(r["task_il_accuracy"]) == pytest.approx(m["task_il_accuracy"], abs=1e-6)
        assert float(r["class_il_accuracy"]) == pytest.approx(m["class_il_accuracy"], abs=1e-6)
        assert int(r["bytes_per_task"]) == round(m["bytes_per_task"])
    assert int(mine[1]["bytes_per_task"]) < int(mine[0]["bytes_per_task"])
    text = Path(summary).read_text()
    assert "## Stream 2x5" in text and "| lifelong-deltas | dense |" in text
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    mtime = (out / "runs" / "2x5" / "lifelong-deltas" / "seed0" / "lifelong_metrics.json").stat().st_mtime_ns
    lifelong_eval(seeds=[0], streams=["2x5"], out_dir=str(out), config=str(config),
                  base_config=str(ROOT / "configs" / "cl_tiny.yaml"), override=TINY)  # finished runs are reused
    assert (out / "runs" / "2x5" / "lifelong-deltas" / "seed0" / "lifelong_metrics.json").stat().st_mtime_ns == mtime


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="streams"):
        lifelong_eval(streams=["3x3"], out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="--config .*not found"):
        lifelong_eval(config=str(tmp_path / "missing.yaml"), out_dir=str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
