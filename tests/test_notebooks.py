"""Execute the notebooks end to end (nbclient, the venv's ``python3`` kernel) on tiny fixtures."""

import csv
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _tiny_results(path: Path) -> int:
    """A small but complete results.csv: 2 tasks x 2 fine-tunes, DARE collapsing and DAREx-q holding up."""
    rows = []
    for task in ("trec", "vader"):
        for ft, shift in (("adamw", 0.0), ("adamr-l2", 0.05)):
            rows.append((task, ft, "unpruned", 0, 0, 0.9))
            for p, dare_acc in ((0.5, 0.89), (0.9, 0.8), (0.99, 0.2)):
                for method, acc in (
                    ("dare", dare_acc + shift),
                    ("darex-q-grid", 0.85 + shift / 2),
                    ("magnitude", 0.7),
                ):
                    seeds = [0] if p < 0.9 or method == "magnitude" else [0, 1, 2]
                    rows += [(task, ft, method, p, s, round(acc - 0.01 * s, 6)) for s in seeds]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "finetune", "method", "p", "seed", "accuracy"])
        writer.writerows(rows)
    return len(rows)


def _run(notebook: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_prune_eval_notebook_draws_the_plots_from_a_results_csv(tmp_path, monkeypatch):
    results = tmp_path / "results.csv"
    n = _tiny_results(results)
    (tmp_path / "meta.json").write_text(
        json.dumps({"splits": {"trec": {"majority": 0.23}, "vader": {"majority": 0.52}}})
    )
    monkeypatch.setenv("PRUNE_EVAL_RESULTS", str(results))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's inline backend emits the PNGs
    nb = _run(ROOT / "notebooks" / "prune_eval.ipynb", tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{n} rows from {results}" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # accuracy vs p, and the bar chart at the most extreme p
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "darex-q-grid" in html and "±" in html  # the mean ± std table


def _tiny_cl_study(root: Path, methods: dict[str, float], seeds: int, tasks: int, runs: bool) -> int:
    """A results.csv (and optionally runs/<method>/seed<k>/cl_metrics.json) like `lifelong-delta cl-eval` writes."""
    root.mkdir(parents=True)
    rows = []
    for method, acc in methods.items():
        for s in range(seeds):
            a = round(acc + 0.01 * s, 6)
            forgetting = 0.0 if method == "joint" else round(0.8 - acc, 6)
            rows.append((method, s, a, forgetting, -forgetting))
            if runs and method != "joint":
                R = [[(acc if j <= i else None) for j in range(tasks)] for i in range(tasks)]
                out = root / "runs" / method / f"seed{s}"
                out.mkdir(parents=True)
                (out / "cl_metrics.json").write_text(json.dumps({"accuracy_matrix": R}))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "average_accuracy", "forgetting", "bwt"])
        writer.writerows(rows)
    return len(rows)


def test_cl_eval_notebook_compares_studies_and_skips_missing_ones(tmp_path, monkeypatch):
    five = _tiny_cl_study(tmp_path / "cl_eval", {"ft": 0.2, "predkd": 0.25, "l2": 0.3, "joint": 0.7}, 3, 5, False)
    two = _tiny_cl_study(tmp_path / "cl_eval_2x5", {"ft": 0.3, "predkd_featkd": 0.45, "codap": 0.35}, 2, 2, True)
    dirs = [tmp_path / "cl_eval", tmp_path / "cl_eval_2x5", tmp_path / "missing"]
    monkeypatch.setenv("CL_EVAL_DIRS", ":".join(map(str, dirs)))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = _run(ROOT / "notebooks" / "cl_eval.ipynb", tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{five} rows from {dirs[0] / 'results.csv'}" in text and f"{two} rows from" in text
    assert f"skipped {dirs[2]}" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # A_N vs F_N, paired gain over FT, last row of R (runs of the 2x5 study only)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    # mean ± std over seeds in %, labels from cl_eval.LABELS, and "–" where a method was not run in a study
    assert "26.0 ± 1.0" in html and "PredKD+FeatKD" in html and "CODA-P" in html and "–" in html
