"""``lifelong-delta cl-eval``: the study driver over a tiny stream (two methods x two seeds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lifelong_delta.cli import main
from lifelong_delta.studies.cl_eval import RESULT_COLUMNS, cl_eval, read_results, summary_markdown
from tests.continual.test_cl_eval_configs import TINY_VIT  # the offline ViT's shape at 8x8 px

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread beats two on a shared CPU


def _tiny(tmp_path: Path) -> Path:
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"""
trainer:
  enable_progress_bar: false
  callbacks: []
  enable_checkpointing: false
model:
  init_args:
    pretrained: false
    backbone_kwargs: {TINY_VIT}
data:
  init_args: {{dataset: digits, n_tasks: 2, classes_per_task: 2, max_per_class: 20, batch_size: 16,
               eval_batch_size: 64, val_fraction: 0.25, max_eval_per_class: null}}
""")
    return tiny


def test_study_writes_the_table_and_plots_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "study"
    summary = cl_eval(
        methods=["ftpp", "l2", "predkd_l2"],
        skip=["l2"],
        seeds=[0, 1],
        out_dir=str(out),
        override=["-c", str(_tiny(tmp_path))],
    )
    assert not (out / "runs" / "l2").exists()
    assert Path(summary) == out / "summary.md"
    with open(out / "results.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == RESULT_COLUMNS
    rows = read_results(out / "results.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [("ftpp", 0), ("predkd_l2", 0), ("ftpp", 1), ("predkd_l2", 1)]
    for r in rows:  # each row is its run's cl_metrics.json
        metrics = json.loads((out / "runs" / r["method"] / f"seed{r['seed']}" / "cl_metrics.json").read_text())
        assert r["average_accuracy"] == pytest.approx(metrics["average_accuracy"], abs=1e-6)
        assert r["forgetting"] == pytest.approx(metrics["forgetting"], abs=1e-6)
        assert metrics["seed"] == str(r["seed"])
    orders = {
        s: json.loads((out / "runs" / "ftpp" / f"seed{s}" / "cl_metrics.json").read_text())["class_order"]
        for s in (0, 1)
    }
    assert orders[0] != orders[1]  # each seed has its own class order
    text = Path(summary).read_text()
    assert "| FT++ |" in text and "| PredKD+L2 |" in text
    for png in ("accuracy.png", "accuracy_matrices.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second call re-uses the finished runs: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("cl_metrics.json")}
    cl_eval(methods=["ftpp", "predkd_l2"], seeds=[0, 1], out_dir=str(out), override=["-c", str(_tiny(tmp_path))])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert read_results(out / "results.csv") == rows


def test_force_and_a_crashed_run_start_from_an_empty_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "study"
    options = {"methods": ["ftpp"], "out_dir": str(out), "override": ["-c", str(_tiny(tmp_path))]}
    cl_eval(seeds=[0], **options)
    runs = out / "runs" / "ftpp"
    done = runs / "seed0" / "cl_metrics.json"
    stamp = done.stat().st_mtime_ns
    # a run that crashed after Lightning saved its config: the folder is there, its metrics are not
    crashed = runs / "seed1"
    crashed.mkdir()
    (crashed / "config.yaml").write_text((runs / "seed0" / "config.yaml").read_text())
    (crashed / "stale.txt").write_text("left by the crashed run")
    (out / "runs" / "notes.txt").write_text("the user's")
    cl_eval(seeds=[0, 1], **options)
    assert done.stat().st_mtime_ns == stamp  # the finished run is reused
    assert (crashed / "cl_metrics.json").is_file() and not (crashed / "stale.txt").exists()

    (out / "results.csv").unlink()
    cl_eval(seeds=[0], force=True, **options)  # the run's folder exists: it is emptied and the run trained again
    assert done.stat().st_mtime_ns != stamp
    assert [(r["method"], r["seed"]) for r in read_results(out / "results.csv")] == [("ftpp", 0)]
    assert (crashed / "cl_metrics.json").is_file() and (out / "runs" / "notes.txt").read_text() == "the user's"


def test_summary_table_orders_by_accuracy_and_keeps_joint_last() -> None:
    rows = [
        {"method": "joint", "seed": 0, "average_accuracy": 0.9, "forgetting": 0.0, "bwt": 0.0},
        {"method": "ft", "seed": 0, "average_accuracy": 0.2, "forgetting": 0.8, "bwt": -0.8},
        {"method": "ft", "seed": 1, "average_accuracy": 0.4, "forgetting": 0.6, "bwt": -0.6},
        {"method": "l2", "seed": 0, "average_accuracy": 0.5, "forgetting": 0.1, "bwt": -0.1},
    ]
    lines = [l for l in summary_markdown(rows).splitlines() if l.startswith("| ") and "method" not in l]
    assert [l.split("|")[1].strip() for l in lines] == ["L2 (ViT attention)", "FT", "Joint (upper bound)"]
    assert "| 30.0 ± 14.1 | 70.0 ± 14.1 | -70.0 ± 14.1 | 2 |" in lines[1]  # mean ± sample std in %


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["cl-eval", "--methods", "nope", "--out_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method(s) ['nope']") and "\n" not in err
    for skip, message in (
        ("[nope]", "error: skip=['nope'] names method(s) that are not run"),
        ("[ft,l2]", "error: skip leaves no method to run"),
    ):
        with pytest.raises(SystemExit):
            main(["cl-eval", "--methods", "[ft,l2]", "--skip", skip, "--out_dir", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err
    bad = tmp_path / "results.csv"
    bad.write_text("method,seed,acc\n")
    with pytest.raises(ValueError, match="expected columns method,seed,average_accuracy,forgetting,bwt"):
        read_results(bad)


def test_summary_records_the_command_that_repeats_the_study(monkeypatch) -> None:
    import functools
    import shlex

    import lifelong_delta.studies.cl_eval as mod
    from lifelong_delta.cli import main
    from lifelong_delta.repro import repro_command

    defaults = {
        "methods": None,
        "skip": None,
        "seeds": None,
        "stream": "mnist",
        "config_dir": None,
        "out_dir": "results/cl_eval",
        "override": None,
    }
    assert repro_command("lifelong-delta cl-eval", mod.cl_eval, defaults, default="make cl-eval") == "make cl-eval"
    given = {
        "methods": ["ft", "l2"],
        "skip": ["l2"],
        "seeds": [3],
        "out_dir": "out dir",
        "override": ["--data.init_args.n_tasks=2", "-c", "x.yaml"],
    }
    cmd = repro_command("lifelong-delta cl-eval", mod.cl_eval, given, default="make cl-eval")
    assert cmd == (
        "lifelong-delta cl-eval --methods '[\"ft\", \"l2\"]' --skip '[\"l2\"]' --seeds '[3]' --out-dir 'out dir' "
        '--override \'["--data.init_args.n_tasks=2", "-c", "x.yaml"]\''
    )
    # the recorded line parses back, through the real CLI, to the same call
    calls = []
    real = mod.cl_eval

    @functools.wraps(real)
    def record(*args, **kwargs):
        calls.append(kwargs)
        return "summary.md"

    monkeypatch.setattr(mod, "cl_eval", record)
    main(shlex.split(cmd)[1:])
    assert {k: calls[0][k] for k in given} == given


def test_a_study_holds_one_runs_model_at_a_time(tmp_path: Path) -> None:
    """The CLI, trainer and module of a run refer to each other; with the automatic collector off, only ``fit_run``'s
    own collection frees them, so a loop of runs does not keep every model and optimiser state."""
    import gc
    import weakref

    from lifelong_delta.continual.module import ContinualModule

    gc.collect()
    gc.disable()
    try:
        cl_eval(methods=["ftpp"], seeds=[0, 1, 2], out_dir=str(tmp_path / "s"), override=["-c", str(_tiny(tmp_path))])
        alive = [o for o in gc.get_objects() if type(o) not in weakref.ProxyTypes and isinstance(o, ContinualModule)]
    finally:
        gc.enable()
    assert len(alive) <= 1  # the last run's, which Lightning still refers to; three without the collection
