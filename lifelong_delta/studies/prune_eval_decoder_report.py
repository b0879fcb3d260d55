"""Outputs of ``prune_eval_decoder``: ``results.csv``, ``q_choices.csv``, ``summary.md``, ``perplexity_vs_p.png``.

Pure functions over result rows (``{"finetune", "method", "p", "seed", "perplexity"}``), written atomically. The
comparison with the encoder study reads ``results/prune_eval/results.csv`` (accuracy) when it is there.

How a gain is measured on both: the share of the fine-tune's gain that a pruned model keeps, for DARE and for
DAREx-q at the same p. The gain is over a floor, what is left with no delta at all: the pretrained base on the
decoder (in mean log-perplexity over seeds, ``L``: ``(L_base − L_pruned) / (L_base − L_finetuned)``), the majority
class on the encoder (in mean accuracy: ``(A_pruned − A_chance) / (A_finetuned − A_chance)``). Shares are clipped at
0: a model at or below its floor is no better than dropping the whole delta. DAREx-q's gain over DARE is the
difference of the two shares.
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
from lifelong_delta.studies.results import csv_bytes

__all__ = [
    "Q_COLUMNS",
    "RESULT_COLUMNS",
    "decoder_gains",
    "encoder_gains",
    "plot_perplexity_vs_p",
    "read_results",
    "summary_markdown",
    "write_outputs",
]

RESULT_COLUMNS = ("finetune", "method", "p", "seed", "perplexity")
Q_COLUMNS = ("finetune", "method", "p", "seed", "q", "q_min", "q_max", "candidates", "eta")
METHOD_ORDER = ("dare", "darex-q-grid", "darex-q-analytic", "darex-q-unlabelled", "magnitude", "wanda")
METHOD_STYLE = {
    "dare": ("C3", "o"),
    "darex-q-grid": ("C0", "s"),
    "darex-q-analytic": ("C9", "^"),
    "darex-q-unlabelled": ("C2", "v"),
    "magnitude": ("C1", "D"),
    "wanda": ("C4", "P"),
}
REFERENCE = ("unpruned", "pretrained")
GAIN_MODES = ("darex-q-grid", "darex-q-analytic", "darex-q-unlabelled")
Key = tuple[str, str, float]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _csv_bytes(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    return csv_bytes(columns, ([_fmt(r.get(c)) for c in columns] for r in rows))


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a decoder ``results.csv`` with typed values."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != RESULT_COLUMNS:
            raise ValueError(f"{path}: expected the columns {','.join(RESULT_COLUMNS)}, got {reader.fieldnames}")
        return [{**r, "p": float(r["p"]), "seed": int(r["seed"]), "perplexity": float(r["perplexity"])} for r in reader]


def _groups(rows: Iterable[Mapping[str, Any]]) -> dict[Key, list[float]]:
    out: dict[Key, list[float]] = {}
    for r in rows:
        out.setdefault((r["finetune"], r["method"], float(r["p"])), []).append(float(r["perplexity"]))
    return out


def _log_mean(values: Sequence[float]) -> float:
    """Mean log-perplexity over seeds (inf if any seed's perplexity is)."""
    return statistics.fmean(math.log(v) for v in values)


def _cell(values: Sequence[float]) -> str:
    """``"123 ± 4.5"``: mean ± sample std over seeds, 3 significant digits (no spread for one value)."""
    mean = statistics.fmean(values)
    text = _num(mean)
    if len(values) > 1 and math.isfinite(mean):
        text += f" ± {_num(statistics.stdev(values))}"
    return text


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    if abs(x) >= 1e5:
        return f"{x:.2e}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _kept(value: float, tuned: float, floor: float) -> float:
    """Share of the fine-tune's gain over ``floor`` that a pruned model keeps, clipped at 0 (at or below the floor:
    no better than dropping the whole delta, or than chance)."""
    return max(0.0, (value - floor) / (tuned - floor)) if math.isfinite(value) else 0.0


def decoder_gains(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (fine-tune, p, DAREx-q mode): perplexities (geometric means over seeds) of the fine-tune, the base, DARE
    and the mode, and the share of the fine-tune's gain over the base that DARE and the mode keep (in log-perplexity).
    """
    g = _groups(rows)
    out = []
    for ft in dict.fromkeys(r["finetune"] for r in rows):
        un, pre = g.get((ft, "unpruned", 0.0)), g.get((ft, "pretrained", 1.0))
        if un is None or pre is None:
            continue
        tuned, floor = -_log_mean(un), -_log_mean(pre)
        for p in sorted({k[2] for k in g if k[0] == ft and k[1] == "dare"}):
            dare = -_log_mean(g[(ft, "dare", p)])
            for mode in (m for m in GAIN_MODES if (ft, m, p) in g):
                x = -_log_mean(g[(ft, mode, p)])
                out.append(
                    {
                        "finetune": ft,
                        "p": p,
                        "mode": mode,
                        "unpruned": math.exp(-tuned),
                        "floor": math.exp(-floor),
                        "dare": math.exp(-dare),
                        "darex": math.exp(-x),
                        "kept_dare": _kept(dare, tuned, floor),
                        "kept_darex": _kept(x, tuned, floor),
                    }
                )
    return out


def encoder_gains(
    path: str | os.PathLike[str], finetunes: Sequence[str] = ("adamw", "adamr-l2", "adamw-large")
) -> list[dict[str, Any]]:
    """The same on the MiniLM encoder study's ``results.csv`` (mean accuracy over seeds; the floor is the majority
    class of each task's test set, read from the ``meta.json`` beside it), for its tasks and ``finetunes``.

    Returns ``[]`` when either file is missing.
    """
    meta = Path(path).with_name("meta.json")
    if not Path(path).is_file() or not meta.is_file():
        return []
    from lifelong_delta.studies.prune_eval_report import aggregate
    from lifelong_delta.studies.prune_eval_report import read_results as read_encoder

    chance = {t: sp["majority"] for t, sp in json.loads(meta.read_text()).get("splits", {}).items()}
    agg = aggregate(read_encoder(path))
    keys = sorted(
        (
            k
            for k in agg
            if k[1] in finetunes and k[2] in GAIN_MODES and k[0] in chance and (k[0], k[1], "dare", k[3]) in agg
        ),
        key=lambda k: (list(finetunes).index(k[1]), k[0], k[3], GAIN_MODES.index(k[2])),
    )
    out = []
    for task, ft, m, p in keys:
        x, dare, un = agg[(task, ft, m, p)].mean, agg[(task, ft, "dare", p)].mean, agg[(task, ft, "unpruned", 0.0)].mean
        out.append(
            {
                "task": task,
                "finetune": ft,
                "p": p,
                "mode": m,
                "unpruned": un,
                "floor": chance[task],
                "dare": dare,
                "darex": x,
                "kept_dare": _kept(dare, un, chance[task]),
                "kept_darex": _kept(x, un, chance[task]),
            }
        )
    return out


def _kept_cell(r: Mapping[str, Any]) -> str:
    """``"31 → 56"``: percent of the fine-tune's gain kept by DARE, then by the DAREx-q mode."""
    return f"{100 * r['kept_dare']:.0f} → {100 * r['kept_darex']:.0f}"


def _gain_table(dec: Sequence[Mapping[str, Any]], enc: Sequence[Mapping[str, Any]]) -> list[str]:
    """The headline: per p and DAREx-q mode, the share kept by DARE → by the mode, on each fine-tune of both."""
    enc_fts = list(dict.fromkeys(r["finetune"] for r in enc))
    head = "| p | DAREx-q mode | decoder: " + ", ".join(dict.fromkeys(r["finetune"] for r in dec)) + " |"
    head += "".join(
        f" MiniLM {ft}: " + ", ".join(dict.fromkeys(r["task"] for r in enc if r["finetune"] == ft)) + " |"
        for ft in enc_fts
    )
    lines = [head, "|---|---|---|" + "---|" * len(enc_fts)]
    for p in sorted({r["p"] for r in dec if r["p"] > 0}):
        for mode in GAIN_MODES:
            mine = [r for r in dec if r["p"] == p and r["mode"] == mode]
            if not mine:
                continue
            cells = [", ".join(_kept_cell(r) for r in mine)]
            for ft in enc_fts:
                theirs = [r for r in enc if r["p"] == p and r["mode"] == mode and r["finetune"] == ft]
                cells.append(", ".join(_kept_cell(r) for r in theirs) or "not run")
            lines.append(f"| {p:g} | {mode.removeprefix('darex-q-')} | " + " | ".join(cells) + " |")
    return lines


def _detail_table(rows: Sequence[Mapping[str, Any]], decoder: bool) -> list[str]:
    """DARE against each DAREx-q mode: perplexity (geometric mean over seeds) or accuracy (mean) per fine-tune, p."""
    fmt = _num if decoder else (lambda a: f"{100 * a:.1f}")
    lines = [
        "| "
        + ("fine-tune" if decoder else "task / fine-tune")
        + " | p | unpruned | "
        + ("pretrained" if decoder else "chance")
        + " | DARE | grid | analytic | unlabelled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r.get("task", ""), r["finetune"], r["p"]) for r in rows)
    for task, ft, p in keys:
        by = {r["mode"]: r for r in rows if (r.get("task", ""), r["finetune"], r["p"]) == (task, ft, p)}
        ref = next(iter(by.values()))
        cells = [fmt(by[m]["darex"]) if m in by else "–" for m in GAIN_MODES]
        lines.append(
            f"| {task + ' / ' if task else ''}{ft} | {p:g} | {fmt(ref['unpruned'])} | {fmt(ref['floor'])} | "
            f"{fmt(ref['dare'])} | " + " | ".join(cells) + " |"
        )
    return lines


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    q_rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    encoder: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The readable report: how the models were made, perplexities (mean ± std over seeds), q, and the gains."""
    g = _groups(rows)
    s = meta.get("settings", {})
    ev = meta.get("eval", {})
    lines = [
        "# Delta pruning of a small pretrained Llama (DARE the Extreme, arXiv 2410.09344)",
        "",
        f"Wall time {meta.get('wall_time_s', float('nan')) / 60:.1f} min ({meta.get('jobs', 1)} process(es) of "
        f"{meta.get('threads', '?')} torch thread(s); models "
        f"{'trained in this run' if meta.get('trained') else 'loaded from the cache'}). "
        f"Reproduce: `{meta.get('command', 'make prune-eval-decoder')}`.",
        "",
    ]
    lines += ["## Models", ""] + list(meta.get("model_lines", [])) + [""]
    lines += [
        "## Set-up",
        "",
        f"- Test: the first {ev.get('test_blocks')} blocks of {ev.get('seq_len')} tokens "
        f"({ev.get('test_tokens')} tokens) of the held-out fine-tune-domain text; the same for every cell.",
        f"- q and η searches: perplexity of {ev.get('val_tokens')} held-out validation tokens, minimised. "
        f"Input statistics (analytic q, WANDA) and the unlabelled q: {ev.get('calib_tokens')} training "
        "tokens through the fine-tuned model.",
        f"- q candidates: {s.get('q_grid_size')} geometric in [1−p, 1], then {s.get('q_fine_steps')} fine "
        f"step(s) around the best; the analytic q's η from {s.get('etas')} ({s.get('analytic_arithmetic')} "
        "arithmetic, as the authors' code).",
        f"- Mask seeds {meta.get('seeds')} for the random methods at every p; magnitude and WANDA are "
        "deterministic (one row). Every tensor is pruned: embeddings, norms and the output head included.",
        "- Cells: test perplexity, mean ± sample std over seeds; the best (lowest) mean of each column is bold. "
        "`pretrained` is the base model on the same text: the whole delta dropped.",
        "",
    ]
    lines += [
        "## Fine-tunes",
        "",
        "| fine-tune | unpruned | pretrained (p = 1) | ‖δ‖/‖θ_pre‖ (matrices) | mean abs δ |",
        "|---|---|---|---|---|",
    ]
    for info in meta.get("finetunes_info", []):
        ft = info["finetune"]
        un, pre = g.get((ft, "unpruned", 0.0)), g.get((ft, "pretrained", 1.0))
        lines.append(
            f"| {ft} | {_cell(un) if un else '–'} | {_cell(pre) if pre else '–'} | "
            f"{info['rel_norm']:.2e} | {info['mean_abs_delta']:.2e} |"
        )
    ps = sorted({k[2] for k in g if k[1] not in REFERENCE})
    lines += [
        "",
        "## Test perplexity after pruning",
        "",
        "| fine-tune | method | " + " | ".join(f"p={p:g}" for p in ps) + " |",
        "|---|---|" + "---|" * len(ps),
    ]
    for ft in dict.fromkeys(k[0] for k in g):
        methods = [m for m in METHOD_ORDER if any(k[:2] == (ft, m) for k in g)]
        best = {
            p: min((statistics.fmean(g[(ft, m, p)]), m) for m in methods if (ft, m, p) in g)[1]
            for p in ps
            if any((ft, m, p) in g for m in methods)
        }
        for i, m in enumerate(methods):
            cells = []
            for p in ps:
                text = _cell(g[(ft, m, p)]) if (ft, m, p) in g else "–"
                cells.append(f"**{text}**" if best.get(p) == m else text)
            lines.append(f"| {ft if i == 0 else ''} | {m} | " + " | ".join(cells) + " |")
    if q_rows:
        lines += [
            "",
            "## Chosen q (median over seeds; analytic: median over layers, and its η)",
            "",
            "| fine-tune | method | " + " | ".join(f"p={p:g}" for p in ps) + " |",
            "|---|---|" + "---|" * len(ps),
        ]
        qs: dict[Key, list[Mapping[str, Any]]] = {}
        for r in q_rows:
            qs.setdefault((r["finetune"], r["method"], float(r["p"])), []).append(r)
        for key in dict.fromkeys(k[:2] for k in qs):
            cells = []
            for p in ps:
                rs = qs.get((*key, p))
                if not rs:
                    cells.append("–")
                    continue
                text = f"{statistics.median(float(r['q']) for r in rs):.3g}"
                if key[1] == "darex-q-analytic":
                    text += f" (η {statistics.median(float(r['eta']) for r in rs):g})"
                cells.append(text)
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    dec = decoder_gains(rows)
    if dec:
        where = meta.get("encoder_results", "results/prune_eval/results.csv")
        lines += [
            "",
            "## DAREx-q against DARE, here and on the MiniLM encoder",
            "",
            "Each cell: the percentage of the fine-tune's gain kept by DARE → by DAREx-q at the same p. The gain "
            "is over the pretrained base on this decoder (in log-perplexity, geometric means over seeds) and "
            "over chance (the majority class) on the MiniLM encoder (mean accuracy, `"
            + where
            + "`"
            + ("" if encoder else ", not found")
            + "); shares are clipped at 0 (no better than no delta). "
            "The encoder study does not run DARE at p = 0.999.",
            "",
        ]
        lines += _gain_table(dec, encoder)
        lines += ["", "Perplexity of the decoder (geometric mean over seeds):", ""] + _detail_table(dec, True)
        if encoder:
            high = [r for r in encoder if r["p"] >= 0.9]
            lines += ["", "Test accuracy (%) of the encoder (mean over seeds):", ""] + _detail_table(high, False)
    return "\n".join(lines) + "\n"


def _xpos(p: float) -> float:
    return -math.log10(1.0 - p)  # 0.5 → 0.3, 0.9 → 1, 0.99 → 2, 0.999 → 3


def plot_perplexity_vs_p(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str] | None = None, model: str = "a small Llama"
) -> Any:
    """Test perplexity against p, one panel per fine-tune, one line per method (log scale).

    Points are geometric means over seeds, bars the range over seeds; methods are shifted a little sideways so
    that equal results stay visible. The dashed line is the unpruned fine-tune, the dotted one the pretrained base.
    Values above the panel's top (twice the base's perplexity) are drawn at the top as open markers, labelled with
    their value.

    Returns:
        The matplotlib figure (also written atomically to ``path`` as PNG if given).
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = _groups(rows)
    fts = list(dict.fromkeys(k[0] for k in g))
    ps = sorted({k[2] for k in g if k[1] not in REFERENCE})
    fig, axes = plt.subplots(1, len(fts), figsize=(4.6 * len(fts) + 2.2, 4.2), sharey=True, squeeze=False)
    handles: dict[str, Any] = {}
    finite = [v for vs in g.values() for v in vs if math.isfinite(v)]
    pre = [v for k, vs in g.items() if k[1] == "pretrained" for v in vs]
    top = 2 * max(pre) if pre else max(finite, default=10.0)
    bottom = 0.8 * min(finite, default=1.0)
    for j, ft in enumerate(fts):
        ax = axes[0][j]
        for method, style in (("unpruned", dict(color="k", ls="--")), ("pretrained", dict(color="0.45", ls=":"))):
            if (ft, method, 0.0 if method == "unpruned" else 1.0) in g:
                v = g[(ft, method, 0.0 if method == "unpruned" else 1.0)][0]
                handles[f"{method} ({'the fine-tune' if method == 'unpruned' else 'the base, p = 1'})"] = ax.axhline(
                    v, lw=1.2, **style
                )
        methods = [m for m in METHOD_ORDER if any(k[:2] == (ft, m) for k in g)]
        for k, m in enumerate(methods):
            color, marker = METHOD_STYLE.get(m, (None, "."))
            dx = 0.035 * (k - (len(methods) - 1) / 2)
            xs, ys, lo, hi, over = [], [], [], [], []
            for p in ps:
                vs = g.get((ft, m, p))
                if not vs:
                    continue
                mid = math.exp(_log_mean(vs)) if all(math.isfinite(v) for v in vs) else math.inf
                xs.append(_xpos(p) + dx)
                ys.append(min(mid, top))
                lo.append(max(0.0, min(mid, top) - min(min(vs), top)))
                hi.append(max(0.0, min(max(vs), top) - min(mid, top)))
                over.append(mid > top)
            h = ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, ms=5, lw=1.4, capsize=2, label=m)
            ax.scatter(
                [x for x, o in zip(xs, over) if o],
                [top] * sum(over),
                s=60,
                facecolors="white",
                edgecolors=color,
                marker=marker,
                zorder=5,
            )
            for x, o, p in zip(xs, over, [p for p in ps if (ft, m, p) in g]):
                if o:
                    mid = math.exp(_log_mean(g[(ft, m, p)]))
                    ax.annotate(
                        f"{m}: {_num(mid)}",
                        (x, top),
                        xytext=(-6, -4),
                        textcoords="offset points",
                        ha="right",
                        va="top",
                        fontsize=8,
                        color=color,
                    )
            handles.setdefault(m, h)
        ax.set_yscale("log")
        ax.set_ylim(bottom, top * 1.15)
        ax.set_title(f"fine-tune: {ft}", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("drop rate p")
        ax.set_xticks([_xpos(p) for p in ps], [f"{p:g}" for p in ps])
        if j == 0:
            ax.set_ylabel("held-out perplexity (log scale)")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=9, frameon=False)
    fig.suptitle(f"Delta pruning of {model}: held-out perplexity (geometric mean, range over mask seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    if path is not None:
        outputs.write_png(path, fig)
        plt.close(fig)
    return fig


def write_outputs(
    out: Path, rows: Sequence[Mapping[str, Any]], q_rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
) -> dict[str, str]:
    """Write every output file of the study into ``out`` (atomically) and return their paths."""
    paths = {
        "results": out / "results.csv",
        "q_choices": out / "q_choices.csv",
        "summary": out / "summary.md",
        "plot": out / "perplexity_vs_p.png",
        "meta": out / "meta.json",
    }
    encoder = encoder_gains(meta.get("encoder_results", "")) if meta.get("encoder_results") else []
    outputs.write_file(paths["results"], _csv_bytes(RESULT_COLUMNS, rows))
    outputs.write_file(paths["q_choices"], _csv_bytes(Q_COLUMNS, q_rows))
    outputs.write_file(paths["summary"], summary_markdown(rows, q_rows, meta, encoder).encode())
    outputs.write_file(paths["meta"], (json.dumps(meta, indent=2, default=str) + "\n").encode())
    params = ((meta.get("models") or {}).get("base") or {}).get("parameters")
    plot_perplexity_vs_p(rows, paths["plot"], f"a {params / 1e6:.1f} M-parameter Llama" if params else "a small Llama")
    return {k: str(v) for k, v in paths.items()}
