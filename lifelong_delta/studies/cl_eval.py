"""``make cl-eval``: every continual-learning method of ``configs/cl_eval/<stream>/`` over several seeds.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning" (https://arxiv.org/abs/2203.17269), compare
fine-tuning, distillation (PredKD, FeatKD), parameter regularisation (EWC, L2, L2 in the ViT attention) and
prompting (L2P, DualPrompt, CODA-P) on one class-incremental stream. This runs that comparison on the offline
split-MNIST stream with the cached Fashion-MNIST ViT: one ``lightning fit -c base.yaml -c <method>.yaml`` per
(method, seed), in this process, each seed with its own class order (``class_order_seed = seed``).

Outputs in ``out_dir`` (default ``results/cl_eval``):

* ``results.csv``: ``method,seed,average_accuracy,forgetting,bwt`` (one row per run);
* ``summary.md``: mean ± std over seeds per method, best first;
* ``accuracy.png``: bar chart of A_N (and F_N) per method with the spread over seeds;
* ``accuracy_matrices.png``: the seed-averaged accuracy matrix R of every method;
* ``runs/<method>/seed<k>/``: each run's Lightning logs, ``cl_metrics.json`` and ``accuracy_matrix.png``.

Finished runs (their ``cl_metrics.json`` exists) are not re-run, so an interrupted study resumes where it
stopped; ``force=True`` re-runs everything. A run starts from an empty folder: what an earlier or crashed run left in
``runs/<method>/seed<k>/`` is deleted first.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lifelong_delta import outputs
from lifelong_delta.repro import repro_command
from lifelong_delta.studies.results import csv_bytes, mean_std, runs_sentence

__all__ = ["METHODS", "RESULT_COLUMNS", "cl_eval", "read_results", "summary_markdown"]

#: offline methods in the order of the paper's tables (baselines, distillation, regularisation, prompting).
METHODS: tuple[str, ...] = (
    "ft",
    "ftpp",
    "predkd",
    "predkd_featkd",
    "predkd_ewc",
    "predkd_l2",
    "l2",
    "l2p",
    "dualprompt",
    "codap",
    "joint",
)
LABELS = {
    "ft": "FT",
    "ftpp": "FT++",
    "predkd": "PredKD",
    "predkd_featkd": "PredKD+FeatKD",
    "predkd_ewc": "PredKD+EWC",
    "predkd_l2": "PredKD+L2",
    "l2": "L2 (ViT attention)",
    "l2p": "L2P",
    "dualprompt": "DualPrompt",
    "codap": "CODA-P",
    "joint": "Joint (upper bound)",
}
RESULT_COLUMNS = ("method", "seed", "average_accuracy", "forgetting", "bwt")
_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "cl_eval"


def _config_dir(stream: str, config_dir: str | None) -> Path:
    root = Path(config_dir) if config_dir is not None else _CONFIG_DIR / stream
    if not (root / "base.yaml").is_file():
        raise FileNotFoundError(f"no base.yaml in {root}: give --config_dir, a directory of cl_eval configs")
    return root


def _run_one(config_dir: Path, method: str, seed: int, runs: Path, overrides: Sequence[str]) -> Path:
    """One ``lightning fit`` of ``method`` with ``seed`` in an emptied run folder; returns its ``cl_metrics.json``."""
    from lifelong_delta.runner import fit_run

    outputs.remove_run_dir(runs / method / f"seed{seed}", runs=runs)
    fit_run(
        [config_dir / "base.yaml", config_dir / f"{method}.yaml"],
        overrides,
        seed=seed,
        save_dir=runs,
        name=method,
        version=f"seed{seed}",
    )
    path = runs / method / f"seed{seed}" / "cl_metrics.json"
    if not path.is_file():
        raise RuntimeError(f"{method} seed {seed} finished without writing {path}")
    return path


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``results.csv``, with the numbers parsed.

    Raises:
        ValueError: if the header is not ``method,seed,average_accuracy,forgetting,bwt``.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ValueError(f"{path}: expected columns {','.join(RESULT_COLUMNS)}, got {reader.fieldnames}")
        return [
            {"method": r["method"], "seed": int(r["seed"]), **{k: float(r[k]) for k in RESULT_COLUMNS[2:]}}
            for r in reader
        ]


def summary_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """A Markdown table of mean ± std (in %) per method over seeds, best A_N first; joint is listed last."""
    meta = meta or {}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    order = sorted(by, key=lambda m: (m == "joint", -statistics.fmean(r["average_accuracy"] for r in by[m])))
    lines = ["# Continual-learning study (Smith et al., arXiv 2203.17269), offline stream", ""]
    if meta:
        lines += [
            f"Stream: {meta.get('stream', '?')}; seeds {meta.get('seeds', '?')} (each its own class order); "
            + runs_sentence(
                meta.get("trained_runs", "?"),
                len(rows),
                meta.get("wall_time_s", float("nan")),
                meta.get("command", "make cl-eval"),
            ),
            "",
        ]
    lines += [
        "| method | A_N (%) ↑ | F_N (%) ↓ | BWT (%) | seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in order:
        cells = []
        for key in RESULT_COLUMNS[2:]:
            mean, std = mean_std([100 * r[key] for r in by[m]])
            cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {LABELS.get(m, m)} | {' | '.join(cells)} | {len(by[m])} |")
    lines += [
        "",
        "A_N: accuracy over all classes after the last task; F_N: average forgetting; BWT: backward "
        "transfer (Lopez-Paz & Ranzato 2017). Mean ± sample std over seeds.",
        "",
    ]
    return "\n".join(lines)


def _plot(
    rows: Sequence[dict[str, Any]], matrices: dict[str, list[list[list[float | None]]]], out: Path, stream: str
) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lifelong_delta.continual.metrics import label_task_axes

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    fig = Figure(figsize=(max(6.0, 0.8 * len(methods) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(methods))
    for k, (key, label, colour) in enumerate(
        (("average_accuracy", "A_N (accuracy, all classes)", "C0"), ("forgetting", "F_N (forgetting)", "C3"))
    ):
        stats = [mean_std([100 * r[key] for r in rows if r["method"] == m]) for m in methods]
        ax.bar(
            x + (k - 0.5) * 0.38,
            [s[0] for s in stats],
            0.38,
            yerr=[s[1] for s in stats],
            capsize=2,
            color=colour,
            label=label,
        )
    ax.set_xticks(x, [LABELS.get(m, m) for m in methods], rotation=35, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Class-incremental stream {stream!r}: mean ± std over seeds")
    fig.tight_layout()
    outputs.write_png(out / "accuracy.png", fig, dpi=120)

    shown = [m for m in methods if m in matrices and m != "joint"]
    if not shown:
        return
    cols = min(4, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * nrows))
    FigureCanvasAgg(fig)
    for i, m in enumerate(shown):
        stack = np.array([[[np.nan if v is None else v for v in row] for row in R] for R in matrices[m]], float)
        arr = stack.mean(axis=0)  # NaN above the diagonal (R[i][j > i] is never measured)
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", vmin=0, vmax=1)
        for a in range(arr.shape[0]):
            for b in range(arr.shape[1]):
                if np.isfinite(arr[a, b]):
                    ax.text(
                        b,
                        a,
                        f"{arr[a, b]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if arr[a, b] > 0.6 else "white",
                    )
        ax.set_title(LABELS.get(m, m), fontsize=9)
        label_task_axes(ax, arr.shape[0], arr.shape[1], "after task i", "task j", fontsize=7)
    fig.suptitle("Accuracy matrices R[i][j], mean over seeds")
    fig.tight_layout()
    outputs.write_png(out / "accuracy_matrices.png", fig, dpi=110)


def cl_eval(
    methods: list[str] | None = None,
    skip: list[str] | None = None,
    seeds: list[int] | None = None,
    stream: str = "mnist",
    config_dir: str | None = None,
    out_dir: str = "results/cl_eval",
    override: list[str] | None = None,
    force: bool = False,
) -> str:
    """Run every method × seed of a ``configs/cl_eval/<stream>`` study and write the table and plots.

    Args:
        methods: config names in the stream's directory (default: those of :data:`METHODS` it holds).
        skip: methods to leave out of ``methods``, e.g. ``[joint]``.
        seeds: seeds; each sets ``seed_everything``, the class order and the data split (default 0 1 2).
        stream: sub-directory of ``configs/cl_eval`` (``mnist``; ``pretrained``: split MNIST from the ImageNet
            EfficientNet-Lite0; ``imagenet_r`` needs the data and ViT-B).
        config_dir: a directory of configs to use instead (``base.yaml`` + ``<method>.yaml``).
        out_dir: where results.csv, summary.md, the PNGs and ``runs/`` go.
        override: extra ``lightning fit`` arguments for every run, placed after the two configs (the seed and the
            log directory are set after them), e.g. ``--data.init_args.max_per_class=200`` or ``-c extra.yaml``.
        force: re-run runs that already have a ``cl_metrics.json``.

    Returns:
        Path of ``summary.md``.
    """
    given = {
        "methods": methods,
        "skip": skip,
        "seeds": seeds,
        "stream": stream,
        "config_dir": config_dir,
        "out_dir": out_dir,
        "override": override,
    }
    root = _config_dir(stream, config_dir)
    methods = list(methods or [m for m in METHODS if (root / f"{m}.yaml").is_file()])
    skipped = set(skip or ())
    if skipped - set(methods):
        raise ValueError(
            f"skip={sorted(skipped - set(methods))} names method(s) that are not run; choose from {methods}"
        )
    methods = [m for m in methods if m not in skipped]
    if not methods:
        raise ValueError("skip leaves no method to run")
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    missing = [m for m in methods if not (root / f"{m}.yaml").is_file()]
    if missing:
        known = sorted(p.stem for p in root.glob("*.yaml") if p.stem != "base")
        raise ValueError(f"unknown method(s) {missing} for {root}; choose from {known}")
    outputs.check_can_create(out_dir, option="--out_dir")
    out = Path(out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    from lifelong_delta.progress import Progress

    start = time.perf_counter()
    plan = [(m, s) for s in seeds for m in methods]
    todo = {(m, s) for m, s in plan if force or not (runs / m / f"seed{s}" / "cl_metrics.json").is_file()}
    rows, matrices = [], {}
    # lines, not a live bar: each run draws Lightning's own bar; finished runs take no time, so are not counted
    with Progress("cl-eval", len(todo), unit="runs", live=False) as bar:
        for m, s in plan:
            path = runs / m / f"seed{s}" / "cl_metrics.json"
            if (m, s) in todo:
                bar.update(0, detail=f"{m} seed {s}")
                _run_one(root, m, s, runs, list(override or []))
                bar.update(1)
            metrics = json.loads(path.read_text())
            rows.append({"method": m, "seed": s, **{k: float(metrics[k]) for k in RESULT_COLUMNS[2:]}})
            matrices.setdefault(m, []).append(metrics["accuracy_matrix"])
    trained, wall = len(todo), time.perf_counter() - start

    cells = ([r["method"], r["seed"], *(f"{r[k]:.6f}" for k in RESULT_COLUMNS[2:])] for r in rows)
    outputs.write_file(out / "results.csv", csv_bytes(RESULT_COLUMNS, cells))
    meta = {
        "stream": stream if config_dir is None else str(root),
        "seeds": seeds,
        "wall_time_s": wall,
        "trained_runs": trained,
        "command": repro_command("lifelong-delta cl-eval", cl_eval, given, default="make cl-eval"),
    }
    outputs.write_file(out / "summary.md", summary_markdown(rows, meta).encode())
    _plot(rows, matrices, out, meta["stream"])
    print(
        f"wrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'accuracy.png'} and "
        f"{out / 'accuracy_matrices.png'} ({wall / 60:.1f} min)",
        flush=True,
    )
    return str(out / "summary.md")
