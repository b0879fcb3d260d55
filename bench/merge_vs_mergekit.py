"""Whole ``lifelong-delta merge --mergekit_config`` against ``mergekit-yaml`` on the TREC + VADER MiniLM merge:
wall time, and both outputs' accuracy on both tasks.

Goals (issue 14): ours >= 10x faster as a whole command, and the accuracies of the two tools' merges agree within
the seed noise of ``make merge-eval``.

The inputs are the cached fine-tunes of ``make finetune`` (``--recipe``, default ``adamw``): the base
``trec/base`` and the fine-tunes ``trec/<recipe>`` and ``vader/<recipe>``, each copied once into ``--work`` with the
head of ``trec/base`` in place of its own (:func:`lifelong_delta.studies.merge_eval.encoder_checkpoint`): the heads
differ in shape (6 and 2 classes), a shared head has zero deltas, so both tools merge exactly the encoders. One
mergekit YAML per (method, density): ``task_arithmetic``, and ``ties``, ``dare_linear``, ``dare_ties`` at densities
0.1 and 0.3, weights 1, ``lambda: 1``, ``normalize`` set explicitly to this project's default for the method (true
for ties and dare_ties, false otherwise: ``make merge-eval``'s settings; mergekit's own default for dare_ties is
false), ``dtype: float32``. The same file goes to both tools:

    lifelong-delta merge --mergekit_config CFG --out OUT --seed S --progress false
    mergekit-yaml CFG OUT --random-seed S --quiet --no-copy-tokenizer

(mergekit without loading and copying a tokenizer, which would cost it 0.5-1.5 s more; ours copies the tokenizer
files.) Each command runs as a user runs it (a subprocess, page cache warm after one untimed warm-up of each),
``--repeats`` times, the commands interleaved round by round; round r uses seed r for both tools, the median time
is reported with the peak RSS (GNU ``/usr/bin/time``). Each round also times each tool's start-up floor,
``python -c "import jsonargparse, lifelong_delta.cli, lifelong_delta.delta.merge_words"`` in this venv (what our
command imports: on these fp32 checkpoints it merges raw words and never imports torch) and
``python -c "import mergekit.merge"`` in mergekit's, and the table gives the ratio of the time beyond it.
``--omp-threads 1`` runs torch, and so mergekit, on one thread: on a 2-core machine that other jobs keep busy, two
threads made it 2-3x slower. (Our compiled kernel does not use OpenMP; like ``prune``'s, it splits chunks of 2**18
elements or more, and TIES' cuts of two models, between two threads when the process may use two CPUs.) Outputs
are evaluated between runs, outside the timing, on the study's test subsample (``--max-test``, default 256 as
``make merge-eval``) with each task's own head.
The DARE merges give three seeds per tool (mergekit's ``torch.bernoulli`` masks, our counter-hash masks); task
arithmetic and TIES are deterministic and evaluated once, and the largest weight difference between the tools is
reported.

    .venv/bin/python bench/merge_vs_mergekit.py [--recipe adamw] [--repeats 3] [--max-test 256]
        [--cache-dir ~/.cache/lifelong_delta/finetunes] [--work DIR] [--study results/merge_eval/results.csv]
        [--mergekit-yaml PATH | --setup-mergekit] [--omp-threads N] [--json PATH]

mergekit is never a dependency of this project: it runs from the peer venv of ``bench/prune_command.py``
(``--setup-mergekit`` builds it: mergekit 0.1.5 from PyPI, seeing this venv's torch and transformers). Its
differences, which the accuracies absorb: its DARE rescales the kept entries to keep each delta's L1 norm
(``||δ||₁ / ||m ⊙ δ||₁``, about ``1/density``) where ours scales by ``1/density`` exactly; its TIES keeps
``max(1, int(density · n))`` entries and breaks ties at the cut by ``argsort`` order, ours ``int(density · n)`` and
ties by flat index.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from prune_command import PEER_VENV, PROJECT_VENV_BIN, Command, run_once, setup_mergekit

GOAL_SPEED = 10.0  # mergekit / ours >= 10
CONFIGS = (
    ("task_arithmetic", None),
    ("ties", 0.1),
    ("ties", 0.3),
    ("dare_linear", 0.1),
    ("dare_linear", 0.3),
    ("dare_ties", 0.1),
    ("dare_ties", 0.3),
)
NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": True}
OUR_IMPORTS = "import jsonargparse, lifelong_delta.cli, lifelong_delta.delta.merge_words"  # our start-up floor
STUDY_METHOD = {
    "task_arithmetic": "task-arithmetic",
    "ties": "ties",
    "dare_linear": "dare-linear",
    "dare_ties": "dare-ties",
}


def write_config(path: Path, method: str, density: float | None, base: Path, models: list[Path]) -> Path:
    """A mergekit YAML: ``method`` of ``models`` onto ``base``, weights 1, this project's default normalize."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
        lines += [f"      density: {density}"] if density is not None else []
    lines += ["parameters:", f"  normalize: {str(NORMALIZE[method]).lower()}", "  lambda: 1.0", "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(cache: Path, recipe: str, work: Path) -> tuple[Path, list[Path]]:
    """The base and the two fine-tunes with one shared head (trec/base's), written once into ``work``."""
    from lifelong_delta.studies.merge_eval import encoder_checkpoint

    head = cache / "trec" / "base"
    dirs = {"base": head, "trec": cache / "trec" / recipe, "vader": cache / "vader" / recipe}
    out = {}
    for key, src in dirs.items():
        dst = work / "inputs" / f"{key}-{recipe if key != 'base' else 'base'}"
        if not (dst / "model.safetensors").is_file():
            encoder_checkpoint(src, dst, head)
        out[key] = dst
    return out["base"], [out["trec"], out["vader"]]


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        for f in p.iterdir():
            with open(f, "rb") as fh:
                while fh.readinto(buf):
                    pass


def load_output(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    return {n: t for f in files for n, t in load_file(str(f)).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="adamw")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-test", type=int, default=256)
    ap.add_argument("--cache-dir", default="~/.cache/lifelong_delta/finetunes")
    ap.add_argument("--work", default=None, help="where the inputs, configs and outputs go (default: a temp dir)")
    ap.add_argument(
        "--study",
        default="results/merge_eval/results.csv",
        help="make merge-eval's results, for the seed spread of the same cells",
    )
    ap.add_argument("--mergekit-yaml", default=None)
    ap.add_argument("--setup-mergekit", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the evaluations (not timed)")
    ap.add_argument(
        "--omp-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of both tools' commands (default: unset, torch's one thread per core)",
    )
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()

    from lifelong_delta.studies.merge_eval import RecipeRun
    from lifelong_delta.studies.prune_eval_data import finetune_hparams, task_splits
    from lifelong_delta.text.finetune import finetune_dir

    torch.set_num_threads(args.threads)
    mergekit = (
        setup_mergekit(PEER_VENV)
        if args.setup_mergekit
        else Path(args.mergekit_yaml or PEER_VENV / "bin" / "mergekit-yaml")
    )
    if not mergekit.is_file():
        sys.exit(f"error: no mergekit-yaml at {mergekit}; pass --setup-mergekit or --mergekit-yaml PATH")
    cache = Path(os.path.expanduser(args.cache_dir))
    work = Path(args.work or tempfile.mkdtemp(prefix="merge_vs_mergekit-"))
    work.mkdir(parents=True, exist_ok=True)
    base, models = prepare(cache, args.recipe, work)
    tasks = ("trec", "vader")
    splits = {
        t: task_splits(finetune_hparams(finetune_dir(t, args.recipe, cache)), args.max_test, 1, 1, 32) for t in tasks
    }
    run = RecipeRun(
        args.recipe,
        tasks,
        {t: finetune_dir(t, "base", cache) for t in tasks},
        {t: finetune_dir(t, args.recipe, cache) for t in tasks},
        splits,
    )

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if args.omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    ld = str(PROJECT_VENV_BIN / "lifelong-delta")
    cmds: list[tuple[str, str, float | None, Command]] = []
    for method, density in CONFIGS:
        tag = method + (f"-{density:g}" if density is not None else "")
        cfg = write_config(work / f"{tag}.yaml", method, density, base, models)
        cmds.append(
            (
                "ours",
                method,
                density,
                Command(
                    f"lifelong-delta merge {tag}",
                    [
                        ld,
                        "merge",
                        "--mergekit_config",
                        str(cfg),
                        "--out",
                        str(work / f"ours-{tag}"),
                        "--progress",
                        "false",
                    ],
                    "merge",
                    work / f"ours-{tag}",
                ),
            )
        )
        cmds.append(
            (
                "mergekit",
                method,
                density,
                Command(
                    f"mergekit-yaml {tag}",
                    [str(mergekit), str(cfg), str(work / f"mk-{tag}"), "--quiet", "--no-copy-tokenizer"],
                    "merge",
                    work / f"mk-{tag}",
                ),
            )
        )
    floors = [
        Command("our command's imports", [str(PROJECT_VENV_BIN / "python"), "-c", OUR_IMPORTS], "start-up"),
        Command(
            "import mergekit.merge (peer venv)",
            [str(mergekit.parent / "python"), "-c", "import mergekit.merge"],
            "start-up",
        ),
    ]
    log = work / "run.log"
    warm_page_cache([base, *models])
    for c in floors:
        run_once(c, env, log)
        c.times.clear()
        c.rss.clear()
        c.load.clear()
    seeded = {id(c): list(c.argv) for *_, c in cmds}

    def with_seed(c: Command, seed: int) -> None:
        flag = "--seed" if c.label.startswith("lifelong") else "--random-seed"
        c.argv = [*seeded[id(c)], flag, str(seed)]

    for *_, c in cmds:  # warm-up: bytecode, numba's cache, the page cache of both tools' files
        with_seed(c, 0)
        run_once(c, env, log)
        c.times.clear()
        c.rss.clear()
        c.load.clear()
    acc: dict[tuple[str, str, float | None], list[dict[str, float]]] = {}
    max_diff: dict[tuple[str, float | None], float] = {}
    for r in range(args.repeats):
        for tool, method, density, c in cmds:
            with_seed(c, r)
            run_once(c, env, log)
            random = method.startswith("dare")
            if random or r == 0:
                out = load_output(c.out)
                enc = {n: out[n] for n in run.names}
                acc.setdefault((tool, method, density), []).append(run.accuracies(enc))
                if not random and tool == "mergekit":
                    ours = load_output(next(x for t, m, d, x in cmds if (t, m, d) == ("ours", method, density)).out)
                    max_diff[(method, density)] = max(float((ours[n] - enc[n]).abs().max()) for n in run.names)
            print(f"round {r + 1}/{args.repeats}: {c.label} seed {r}: {c.times[-1]:.2f} s", flush=True)
        for c in floors:
            run_once(c, env, log)
    report(cmds, floors, acc, max_diff, splits, args, work)


def _spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _study_cells(path: str) -> dict[tuple[str, str, float, str], list[float]]:
    """``{(recipe, method, density, task): accuracies over seeds}`` of ``make merge-eval``'s results (if present)."""
    if not Path(path).is_file():
        return {}
    from lifelong_delta.studies.merge_eval_report import read_results

    out: dict[tuple[str, str, float, str], list[float]] = {}
    for r in read_results(path):
        if r["density"] is not None:
            out.setdefault((r["recipe"], r["method"], r["density"], r["task"]), []).append(r["accuracy"])
    return out


def report(
    cmds: list[tuple[str, str, float | None, Command]],
    floors: list[Command],
    acc: dict,
    max_diff: dict,
    splits: dict,
    args: Any,
    work: Path,
) -> None:
    """Print the speed and accuracy tables (and write ``--json``)."""
    study = _study_cells(args.study)
    tasks = list(splits)
    rss = "peak RSS MB"
    threads = "torch's default threads" if args.omp_threads is None else f"OMP_NUM_THREADS={args.omp_threads}"
    print(
        f"\nTREC + VADER MiniLM ({args.recipe}) merged by both tools from one mergekit YAML; wall time of the whole "
        f"command ({threads}, load average {statistics.fmean(x for *_, c in cmds for x in c.load):.1f}), median of "
        f"{args.repeats} (seeds 0..{args.repeats - 1}); accuracy on {splits['trec'].test.n} + "
        f"{splits['vader'].test.n} test examples, each task with its own head\n"
    )
    f_ours, f_mk = floors[0].median, floors[1].median
    print(
        f"| merge | lifelong-delta s | mergekit s | mergekit / ours | {rss} ours / mergekit | goal >= "
        f"{GOAL_SPEED:g}x | beyond start-up: mergekit / ours |"
    )
    print("|---|---:|---:|---:|---:|---|---:|")
    rows = []
    pairs = {(m, d): {} for _, m, d, _ in cmds}
    for tool, m, d, c in cmds:
        pairs[(m, d)][tool] = c
    for (m, d), two in pairs.items():
        o, k = two["ours"], two["mergekit"]
        ratio = k.median / o.median
        tag = m + (f" {d:g}" if d is not None else "")
        beyond = (k.median - f_mk) / max(o.median - f_ours, 1e-3)
        print(
            f"| {tag} | {o.median:.2f} | {k.median:.2f} | {ratio:.1f}x | {max(o.rss) / 2**20:.0f} / "
            f"{max(k.rss) / 2**20:.0f} | {'yes' if ratio >= GOAL_SPEED else 'NO'} | {beyond:.1f}x |"
        )
        rows.append(
            {
                "method": m,
                "density": d,
                "ours_s": o.times,
                "mergekit_s": k.times,
                "ratio": ratio,
                "ratio_beyond_start_up": beyond,
                "ours_rss": o.rss,
                "mergekit_rss": k.rss,
            }
        )
    print(
        f"| start-up floor: `python -c '{OUR_IMPORTS}'` / `'import mergekit.merge'` | {f_ours:.2f} | {f_mk:.2f} | "
        f"| {max(floors[0].rss) / 2**20:.0f} / {max(floors[1].rss) / 2**20:.0f} | | |"
    )
    print("\n| merge | task | lifelong-delta % | mergekit % | difference (pt) | study's seed std (pt) | agree |")
    print("|---|---|---:|---:|---:|---:|---|")
    agreement = []
    for m, d in pairs:
        for t in tasks:
            ours = _spread([a[t] for a in acc[("ours", m, d)]])
            mk = _spread([a[t] for a in acc[("mergekit", m, d)]])
            cell = study.get((args.recipe, STUDY_METHOD[m], 1.0 if d is None else d, t), [])
            seed_std = _spread(cell)[1] if len(cell) > 1 else max(ours[1], mk[1])
            diff = 100 * (mk[0] - ours[0])
            if m.startswith("dare"):  # two standard deviations of the seed noise
                tol = 2 * 100 * max(seed_std, ours[1], mk[1])
            else:  # deterministic: within one test example
                tol = 100 / splits[t].test.n + 1e-9
            ok = abs(diff) <= tol
            tag = m + (f" {d:g}" if d is not None else "")
            same = f"{100 * _spread(cell)[0]:.1f}" if cell else "–"
            print(
                f"| {tag} | {t} | {100 * ours[0]:.1f} ± {100 * ours[1]:.1f} (study {same}) | {100 * mk[0]:.1f} ± "
                f"{100 * mk[1]:.1f} | {diff:+.1f} | {100 * seed_std:.1f} | {'yes' if ok else 'NO'} (±{tol:.1f}) |"
            )
            agreement.append(
                {
                    "method": m,
                    "density": d,
                    "task": t,
                    "ours": [a[t] for a in acc[("ours", m, d)]],
                    "mergekit": [a[t] for a in acc[("mergekit", m, d)]],
                    "study": cell,
                    "tolerance_pt": tol,
                    "agree": ok,
                }
            )
    for (m, d), diff in max_diff.items():
        print(f"{m}{'' if d is None else f' {d:g}'}: largest |mergekit − ours| weight difference {diff:.2e}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "speed": rows,
                    "start_up": {c.label: c.times for c in floors},
                    "accuracy": agreement,
                    "max_weight_diff": {f"{m} {d}": v for (m, d), v in max_diff.items()},
                    "work": str(work),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
