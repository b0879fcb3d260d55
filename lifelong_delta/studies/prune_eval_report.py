"""Outputs of ``prune_eval``: the CSV files, ``summary.md`` and ``accuracy_vs_p.png``, written atomically.

Pure functions over result rows (``{"task", "finetune", "method", "p", "seed", "accuracy"}``), so the notebook
``notebooks/prune_eval.ipynb`` can redraw everything from ``results.csv`` alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifelong_delta import outputs
from lifelong_delta.studies.results import csv_bytes
from lifelong_delta.text.backbones import BACKBONES

__all__ = [
    "METHOD_STYLE",
    "RESULT_COLUMNS",
    "Agg",
    "aggregate",
    "plot_accuracy_vs_p",
    "read_results",
    "summary_markdown",
    "write_outputs",
]

RESULT_COLUMNS = ("task", "finetune", "method", "p", "seed", "accuracy")
Q_COLUMNS = ("task", "finetune", "method", "p", "seed", "q", "q_min", "q_max", "candidates", "eta")
REC_COLUMNS = ("task", "finetune", "p", "pick", "if_refinetune", "rel_norm", "dare_noise", "reason")
METHOD_ORDER = (
    "dare",
    "darex-q-grid",
    "darex-q-analytic",
    "darex-q-unlabelled",
    "magnitude",
    "wanda",
    "structural",
)


@dataclass(frozen=True)
class Agg:
    """Accuracy over mask seeds: mean, sample standard deviation (0 for one seed) and the number of seeds."""

    mean: float
    std: float
    n: int

    def cell(self) -> str:
        """``"85.2 ± 1.3"`` in percent (no spread for one seed)."""
        return f"{100 * self.mean:.1f}" + (f" ± {100 * self.std:.1f}" if self.n > 1 else "")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _csv_bytes(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    return csv_bytes(columns, ([_fmt(r.get(c, "")) for c in columns] for r in rows))  # a missing column stays empty


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` with typed values (``p`` and ``accuracy`` float, ``seed`` int)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ValueError(f"{path}: expected the columns {','.join(RESULT_COLUMNS)}, got {reader.fieldnames}")
        return [{**r, "p": float(r["p"]), "seed": int(r["seed"]), "accuracy": float(r["accuracy"])} for r in reader]


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, float], Agg]:
    """``{(task, finetune, method, p): Agg}`` over the seeds of each cell."""
    groups: dict[tuple[str, str, str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["finetune"], r["method"], float(r["p"])), []).append(float(r["accuracy"]))
    return {k: Agg(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in order if v in seen] + [v for v in seen if v not in order]


def best_method(
    agg: Mapping[tuple[str, str, str, float], Agg], task: str, finetune: str, p: float
) -> tuple[str, Agg] | None:
    """The pruning method with the highest mean accuracy at ``p`` (None if nothing was evaluated there)."""
    cands = [(k[2], a) for k, a in agg.items() if k[:2] == (task, finetune) and k[3] == p and k[2] != "unpruned"]
    return max(cands, key=lambda ma: ma[1].mean) if cands else None


def _verdict(pick: str, agg: Mapping[tuple[str, str, str, float], Agg], task: str, ft: str, p: float) -> list[str]:
    best = best_method(agg, task, ft, p)
    mine = agg.get((task, ft, pick, p))
    if best is None:
        return ["–", "–", "–", "–"]
    best_cell = f"{best[0]} {best[1].cell()}"
    if mine is None:
        return ["not evaluated", best_cell, "–", ""]
    gap = 100 * (best[1].mean - mine.mean)
    if pick == best[0] or gap <= 0:
        verdict = "best"
    elif gap <= 100 * max(best[1].std, mine.std):
        verdict = f"−{gap:.1f} pt, within one std of the best"
    else:
        verdict = f"−{gap:.1f} pt below the best"
    return [mine.cell(), best_cell, verdict, ""]


def _lora_methods_text(meta: Mapping[str, Any]) -> str:
    lora = [m for m in meta.get("lora_methods", ()) if m != "unpruned"]
    if set(lora) >= set(meta.get("methods", ())) - {"unpruned"}:
        return "every method, like a full delta"
    return ", ".join(lora)


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    q_rows: Sequence[Mapping[str, Any]],
    recs: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> str:
    """The readable report: set-up, accuracy (mean ± std over seeds), chosen q, and recommend's picks."""
    agg = aggregate(rows)
    ps = sorted({float(r["p"]) for r in rows if r["method"] != "unpruned"})
    lines = _setup_section(meta) + _finetunes_section(meta)
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += _accuracy_section(rows, agg, task, ps)
    if q_rows:
        lines += _q_section(q_rows, ps)
    if recs:
        lines += _recommend_section(recs, agg)
    return "\n".join(lines) + "\n"


def _setup_section(meta: Mapping[str, Any]) -> list[str]:
    """The title, the wall time and command, and the set-up: test subsamples, what is pruned, q grid, seeds."""
    s = meta.get("settings", {})
    label = BACKBONES[meta["backbone"]].label if meta.get("backbone") in BACKBONES else "MiniLM"
    lines = [f"# Delta-pruning study: {label} fine-tunes (DARE the Extreme, arXiv 2410.09344)", ""]
    lines += [
        (
            f"Wall time {meta.get('wall_time_s', float('nan')) / 60:.1f} min with {meta.get('jobs', 1)} "
            f"process(es) of {meta.get('threads', '?')} torch thread(s). "
            f"Reproduce: `{meta.get('command', 'make prune-eval')}`."
        ),
        "",
    ]
    split_bits = []
    for t, sp in meta.get("splits", {}).items():
        sub = (
            "the whole test split"
            if sp["test"] == sp["test_full"]
            else f"a stratified subsample of {sp['test']} of the {sp['test_full']} test examples "
            "(to fit the time budget)"
        )
        split_bits.append(
            f"- **{t}**: {sub}; chance (majority class) {100 * sp['majority']:.1f} %; q grid on "
            f"{sp['val']} validation examples; {sp['calib']} unlabelled training inputs for "
            "calibration."
        )
    return lines + [
        "## Set-up",
        "",
        *split_bits,
        (f"- Pruned: every encoder tensor, embeddings included; left alone: `{', '.join(s.get('exclude', []))}`."),
        (
            f"- q candidates: {s.get('q_grid_size')} geometric in [1−p, 1], then {s.get('q_fine_steps')} "
            "fine steps around the best. Magnitude and WANDA keep the top 1−p of each row without rescaling."
        ),
        (
            f"- Mask seeds {meta.get('seeds')}: every random method runs all of them at p ≥ 0.9 "
            f"(the first {meta.get('low_p_seeds', 1)} at p < 0.9). Cells show accuracy in % as mean ± sample "
            "std over seeds."
        ),
        (
            f"- At p ≥ 0.999 only {', '.join(meta.get('extreme_methods', ()))} run; the LoRA fine-tune's "
            f"delta B·A is pruned by {_lora_methods_text(meta)}."
        ),
        "",
    ]


def _finetunes_section(meta: Mapping[str, Any]) -> list[str]:
    """One row per fine-tune: unpruned and recorded test accuracy, relative delta norm, mean |δ|."""
    lines = [
        "## Fine-tunes",
        "",
        (
            "| task | fine-tune | unpruned (this test set) | recorded test acc (whole split) "
            "| ‖δ‖/‖θ_pre‖ (matrices) | mean abs δ |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for info in meta.get("finetunes_info", []):
        rec = info.get("recorded_test_acc")
        un = info.get("unpruned_accuracy")
        lines.append(
            f"| {info['task']} | {info['finetune']} | {'–' if un is None else f'{100 * un:.1f}'} | "
            f"{'–' if rec is None else f'{100 * rec:.1f}'} | {info['rel_norm']:.2e} | "
            f"{info['mean_abs_delta']:.2e} |"
        )
    return lines


def _accuracy_section(
    rows: Sequence[Mapping[str, Any]], agg: Mapping[tuple[str, str, str, float], Agg], task: str, ps: Sequence[float]
) -> list[str]:
    """``task``'s accuracy table: one row per (fine-tune, method), one column per p, the best method in bold."""
    lines = [
        "",
        f"## {task}: test accuracy (%) after pruning",
        "",
        "| fine-tune (unpruned) | method | " + " | ".join(f"p={p:g}" for p in ps) + " |",
        "|---|---|" + "---|" * len(ps),
    ]
    for ft in dict.fromkeys(r["finetune"] for r in rows if r["task"] == task):
        un = agg.get((task, ft, "unpruned", 0.0))
        label = f"{ft} ({un.cell()})" if un else ft
        methods = _ordered(
            (r["method"] for r in rows if r["task"] == task and r["finetune"] == ft and r["method"] != "unpruned"),
            METHOD_ORDER,
        )
        best = {p: best_method(agg, task, ft, p) for p in ps}
        for m in methods:
            cells = []
            for p in ps:
                a = agg.get((task, ft, m, p))
                text = "–" if a is None else a.cell()
                cells.append(f"**{text}**" if a is not None and best[p] and best[p][0] == m else text)
            lines.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
            label = ""
    return lines


def _q_section(q_rows: Sequence[Mapping[str, Any]], ps: Sequence[float]) -> list[str]:
    """The chosen q per (task, fine-tune, method) and p: the median over seeds (and over layers for analytic)."""
    lines = [
        "",
        "## Chosen q (median over seeds; analytic: median over layers)",
        "",
        "| task | fine-tune | method | " + " | ".join(f"p={p:g}" for p in ps) + " |",
        "|---|---|---|" + "---|" * len(ps),
    ]
    qs: dict[tuple[str, str, str, float], list[float]] = {}
    for r in q_rows:
        qs.setdefault((r["task"], r["finetune"], r["method"], float(r["p"])), []).append(float(r["q"]))
    for key in dict.fromkeys(k[:3] for k in qs):
        cells = [f"{statistics.median(qs[(*key, p)]):.3g}" if (*key, p) in qs else "–" for p in ps]
        lines.append(f"| {' | '.join(key)} | " + " | ".join(cells) + " |")
    return lines


def _recommend_section(recs: Sequence[Mapping[str, Any]], agg: Mapping[tuple[str, str, str, float], Agg]) -> list[str]:
    """``recommend``'s pick per (task, fine-tune, p) against the best method of the accuracy table."""
    lines = [
        "",
        "## What `lifelong-delta recommend` picks (labelled and unlabelled data available)",
        "",
        (
            "| task | fine-tune | p | ‖δ‖/‖θ_pre‖ | pick | its accuracy | best in the table | verdict "
            "| if re-fine-tuning is allowed |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        mine, best_cell, verdict, _ = _verdict(r["pick"], agg, r["task"], r["finetune"], float(r["p"]))
        lines.append(
            f"| {r['task']} | {r['finetune']} | {float(r['p']):g} | {float(r['rel_norm']):.2e} | "
            f"{r['pick']} | {mine} | {best_cell} | {verdict} | {r['if_refinetune']} |"
        )
    return lines


METHOD_STYLE = {
    "dare": ("C3", "o"),
    "darex-q-grid": ("C0", "s"),
    "darex-q-analytic": ("C9", "^"),
    "darex-q-unlabelled": ("C2", "v"),
    "magnitude": ("C1", "D"),
    "wanda": ("C4", "P"),
    "structural": ("C7", "x"),
}


def _xpos(p: float) -> float:
    return -math.log10(1.0 - p)  # 0.5 → 0.3, 0.9 → 1, 0.99 → 2, 0.999 → 3


def plot_accuracy_vs_p(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    chance: Mapping[str, float] | None = None,
) -> Any:
    """Accuracy against p: one row of panels per task, one panel per fine-tune, one line per method.

    The x axis is ``−log10(1 − p)`` (labelled with p; methods are shifted a little sideways so that equal
    results stay visible); error bars are the std over seeds; the dashed line is the unpruned model and the
    dotted one the majority-class rate from ``chance`` (``{task: accuracy}``).

    Returns:
        The matplotlib figure (also written atomically to ``path`` as PNG if given).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fts = list(dict.fromkeys(r["finetune"] for r in rows))
    ps = sorted({float(r["p"]) for r in rows if r["method"] != "unpruned"})
    fig, axes = plt.subplots(
        len(tasks),
        len(fts),
        figsize=(3.1 * len(fts) + 1.6, 2.7 * len(tasks) + 0.6),
        sharex=True,
        squeeze=False,
    )
    handles: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        for j, ft in enumerate(fts):
            ax = axes[i][j]
            un = agg.get((task, ft, "unpruned", 0.0))
            if un:
                handles["unpruned"] = ax.axhline(100 * un.mean, color="k", ls="--", lw=1)
            if chance and task in chance:
                handles["chance (majority class)"] = ax.axhline(100 * chance[task], color="0.5", ls=":", lw=1)
            methods = _ordered((k[2] for k in agg if k[:2] == (task, ft) and k[2] != "unpruned"), METHOD_ORDER)
            for k, m in enumerate(methods):
                pts = [(p, agg[(task, ft, m, p)]) for p in ps if (task, ft, m, p) in agg]
                color, marker = METHOD_STYLE.get(m, (None, "."))
                dx = 0.03 * (k - (len(methods) - 1) / 2)  # methods that coincide stay visible side by side
                h = ax.errorbar(
                    [_xpos(p) + dx for p, _ in pts],
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
            ax.set_title(f"{task} / {ft}", fontsize=9)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
            if i == len(tasks) - 1:
                ax.set_xlabel("drop rate p")
            ax.set_xticks([_xpos(p) for p in ps], [f"{p:g}" for p in ps], fontsize=7)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("Test accuracy after delta pruning (mean ± std over mask seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    if path is not None:
        outputs.write_png(path, fig)
        plt.close(fig)
    return fig


def write_outputs(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    q_rows: Sequence[Mapping[str, Any]],
    recs: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> dict[str, str]:
    """Write every output file of the study into ``out`` (atomically) and return their paths."""
    paths = {
        "results": out / "results.csv",
        "q_choices": out / "q_choices.csv",
        "recommend": out / "recommend.csv",
        "summary": out / "summary.md",
        "plot": out / "accuracy_vs_p.png",
        "meta": out / "meta.json",
    }
    outputs.write_file(paths["results"], _csv_bytes(RESULT_COLUMNS, rows))
    outputs.write_file(paths["q_choices"], _csv_bytes(Q_COLUMNS, q_rows))
    outputs.write_file(paths["recommend"], _csv_bytes(REC_COLUMNS, recs))
    outputs.write_file(paths["summary"], summary_markdown(rows, q_rows, recs, meta).encode())
    outputs.write_file(paths["meta"], (json.dumps(meta, indent=2, default=str) + "\n").encode())
    chance = {t: sp["majority"] for t, sp in meta.get("splits", {}).items()}
    plot_accuracy_vs_p(rows, paths["plot"], chance)
    return {k: str(v) for k, v in paths.items()}
