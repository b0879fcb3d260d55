"""``make lifelong-eval``: lifelong deltas on the split-MNIST streams of ``make cl-eval`` and ``make cl-eval-2x5``.

Each (stream, method, seed) is one ``lightning fit -c configs/cl_eval/mnist/base.yaml -c
configs/lifelong_deltas.yaml [-c configs/lifelong_deltas_adamr.yaml]``: every task trains the ViT's attention QKV
and the head from the pretrained backbone, with Adam (``lifelong-deltas``) or with AdamR's pull toward the
pretrained weights (``lifelong-deltas-adamr``, DAREx-L2), and :class:`~lifelong_delta.callbacks.LifelongDeltas`
packs the task's QKV delta at every drop rate of the config (dense, 0.9, 0.99; q chosen per task without labels)
and evaluates the banks at the end. Training does not depend on p, so one run gives every p. Seeds set the class
order and the data split as in the continual study.

Outputs in ``out_dir`` (default ``results/lifelong_eval``):

* ``results.csv``: ``stream, method, seed, p, task_il_accuracy, class_il_accuracy, bytes_per_task``; the lifelong
  rows (``p = 0``: dense), then the continual study's best method on the same stream and seeds (its A_N as the
  class-incremental accuracy; it has no task-incremental figure and no per-task storage) when the study's
  ``results.csv`` is there (and the runs use its base config);
* ``summary.md``: mean ± std over seeds per stream, method and p, the goals, and what class-incremental inference
  costs;
* ``accuracy.png``: task- and class-incremental accuracy per method and p next to the best continual method;
* ``runs/<stream>/<method>/seed<k>/``: each run's Lightning logs, ``lifelong_metrics.json`` and packs.

Finished runs (their ``lifelong_metrics.json`` exists) are reused; ``force=True`` re-runs them. A run starts from an
empty folder: what an earlier or crashed run left in ``runs/<stream>/<method>/seed<k>/`` is deleted first.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lifelong_delta import outputs
from lifelong_delta.repro import repro_command
from lifelong_delta.studies.results import csv_bytes, mean_std, runs_sentence

__all__ = ["COLUMNS", "METHODS", "STREAMS", "lifelong_eval", "summary_markdown"]

COLUMNS = ("stream", "method", "seed", "p", "task_il_accuracy", "class_il_accuracy", "bytes_per_task")
_ROOT = Path(__file__).resolve().parents[2]
#: stream name -> (its ``lightning fit`` overrides of configs/cl_eval/mnist/base.yaml, the continual study's results)
STREAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "5x2": ((), "results/cl_eval/results.csv"),
    "2x5": (("--data.init_args.n_tasks=2", "--data.init_args.classes_per_task=5"), "results/cl_eval_2x5/results.csv"),
}
#: method name -> the configs layered on the stream's base config (in configs/, or ``config_dir``)
METHODS: dict[str, tuple[str, ...]] = {
    "lifelong-deltas": ("lifelong_deltas.yaml",),
    "lifelong-deltas-adamr": ("lifelong_deltas.yaml", "lifelong_deltas_adamr.yaml"),
}
GOAL_POINTS, GOAL_BYTES = 1.0, 0.02  # at p = 0.99: task-IL within 1 point of dense, at <= 2 % of its bytes


def _run_one(
    base: Path, configs: Sequence[Path], method: str, stream: str, seed: int, runs: Path, overrides: Sequence[str]
) -> Path:
    """One ``lightning fit`` of ``method``'s configs on ``stream`` with ``seed`` in an emptied run folder; returns its
    metrics file."""
    from lifelong_delta.runner import fit_run

    outputs.remove_run_dir(runs / stream / method / f"seed{seed}", runs=runs)
    fit_run(
        [base, *configs],
        [*STREAMS[stream][0], *overrides],
        seed=seed,
        save_dir=runs / stream,
        name=method,
        version=f"seed{seed}",
    )
    path = _metrics_path(runs, method, stream, seed)
    if not path.is_file():
        raise RuntimeError(
            f"{stream} seed {seed} finished without writing {path}; does the config add "
            "lifelong_delta.callbacks.LifelongDeltas to trainer.callbacks?"
        )
    return path


def _metrics_path(runs: Path, method: str, stream: str, seed: int) -> Path:
    return runs / stream / method / f"seed{seed}" / "lifelong_metrics.json"


def _best_continual(path: Path, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The rows of the continual study's best method (highest mean A_N, joint training aside) on ``seeds``."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] != "joint" and int(r["seed"]) in seeds]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    if not by:
        return []
    best = max(by, key=lambda m: (len(by[m]), statistics.fmean(float(r["average_accuracy"]) for r in by[m])))
    return [
        {
            "method": best,
            "seed": int(r["seed"]),
            "p": None,
            "task_il_accuracy": None,
            "class_il_accuracy": float(r["average_accuracy"]),
            "bytes_per_task": None,
        }
        for r in by[best]
    ]


def _cell(rows: Sequence[dict[str, Any]], key: str, scale: float = 100.0, digits: int = 1) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "–"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(
    rows: Sequence[dict[str, Any]], extra: dict[tuple[str, int, float], dict[str, Any]], meta: dict[str, Any]
) -> str:
    """Per stream: mean ± std over seeds of every (method, p), then the goals at p = 0.99."""
    lines = [
        "# Lifelong deltas: one packed DAREx delta per task",
        "",
        f"Seeds {meta['seeds']} (each its own class order, as `make cl-eval`); "
        + runs_sentence(meta["trained_runs"], meta["runs"], meta["wall_time_s"], meta["command"]),
        "",
    ]
    for stream in dict.fromkeys(r["stream"] for r in rows):
        mine = [r for r in rows if r["stream"] == stream]
        lines += [
            f"## Stream {stream} (split MNIST)",
            "",
            "| method | p | task-IL (%) | class-IL (%) | bytes / task | % of dense | q | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
        for r in mine:
            groups.setdefault((r["method"], r["p"]), []).append(r)
        for (method, p), group in groups.items():
            if method in METHODS:
                info = [extra[(stream, method, r["seed"], p)] for r in group]
                kib = mean_std([r["bytes_per_task"] / 1024 for r in group])
                frac = _cell(info, "bytes_fraction", digits=2)
                q = "1" if p == 0 else f"{statistics.fmean(x for i in info for x in i['q']):.3f}"
                label = "dense" if p == 0 else f"{p:g}"
                lines.append(
                    f"| {method} | {label} | {_cell(group, 'task_il_accuracy')} | "
                    f"{_cell(group, 'class_il_accuracy')} | {kib[0]:.1f} KiB | {frac} | {q} | {len(group)} |"
                )
            else:
                lines.append(
                    f"| {method} (best of the continual study) | – | – | "
                    f"{_cell(group, 'class_il_accuracy')} | – | – | – | {len(group)} |"
                )
        lines += ["", *(g for method in METHODS for g in _goals(stream, method, mine, extra)), ""]
    lines += [
        "Task-IL: the task id is given and the task's delta is swapped in (one forward pass per sample). "
        "Class-IL: no task id; every sample goes through each task's delta and the highest sigmoid wins "
        "(as many forward passes as tasks). Mean ± sample std over seeds. Bytes per task: the pack's files "
        "(kept values and manifest) plus the task's head rows; dense: the QKV delta and the head rows in "
        "fp32.",
        "",
    ]
    return "\n".join(lines)


def _goals(
    stream: str, method: str, rows: Sequence[dict[str, Any]], extra: dict[tuple[str, str, int, float], dict[str, Any]]
) -> list[str]:
    def of(p: float) -> list[dict[str, Any]]:
        return [r for r in rows if r["method"] == method and r["p"] == p]

    dense, extreme = of(0.0), of(0.99)
    if not dense or not extreme:
        return []
    gap = 100 * (
        statistics.fmean(r["task_il_accuracy"] for r in dense)
        - statistics.fmean(r["task_il_accuracy"] for r in extreme)
    )
    frac = statistics.fmean(extra[(stream, method, r["seed"], 0.99)]["bytes_fraction"] for r in extreme)
    tasks = extra[(stream, method, extreme[0]["seed"], 0.99)]["tasks"]
    ok = "met" if gap <= GOAL_POINTS and frac <= GOAL_BYTES else "**not met**"
    return [
        f"{method}, goal at p = 0.99 ({ok}): task-IL {gap:.2f} points below dense (goal ≤ {GOAL_POINTS:g}), at "
        f"{100 * frac:.2f} % of the dense bytes per task (goal ≤ {100 * GOAL_BYTES:g} %). Class-IL costs "
        f"{tasks} forward passes per sample ({tasks} tasks)."
    ]


def _plot(rows: Sequence[dict[str, Any]], out: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    streams = list(dict.fromkeys(r["stream"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig = Figure(figsize=(max(7.5, 5.5 * len(streams)), 4.2))
    FigureCanvasAgg(fig)
    bars = [(key, m) for key in ("task_il_accuracy", "class_il_accuracy") for m in methods]
    width = 0.8 / len(bars)
    for k, stream in enumerate(streams):
        ax = fig.add_subplot(1, len(streams), k + 1)
        ps = sorted({r["p"] for r in rows if r["stream"] == stream and r["method"] in METHODS})
        x = np.arange(len(ps))
        for i, (key, method) in enumerate(bars):
            stats = [
                mean_std(
                    [100 * r[key] for r in rows if r["stream"] == stream and r["method"] == method and r["p"] == p]
                    or [float("nan")]
                )
                for p in ps
            ]
            kind = "task-IL" if key == "task_il_accuracy" else "class-IL"
            ax.bar(
                x + (i - (len(bars) - 1) / 2) * width,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats],
                capsize=2,
                color="C0" if kind == "task-IL" else "C1",
                alpha=1.0 if method == methods[0] else 0.55,
                hatch=None if method == methods[0] else "//",
                label=f"{kind}, {method}",
            )
        best = [r for r in rows if r["stream"] == stream and r["method"] not in METHODS]
        if best:
            level = 100 * statistics.fmean(r["class_il_accuracy"] for r in best)
            ax.axhline(level, color="C3", ls="--", label="the continual study's best A_N (class-IL)")
            ax.text(x[-1] + 0.45, level + 1, best[0]["method"], color="C3", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(x, ["dense" if p == 0 else f"p = {p:g}" for p in ps])
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy on all seen tasks (%)")
        ax.set_title(f"split MNIST {stream}: mean ± std over seeds", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2 * len(streams)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    outputs.write_png(out / "accuracy.png", fig, dpi=120)


def lifelong_eval(
    seeds: list[int] | None = None,
    streams: list[str] | None = None,
    out_dir: str = "results/lifelong_eval",
    methods: list[str] | None = None,
    config_dir: str | None = None,
    base_config: str | None = None,
    override: list[str] | None = None,
    force: bool = False,
) -> str:
    """Lifelong deltas (LifelongDeltas) on the split-MNIST streams, next to the continual study's best method.

    Args:
        seeds: seeds; each sets ``seed_everything``, the class order and the data split (default 0 1 2).
        streams: ``5x2`` (``make cl-eval``'s stream) and/or ``2x5`` (``make cl-eval-2x5``'s); default both.
        out_dir: where results.csv, summary.md, accuracy.png and ``runs/`` go.
        methods: ``lifelong-deltas`` (Adam) and/or ``lifelong-deltas-adamr`` (AdamR's pull toward θ_pre); default
            both.
        config_dir: where the methods' configs are (default configs/: lifelong_deltas.yaml and
            lifelong_deltas_adamr.yaml).
        base_config: the stream's base config (default configs/cl_eval/mnist/base.yaml, the continual study's).
        override: extra ``lightning fit`` arguments for every run, e.g. ``--data.init_args.max_per_class=100``.
        force: re-run runs that already have a ``lifelong_metrics.json``.

    Returns:
        Path of ``summary.md``.
    """
    given = {
        "seeds": seeds,
        "streams": streams,
        "out_dir": out_dir,
        "methods": methods,
        "config_dir": config_dir,
        "base_config": base_config,
        "override": override,
    }
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    streams = list(STREAMS) if streams is None else list(streams)
    unknown = [s for s in streams if s not in STREAMS]
    if unknown or not streams:
        raise ValueError(f"streams={streams}: choose from {', '.join(STREAMS)}")
    base = Path(base_config) if base_config is not None else _ROOT / "configs" / "cl_eval" / "mnist" / "base.yaml"
    methods = list(METHODS) if methods is None else list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods={methods}: choose from {', '.join(METHODS)}")
    root = Path(config_dir) if config_dir is not None else _ROOT / "configs"
    configs = {m: [root / name for name in METHODS[m]] for m in methods}
    for option, path in [("base_config", base), *(("config_dir", c) for m in methods for c in configs[m])]:
        if not path.is_file():
            raise ValueError(f"--{option}: {path} not found (a lightning fit YAML config)")
    outputs.check_can_create(out_dir, option="--out_dir")
    out = Path(out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    from lifelong_delta.progress import Progress

    start = time.perf_counter()
    plan = [(stream, m, s) for stream in streams for m in methods for s in seeds]
    todo = [(stream, m, s) for stream, m, s in plan if force or not _metrics_path(runs, m, stream, s).is_file()]
    rows: list[dict[str, Any]] = []
    extra: dict[tuple[str, str, int, float], dict[str, Any]] = {}
    with Progress("lifelong-eval", len(todo), unit="runs", live=False) as bar:
        for stream, method, s in plan:
            if (stream, method, s) in todo:
                bar.update(0, detail=f"{stream} {method} seed {s}")
                _run_one(base, configs[method], method, stream, s, runs, list(override or []))
                bar.update(1)
            metrics = json.loads(_metrics_path(runs, method, stream, s).read_text())
            for label, m in metrics["by_p"].items():
                p = float(label)
                rows.append(
                    {"stream": stream, "method": method, "seed": s, "p": p, **{k: float(m[k]) for k in COLUMNS[4:]}}
                )
                extra[(stream, method, s, p)] = {**m, "tasks": metrics["tasks"]}
    if base_config is None:  # the continual study ran on this base config's streams
        for stream in streams:
            rows += [{"stream": stream, **r} for r in _best_continual(_ROOT / STREAMS[stream][1], seeds)]
    wall = time.perf_counter() - start

    cells = (
        [
            r["stream"],
            r["method"],
            r["seed"],
            "" if r["p"] is None else f"{r['p']:g}",
            *("" if r[k] is None else f"{r[k]:.6f}" if k != "bytes_per_task" else f"{r[k]:.0f}" for k in COLUMNS[4:]),
        ]
        for r in rows
    )
    outputs.write_file(out / "results.csv", csv_bytes(COLUMNS, cells))
    meta = {
        "seeds": seeds,
        "wall_time_s": wall,
        "trained_runs": len(todo),
        "runs": len(plan),
        "command": repro_command("lifelong-delta lifelong-eval", lifelong_eval, given, default="make lifelong-eval"),
    }
    outputs.write_file(out / "summary.md", summary_markdown(rows, extra, meta).encode())
    _plot(rows, out)
    print(
        f"wrote {out / 'results.csv'}, {out / 'summary.md'} and {out / 'accuracy.png'} ({wall / 60:.1f} min)",
        flush=True,
    )
    return str(out / "summary.md")
