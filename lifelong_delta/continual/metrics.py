"""Continual-learning metrics from the accuracy matrix R, and their JSON + heat-map report.

``R[i][j]`` is the accuracy on task ``j`` after training task ``i``. A matrix of ``T`` rows (tasks trained so far)
and ``N >= T`` columns is accepted; entries with ``j > i`` (tasks not yet trained) are allowed (e.g. NaN) but
unused by every metric here.

* A_N, average accuracy: accuracy over all seen classes after the last task, the mean of the last row over the
  seen tasks weighted by their test sample counts (Smith et al., https://arxiv.org/abs/2203.17269).
* F_N, average forgetting (Chaudhry et al., "Riemannian Walk", https://arxiv.org/abs/1801.10112): mean over the
  earlier tasks of the best accuracy they had before the last task minus their final accuracy.
* BWT, backward transfer (Lopez-Paz & Ranzato, GEM, https://arxiv.org/abs/1706.08840): mean over the earlier
  tasks of final accuracy minus the accuracy just after training them.

Pure functions plus a matplotlib (Agg, no global backend switch) plot; no Lightning.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lifelong_delta import outputs

Matrix = Sequence[Sequence[float | None]] | np.ndarray | torch.Tensor

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "label_task_axes",
    "plot_accuracy_matrix",
    "write_cl_metrics",
]


def _as_array(R: Matrix) -> np.ndarray:
    """R as a float64 array [T, N] with T <= N; ``None`` becomes NaN."""
    if isinstance(R, torch.Tensor):
        arr = R.detach().cpu().double().numpy()
    else:
        rows = [[math.nan if v is None else float(v) for v in row] for row in R]
        if rows and len({len(r) for r in rows}) != 1:
            raise ValueError("accuracy matrix R must be rectangular: every row needs one entry per task")
        arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix R must be a non-empty [T, N] matrix, got shape {arr.shape}")
    if arr.shape[0] > arr.shape[1]:
        raise ValueError(f"accuracy matrix R has more rows (tasks trained) than columns (tasks): {arr.shape}")
    T = arr.shape[0]
    lower = arr[np.tril_indices(T)]
    if not np.all(np.isfinite(lower)):
        raise ValueError("accuracy matrix R has a missing or non-finite entry R[i][j] with j <= i")
    return arr


def average_accuracy(R: Matrix, weights: Sequence[float] | None = None) -> float:
    """A_N: weighted mean of the last row of R over the seen tasks.

    Args:
        R: accuracy matrix [T, N].
        weights: one non-negative weight per task (N of them, or at least T), normally the test sample counts,
            so A_N is the accuracy over all seen test samples. Default: equal weights.

    Returns:
        A_N as a float, in the units of R.
    """
    arr = _as_array(R)
    T = arr.shape[0]
    last = arr[T - 1, :T]
    if weights is None:
        return float(last.mean())
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or len(w) < T:
        raise ValueError(f"weights needs one entry per task ({arr.shape[1]}), got {len(w)}")
    w = w[:T]
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum over the seen tasks")
    return float((last * w).sum() / w.sum())


def average_forgetting(R: Matrix) -> float:
    """F_N = mean_{j < T-1} ( max_{j <= l < T-1} R[l][j] − R[T-1][j] ); 0 when only one task was trained.

    The max runs over the rows after task j was trained (rows l < j are unused, see the module docstring).

    Args:
        R: accuracy matrix [T, N].

    Returns:
        F_N as a float, in the units of R (positive = forgotten).
    """
    arr = _as_array(R)
    T = arr.shape[0]
    if T == 1:
        return 0.0
    drops = [arr[j : T - 1, j].max() - arr[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def backward_transfer(R: Matrix) -> float:
    """BWT = mean_{j < T-1} ( R[T-1][j] − R[j][j] ); 0 when only one task was trained.

    Args:
        R: accuracy matrix [T, N].

    Returns:
        BWT as a float, in the units of R (negative = forgetting).
    """
    arr = _as_array(R)
    T = arr.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([arr[T - 1, j] - arr[j, j] for j in range(T - 1)]))


def label_task_axes(ax: Any, rows: int, cols: int, ylabel: str, xlabel: str, fontsize: float | None = None) -> None:
    """Tick the axes of a heat map of R at the integer task indices (0..rows-1 down, 0..cols-1 across).

    ``imshow`` puts cell k at k - 0.5 .. k + 0.5; left to the default locator, the ticks of a small matrix land on
    fractions (-0.5, -0.25, ...) that are not tasks.

    Args:
        ax: the matplotlib axes holding the ``imshow`` of R [rows, cols].
        rows: tasks trained (T).
        cols: tasks evaluated (N).
        ylabel: label of the rows.
        xlabel: label of the columns.
        fontsize: of the labels and tick labels (matplotlib's default when None).
    """
    ax.set_xticks(range(cols), [str(j) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i) for i in range(rows)])
    ax.set_xlabel(xlabel, fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    if fontsize is not None:
        ax.tick_params(labelsize=fontsize)


def plot_accuracy_matrix(R: Matrix, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a heat map of R with its numbers to ``path`` (PNG), atomically.

    Rows are "after training task i", columns "accuracy on task j"; unused entries (j > i) are left blank.

    Args:
        R: accuracy matrix [T, N].
        path: output PNG path; parent directories are created.
        title: optional title; default shows A_N (equal weights), F_N and BWT.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = _as_array(R)
    T, N = arr.shape
    shown = np.ma.masked_array(arr, mask=np.triu(np.ones_like(arr, dtype=bool), k=1))
    percent = np.nanmax(arr[np.tril_indices(T)]) > 1.0 + 1e-9
    vmax = 100.0 if percent else 1.0
    size = max(3.5, 0.6 * N + 1.5)
    fig = Figure(figsize=(size + 1.0, size * T / N + 1.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax, aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fmt = "{:.1f}" if percent else "{:.2f}"
    for i in range(T):
        for j in range(i + 1):
            colour = "black" if arr[i, j] > 0.6 * vmax else "white"
            ax.text(j, i, fmt.format(arr[i, j]), ha="center", va="center", color=colour, fontsize=8)
    label_task_axes(ax, T, N, "after training task i", "evaluated on task j")
    if title is None:
        title = (
            f"A_N={fmt.format(average_accuracy(arr))}  F_N={fmt.format(average_forgetting(arr))}  "
            f"BWT={fmt.format(backward_transfer(arr))}"
        )
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with outputs.atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": outputs.PNG_SOFTWARE})
    return out


def write_cl_metrics(
    R: Matrix,
    log_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``cl_metrics.json`` and ``accuracy_matrix.png`` to ``log_dir``, each atomically.

    The JSON has the keys ``accuracy_matrix`` (list of rows; unused entries as ``null``), ``average_accuracy``,
    ``forgetting`` and ``bwt``, plus the items of ``extra`` (which may not override those four).

    Args:
        R: accuracy matrix [T, N].
        log_dir: output directory (created if missing), normally ``trainer.log_dir``.
        weights: per-task weights for A_N (test sample counts); default equal.
        extra: more JSON-serialisable items to store, e.g. ``{"class_order": [...], "seed": 0}``.

    Returns:
        Path of ``cl_metrics.json``.
    """
    arr = _as_array(R)
    metrics: dict[str, Any] = {
        "accuracy_matrix": [[None if not math.isfinite(v) else float(v) for v in row] for row in arr.tolist()],
        "average_accuracy": average_accuracy(arr, weights),
        "forgetting": average_forgetting(arr),
        "bwt": backward_transfer(arr),
    }
    for key, value in (extra or {}).items():
        if key in metrics:
            raise ValueError(f"extra key {key!r} would overwrite a computed metric; rename it")
        metrics[key] = value
    out_dir = Path(log_dir)
    json_path = out_dir / "cl_metrics.json"
    text = json.dumps(metrics, indent=2, allow_nan=False)
    plot_accuracy_matrix(arr, out_dir / "accuracy_matrix.png")
    outputs.write_file(json_path, (text + "\n").encode())
    return json_path
