"""make lifelong-eval end to end on a tiny stream: the runs, results.csv, summary.md and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lifelong_delta.studies.lifelong_eval import COLUMNS, METHODS, lifelong_eval

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--model.init_args.pred_kd=0",
    "--model.init_args.feat_kd=0",
    "--model.init_args.anchors=[]",
    "--data.init_args.max_per_class=20",
    "--trainer.enable_progress_bar=false",
]


def _tiny_configs(tmp_path: Path) -> Path:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in METHODS["lifelong-deltas-adamr"]:
        (configs / name).write_text(
            (ROOT / "configs" / name)
            .read_text()
            .replace('"blocks.[0-3].attn.qkv.*"', '"blocks.*.attn.qkv.*"')
            .replace("p: [0.0, 0.9, 0.99]", "p: [0.0, 0.9]")
        )
    return configs


def test_lifelong_eval_on_a_tiny_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    options = {
        "seeds": [0],
        "streams": ["2x5"],
        "out_dir": str(out),
        "config_dir": str(_tiny_configs(tmp_path)),
        "base_config": str(ROOT / "configs" / "cl_tiny.yaml"),
        "override": TINY,
    }
    summary = lifelong_eval(**options)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["stream"], r["method"], r["seed"], r["p"]) for r in rows] == [
        ("2x5", m, "0", p) for m in METHODS for p in ("0", "0.9")
    ]
    runs = out / "runs" / "2x5"
    for r in rows:
        metrics = json.loads((runs / r["method"] / "seed0" / "lifelong_metrics.json").read_text())
        assert metrics["tasks"] == 2  # the stream's overrides reached the run
        m = metrics["by_p"][r["p"]]
        assert float(r["task_il_accuracy"]) == pytest.approx(m["task_il_accuracy"], abs=1e-6)
        assert float(r["class_il_accuracy"]) == pytest.approx(m["class_il_accuracy"], abs=1e-6)
        assert int(r["bytes_per_task"]) == round(m["bytes_per_task"])
    assert int(rows[1]["bytes_per_task"]) < int(rows[0]["bytes_per_task"])
    hparams = (runs / "lifelong-deltas-adamr" / "seed0" / "config.yaml").read_text()
    assert "lifelong_delta.optim.AdamR" in hparams  # the second config reached the AdamR runs
    text = Path(summary).read_text()
    assert "## Stream 2x5" in text and "| lifelong-deltas | dense |" in text
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    path = runs / "lifelong-deltas" / "seed0" / "lifelong_metrics.json"
    mtime = path.stat().st_mtime_ns
    lifelong_eval(**options)  # finished runs are reused
    assert path.stat().st_mtime_ns == mtime

    # a run that crashed (its folder and config.yaml there, its metrics not) runs again in an emptied folder
    crashed = runs / "lifelong-deltas-adamr" / "seed0"
    (crashed / "lifelong_metrics.json").unlink()
    (crashed / "stale.txt").write_text("left by the crashed run")
    lifelong_eval(**options)
    assert (crashed / "lifelong_metrics.json").is_file() and not (crashed / "stale.txt").exists()
    assert path.stat().st_mtime_ns == mtime
    # force trains a finished run again in its emptied folder, and the results are written
    (out / "results.csv").unlink()
    lifelong_eval(**{**options, "methods": ["lifelong-deltas"]}, force=True)
    assert path.stat().st_mtime_ns != mtime
    with open(out / "results.csv", newline="") as f:
        assert [(r["method"], r["p"]) for r in csv.DictReader(f)] == [("lifelong-deltas", p) for p in ("0", "0.9")]
    assert (crashed / "lifelong_metrics.json").is_file()


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="streams"):
        lifelong_eval(streams=["3x3"], out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="--config_dir: .*not found"):
        lifelong_eval(config_dir=str(tmp_path), out_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="methods"):
        lifelong_eval(methods=["ewc"], out_dir=str(tmp_path / "c"))
    assert not any((tmp_path / d).exists() for d in "abc")
