"""Outputs of ``merge_eval``: ``results.csv``, ``summary.md``, ``accuracy_vs_density.png`` and ``meta.json``.

Pure functions over result rows (``{"recipe", "method", "density", "seed", "task", "accuracy", "merge_s"}``;
reference rows, the base and the unmerged fine-tunes, have an empty density and seed), so everything can be redrawn
from ``results.csv`` alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lifelong_delta import outputs
from lifelong_delta.studies.prune_eval_report import Agg
from lifelong_delta.studies.results import csv_bytes

__all__ = [
    "RESULT_COLUMNS",
    "aggregate",
    "plot_accuracy_vs_density",
    "read_results",
    "summary_markdown",
    "write_outputs",
]

RESULT_COLUMNS = ("recipe", "method", "density", "seed", "task", "accuracy", "merge_s")
METHOD_STYLE = {
    "task-arithmetic": ("k", "*"),
    "ties": ("C1", "D"),
    "dare-linear": ("C3", "o"),
    "dare-ties": ("C2", "v"),
    "darex-q": ("C0", "s"),
}
Key = tuple[str, str, float | None, str]  # (recipe, method, density or None for a reference, task)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _csv_bytes(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return csv_bytes(RESULT_COLUMNS, ([_fmt(r.get(c, "")) for c in RESULT_COLUMNS] for r in rows))


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a ``results.csv``, typed: ``density`` float (None for references), ``seed`` int or None,
    ``accuracy`` float, ``merge_s`` float or None."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ValueError(f"{path}: expected the columns {','.join(RESULT_COLUMNS)}, got {reader.fieldnames}")

        def opt(text: str, kind: type) -> Any:
            return kind(text) if text != "" else None

        return [
            {
                **r,
                "density": opt(r["density"], float),
                "seed": opt(r["seed"], int),
                "accuracy": float(r["accuracy"]),
                "merge_s": opt(r["merge_s"], float),
            }
            for r in reader
        ]


def _density(r: Mapping[str, Any]) -> float | None:
    d = r["density"]
    return None if d in ("", None) else float(d)


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[Key, Agg]:
    """``{(recipe, method, density, task): Agg}`` over the mask seeds of each cell (density None: a reference)."""
    groups: dict[Key, list[float]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["method"], _density(r), r["task"]), []).append(float(r["accuracy"]))
    return {k: Agg(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _normalised(agg: Mapping[Key, Agg], recipe: str, method: str, density: float, tasks: Sequence[str]) -> float | None:
    """Mean over tasks of the merge's accuracy over the task's own fine-tune's (the merging papers' metric)."""
    parts = []
    for t in tasks:
        a, own = agg.get((recipe, method, density, t)), agg.get((recipe, f"finetune-{t}", None, t))
        if a is None or own is None or own.mean == 0:
            return None
        parts.append(a.mean / own.mean)
    return statistics.fmean(parts)


def summary_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The readable report: set-up, reference rows, accuracy per task per method × density, normalised mean."""
    agg = aggregate(rows)
    tasks = _ordered(r["task"] for r in rows)
    recipes = _ordered(r["recipe"] for r in rows)
    densities = sorted({d for r in rows if (d := _density(r)) is not None})
    normalize = meta.get("normalize", {})
    lines = [
        f"# Merging fine-tunes: {' + '.join(t.upper() for t in tasks)} MiniLM (`lifelong-delta merge`)",
        "",
        f"Wall time {meta.get('wall_time_s', math.nan) / 60:.1f} min with {meta.get('jobs', 1)} process(es) of "
        f"{meta.get('threads', '?')} torch thread(s). Reproduce: `{meta.get('command', 'make merge-eval')}`.",
        "",
        "## Set-up",
        "",
    ]
    for t, sp in meta.get("splits", {}).items():
        sub = (
            "the whole test split"
            if sp["test"] == sp["test_full"]
            else f"a stratified subsample of {sp['test']} of the {sp['test_full']} test examples, "
            "the same for every row"
        )
        lines.append(f"- **{t}**: {sub}; chance (majority class) {100 * sp['majority']:.1f} %.")
    lines += [
        f"- Merged: every encoder tensor of the fine-tunes of one recipe, in the order {', '.join(tasks)}; the heads "
        f"(`{', '.join(meta.get('exclude', []))}`) are task-specific and not merged. Task T is evaluated with the "
        "merged encoder and T's own head.",
        f"- Weights {meta.get('weights', 1):g} each, λ = {meta.get('lambda', 1):g}; normalize (divide by the "
        "(agreeing) weights) for "
        + (", ".join(m for m, n in normalize.items() if n) or "none")
        + ", not for "
        + (", ".join(m for m, n in normalize.items() if not n) or "none")
        + ". With two models task arithmetic "
        "adds both deltas in full. DAREx-q rescales by 1/√density.",
        f"- Mask seeds {meta.get('seeds')} for the DARE merges (model i draws seed + i); TIES is deterministic (one "
        "run); at density 1 the DARE mask keeps everything (one run). Cells: accuracy in %, mean ± sample std over "
        "seeds.",
        f"- In-memory merge of the encoder (the function `lifelong-delta merge` streams): median "
        f"{meta.get('merge_s_median', math.nan):.2f} s per merge.",
        "",
        "## References: unmerged encoders, each task with its own head",
        "",
        "| recipe | encoder | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for rc in recipes:
        refs = _ordered(r["method"] for r in rows if r["recipe"] == rc and _density(r) is None)
        for m in refs:
            cells = [agg[(rc, m, None, t)].cell() if (rc, m, None, t) in agg else "–" for t in tasks]
            lines.append(f"| {rc} | {m} | " + " | ".join(cells) + " |")
    for rc in recipes:
        methods = _ordered(r["method"] for r in rows if r["recipe"] == rc and _density(r) is not None)
        for t in tasks:
            own = agg.get((rc, f"finetune-{t}", None, t))
            lines += [
                "",
                f"## {rc}, {t}: test accuracy (%) of the merge" + (f" (own fine-tune {own.cell()})" if own else ""),
                "",
                "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |",
                "|---|" + "---|" * len(densities),
            ]
            for m in methods:
                cells = [agg[(rc, m, d, t)].cell() if (rc, m, d, t) in agg else "–" for d in densities]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"## {rc}: mean over tasks of accuracy / own fine-tune's accuracy",
            "",
            "| method | " + " | ".join(f"density {d:g}" for d in densities) + " |",
            "|---|" + "---|" * len(densities),
        ]
        for m in methods:
            vals = [_normalised(agg, rc, m, d, tasks) for d in densities]
            lines.append(f"| {m} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_density(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str] | None = None,
    chance: Mapping[str, float] | None = None,
) -> Any:
    """Accuracy against density: one panel per (recipe, task), one line per method (error bars: std over seeds).

    Dashed: the task's own fine-tune; dash-dotted: the base encoder with the task's head; dotted: the majority class;
    solid grey: task arithmetic (density 1 only).

    Returns:
        The matplotlib figure (also written atomically to ``path`` as PNG if given).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    tasks = _ordered(r["task"] for r in rows)
    recipes = _ordered(r["recipe"] for r in rows)
    fig, axes = plt.subplots(
        len(recipes), len(tasks), figsize=(3.6 * len(tasks) + 1.8, 2.9 * len(recipes) + 0.6), squeeze=False, sharex=True
    )
    handles: dict[str, Any] = {}
    for i, rc in enumerate(recipes):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            own, base = agg.get((rc, f"finetune-{t}", None, t)), agg.get((rc, "base", None, t))
            if own:
                handles["own fine-tune"] = ax.axhline(100 * own.mean, color="k", ls="--", lw=1)
            if base:
                handles["base encoder"] = ax.axhline(100 * base.mean, color="0.4", ls="-.", lw=1)
            if chance and t in chance:
                handles["majority class"] = ax.axhline(100 * chance[t], color="0.6", ls=":", lw=1)
            methods = _ordered(k[1] for k in agg if k[0] == rc and k[2] is not None and k[3] == t)
            for m in methods:
                pts = sorted((k[2], a) for k, a in agg.items() if k[:2] == (rc, m) and k[3] == t and k[2] is not None)
                if m == "task-arithmetic" and len(pts) == 1:  # density 1 only: a level to compare the others with
                    handles.setdefault(m, ax.axhline(100 * pts[0][1].mean, color="k", lw=1, alpha=0.6))
                    continue
                color, marker = METHOD_STYLE.get(m, (None, "."))
                h = ax.errorbar(
                    [d for d, _ in pts],
                    [100 * a.mean for _, a in pts],
                    yerr=[100 * a.std for _, a in pts],
                    color=color,
                    marker=marker,
                    ms=4,
                    lw=1.2,
                    capsize=2,
                    label=m,
                )
                handles.setdefault(m, h)
            ax.set_xscale("log")
            ax.set_title(f"{rc}: {t}", fontsize=9)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            if i == len(recipes) - 1:
                ax.set_xlabel("density (kept fraction of each delta)")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Merged encoder, each task with its own head (mean ± std over mask seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    if path is not None:
        outputs.write_png(path, fig)
        plt.close(fig)
    return fig


def write_outputs(out: Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> dict[str, str]:
    """Write every output file of the study into ``out`` (atomically) and return their paths."""
    paths = {
        "results": out / "results.csv",
        "summary": out / "summary.md",
        "plot": out / "accuracy_vs_density.png",
        "meta": out / "meta.json",
    }
    outputs.write_file(paths["results"], _csv_bytes(rows))
    outputs.write_file(paths["summary"], summary_markdown(rows, meta).encode())
    outputs.write_file(paths["meta"], (json.dumps(meta, indent=2, default=str) + "\n").encode())
    chance = {t: sp["majority"] for t, sp in meta.get("splits", {}).items()}
    plot_accuracy_vs_density(rows, paths["plot"], chance)
    return {k: str(v) for k, v in paths.items()}
