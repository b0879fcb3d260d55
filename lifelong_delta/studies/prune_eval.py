"""``make prune-eval``: prune encoder fine-tunes every way DARE the Extreme does; measure test accuracy.

Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models", arXiv 2410.09344.

For each task (TREC, VADER) and cached fine-tune (AdamW, AdamR-L2, AdamR-L1, large-delta AdamW, LoRA; see
:mod:`lifelong_delta.text.finetune`) of one encoder (``backbone``: MiniLM by default, MPNet-base for
``make prune-eval-base``) it evaluates the test accuracy of the unpruned model and of its delta
``δ = θ_ft − θ_pre`` pruned by

* ``dare``: drop with probability p, rescale by 1/(1−p) (Yu et al., arXiv 2311.03099);
* ``darex-q-grid`` / ``darex-q-analytic`` / ``darex-q-unlabelled``: the same mask, rescaled by 1/q, q chosen
  by a coarse-then-fine grid on the labelled validation split, per layer from ``c_ij = δ_ij · mean(x_j)``, or
  by the last-layer output change on unlabelled training inputs;
* ``magnitude`` / ``wanda``: keep the top ``1 − p`` of each output row by ``|δ|`` / ``|δ|·‖x_j‖₂``, no
  rescale;
* ``structural``: drop random whole rows of each delta matrix, rescaled by 1/q with q from the validation
  grid;
* for the LoRA fine-tune, the delta is ``B·A`` of the adapted matrices
  (:func:`lifelong_delta.delta.lora_deltas`), pruned by every method like a full delta (``lora_methods``
  restricts them).

Mask seeds: every random method runs all seeds at p ≥ 0.9 (mean and spread), one at p = 0.5. At p = 0.999 only
``extreme_methods`` run (DAREx-q with the grid and the analytic q, magnitude, WANDA): DARE's ×1000 rescale is
meaningless once it has collapsed, and structural pruning keeps round(0.001 · 384) = 0 rows of every MiniLM matrix.

What is pruned: every tensor of the encoder, embeddings included, but not the classifier head
(``exclude=("classifier.*",)``), as in DARE's reference code for BERT-style classifiers
(``mask_model_weights(..., exclude_param_names_regex=[".*classifier.*"])``), which DAREx builds on. The head
starts from a random draw, so its "delta" is the whole head. The delta engine itself prunes every shared
tensor unless told otherwise.

The model is loaded once per fine-tune and kept in memory; the masked delta is built once per (p, seed) and
only rescaled per q candidate (:class:`~lifelong_delta.studies.prune_eval_masks.RescaledDelta`); evaluation runs
under ``torch.inference_mode`` on pre-tokenised, length-sorted batches.

Budget: the default study is 640 evaluations. MiniLM forwards ~21 MFLOP per token, about 1 500 token positions/s
on one thread here, so the test sets are subsampled (96 stratified examples per task, the same for every method)
and the q grids (24 validation examples, 4 + 1 candidates; 4 η candidates for the analytic q) and calibration sets
(16 inputs) are capped: about 2.3 M token positions. The fine-tunes are spread over ``jobs`` worker processes of
one torch thread each (one per core by default): on 2 free cores, two one-thread processes forward 3 070
positions/s against 2 720 for one two-thread process and 1 590 for one thread. ``results/prune_eval/summary.md``
records the wall time. ``max_test=None`` evaluates the whole test splits (~7x longer).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lifelong_delta import outputs
from lifelong_delta.delta.analytic_q import Arithmetic
from lifelong_delta.repro import repro_command
from lifelong_delta.studies.prune_eval_plan import (
    EXTREME_METHODS,
    METHODS,
    Cell,
    StudyPlan,
    makespan,
    plan_cells,
    plan_study,
    unit_costs,
)
from lifelong_delta.studies.prune_eval_run import ETA_GRID, FinetuneRun, Settings
from lifelong_delta.text.finetune import RECIPES, STUDY_RECIPES

__all__ = ["FINETUNES", "METHODS", "Cell", "plan_cells", "prune_eval"]

DEFAULT_CACHE_DIR = "~/.cache/lifelong_delta/finetunes"
FINETUNES: tuple[str, ...] = STUDY_RECIPES


def _check(args: dict[str, Any], s: Settings) -> None:
    """Raise a ``ValueError`` naming the first option of :func:`prune_eval` that cannot run, before any work: the
    choices, drop rates, seeds, settings, threads, jobs and backbone, then that ``out`` and ``cache_dir`` can be
    created."""
    from lifelong_delta.text.backbones import get_backbone
    from lifelong_delta.text.data import TASKS

    for option, allowed in (
        ("tasks", TASKS),
        ("finetunes", tuple(RECIPES)),
        ("methods", METHODS),
        ("lora_methods", METHODS),
        ("extreme_methods", METHODS),
    ):
        values = args[option]
        if option == "extreme_methods" and not values:
            continue
        if not values:
            raise ValueError(f"{option}: give at least one of {', '.join(allowed)}")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{option}: {bad[0]!r} is not one of {', '.join(sorted(allowed))}")
    ps, seeds = args["ps"], args["seeds"]
    if not ps or any(isinstance(p, bool) or not 0.0 < float(p) < 1.0 for p in ps):
        raise ValueError(f"ps: drop rates must be in (0, 1), got {list(ps)}")
    if not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: give distinct integer mask seeds, got {list(seeds)}")
    if args["low_p_seeds"] < 1:
        raise ValueError(f"low_p_seeds must be >= 1, got {args['low_p_seeds']}")
    _check_settings(s)
    if args["threads"] is not None and args["threads"] < 1:
        raise ValueError(f"threads must be >= 1 or None, got {args['threads']}")
    if args["jobs"] is not None and args["jobs"] < 1:
        raise ValueError(f"jobs must be >= 1 or None (one per core), got {args['jobs']}")
    get_backbone(args["backbone"])
    outputs.check_can_create(args["out"], option="--out")  # before hours of work, not after
    outputs.check_can_create(args["cache_dir"], option="--cache_dir")


def _check_settings(s: Settings) -> None:
    """Raise a ``ValueError`` naming the first of the evaluation settings ``s`` that is out of range."""
    for option in ("max_val", "n_calib", "batch_size"):
        if getattr(s, option) < 1:
            raise ValueError(f"{option} must be >= 1, got {getattr(s, option)}")
    if s.max_test is not None and s.max_test < 1:
        raise ValueError(f"max_test must be >= 1 or None (the whole test split), got {s.max_test}")
    if not s.etas or not all(math.isfinite(e) and e > 0 for e in s.etas):
        raise ValueError(f"etas must be one or more finite η > 0, got {list(s.etas)}")
    if not (math.isfinite(s.analytic_tie_rtol) and 0 <= s.analytic_tie_rtol < 1):
        raise ValueError(f"analytic_tie_rtol must be in [0, 1), got {s.analytic_tie_rtol}")
    if s.q_grid_size < 2 or s.q_fine_steps < 0:
        raise ValueError(f"q_grid_size must be >= 2 and q_fine_steps >= 0, got {s.q_grid_size}, {s.q_fine_steps}")


def _ensure_finetunes(cache_dir: str, tasks: Sequence[str], finetunes: Sequence[str], backbone: str) -> None:
    from lifelong_delta.text.finetune import all_finetunes, finetune_dir

    missing = [
        (t, f)
        for t in tasks
        for f in finetunes
        if not (finetune_dir(t, f, cache_dir, backbone=backbone) / "finetune.json").is_file()
    ]
    if not missing:
        return
    where = finetune_dir(missing[0][0], "base", cache_dir, backbone=backbone).parent.parent
    print(
        f"{len(missing)} fine-tune(s) not cached in {where}: "
        f"{', '.join(f'{t}/{f}' for t, f in missing)}; fine-tuning them first",
        flush=True,
    )
    all_finetunes(
        cache_dir,
        tasks=sorted({t for t, _ in missing}),
        recipes=[f for f in finetunes if f in {m for _, m in missing}],
        backbone=backbone,
    )


def prune_eval(
    cache_dir: str = DEFAULT_CACHE_DIR,
    out: str = "results/prune_eval",
    tasks: Sequence[str] = ("trec", "vader"),
    finetunes: Sequence[str] = FINETUNES,
    methods: Sequence[str] = METHODS,
    ps: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.999),
    seeds: Sequence[int] = (0, 1, 2),
    max_test: int | None = 96,
    max_val: int = 24,
    n_calib: int = 16,
    q_grid_size: int = 4,
    q_fine_steps: int = 1,
    etas: Sequence[float] = ETA_GRID,
    analytic_arithmetic: Arithmetic = "float16",
    analytic_tie_rtol: float = 0.0,
    low_p_seeds: int = 1,
    lora_methods: Sequence[str] = METHODS,
    extreme_methods: Sequence[str] = EXTREME_METHODS,
    exclude: Sequence[str] = ("classifier.*",),
    batch_size: int = 32,
    threads: int | None = 1,
    jobs: int | None = None,
    progress: bool = True,
    backbone: str = "minilm",
) -> dict[str, str]:
    """Prune every cached fine-tune every way, evaluate test accuracy, and write a CSV, a summary and a plot.

    Missing fine-tunes are trained first (``lifelong_delta.text.finetune.all_finetunes``, which prints how
    long that takes). Outputs, each written atomically: ``results.csv``
    (``task,finetune,method,p,seed,accuracy``), ``q_choices.csv`` (the q each DAREx-q mode and structural
    pruning chose), ``recommend.csv`` (what ``lifelong-delta recommend`` picks per fine-tune and p),
    ``summary.md`` and ``accuracy_vs_p.png``.

    Args:
        cache_dir: root of the fine-tune cache (``<cache_dir>/<task>/<recipe>``, ``<task>/base``; a backbone's
            ``cache_subdir`` goes between, MPNet's ``<cache_dir>/mpnet/<task>/<recipe>``).
        out: output directory.
        tasks: ``trec`` and/or ``vader``.
        finetunes: recipes to evaluate (``adamw``, ``adamr-l2``, ``adamr-l1``, ``adamw-large``, ``lora``).
        methods: subset of :data:`METHODS`.
        ps: drop rates in (0, 1).
        seeds: mask seeds; every random method runs all of them at p >= 0.9.
        max_test: stratified subsample of each test split (None: the whole split), the same for every method.
        max_val: validation examples (stratified) for the DAREx-q / structural q grid.
        n_calib: unlabelled training inputs for WANDA's norms, the analytic and the unlabelled q.
        q_grid_size: coarse q candidates, geometric in [1 − p, 1] (end points included).
        q_fine_steps: fine candidates between the best coarse q's neighbours.
        etas: candidates for the analytic q's free parameter η, chosen per cell on the validation examples.
        analytic_arithmetic: float16 (the authors' code) or float64 (the exact bound), see
            :func:`lifelong_delta.delta.analytic_q.analytic_row_q`.
        analytic_tie_rtol: relative tie tolerance of the analytic q's scan (0: exact comparisons).
        low_p_seeds: seeds (the first ones) for the random methods at p < 0.9.
        lora_methods: the methods run on the LoRA fine-tune's delta B·A (default: every method).
        extreme_methods: the methods run at p >= 0.999 (where DARE's ×1000 rescale and structural pruning's
            round(0.001 · 384) = 0 kept rows are degenerate).
        exclude: glob patterns of tensors left unpruned.
        batch_size: examples per forward pass (length-sorted; 32 wastes ~10 % on padding, 256 about half).
        threads: torch intra-op threads for the run (None: leave torch's setting, one per core). Default 1:
            MiniLM's matrices on ~20-token batches are too small for intra-op parallelism to pay, and on a 2-core
            machine that other jobs keep busy, 2 threads measured 470 token positions/s against 1 500 for one
            thread (OpenMP waits for the thread that is descheduled).
        jobs: worker processes, each evaluating whole fine-tunes with ``threads`` threads (None: one per core,
            at most one per fine-tune). The rows do not depend on it: every fine-tune's evaluation is
            deterministic and independent of the others.
        progress: show progress (a bar on a terminal, a line every 10 s elsewhere).
        backbone: the encoder whose fine-tunes are pruned, ``minilm`` or ``mpnet`` (MPNet-base, 110 M
            parameters: fine-tunes ~5x and evaluations ~8x MiniLM's time), a key of
            :data:`~lifelong_delta.text.backbones.BACKBONES`.

    Returns:
        ``{"results": path, "summary": path, "plot": path, "q_choices": path, "recommend": path}``.
    """
    args = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in locals().items()}
    args["ps"] = [float(p) for p in ps]
    s = Settings(
        max_test=max_test,
        max_val=max_val,
        n_calib=n_calib,
        q_grid_size=q_grid_size,
        q_fine_steps=q_fine_steps,
        etas=tuple(float(e) for e in etas),
        analytic_arithmetic=analytic_arithmetic,
        analytic_tie_rtol=float(analytic_tie_rtol),
        exclude=tuple(exclude),
        batch_size=batch_size,
    )
    _check(args, s)
    start = time.perf_counter()
    # with torch's own thread count, as `lifelong-delta finetune` runs them: a fine-tune's weights depend on it
    _ensure_finetunes(args["cache_dir"], args["tasks"], args["finetunes"], backbone)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads or torch_threads)
    try:
        return _run(args, s, start)
    finally:
        torch.set_num_threads(torch_threads)


def _run(args: dict[str, Any], s: Settings, start: float) -> dict[str, str]:
    """The study of :func:`prune_eval` with validated, normalised arguments."""
    from lifelong_delta.progress import Progress
    from lifelong_delta.studies.prune_eval_report import write_outputs

    plan = plan_study(args, s)
    units, ps, first = plan.units, args["ps"], args["finetunes"][0]
    unit_cost = unit_costs(plan)
    jobs = max(1, min(args["jobs"] or os.cpu_count() or 1, len(units)))
    sizes = ", ".join(
        f"{t} test {plan.splits[t, first].test.n} of {plan.splits[t, first].test_full}" for t in args["tasks"]
    )
    print(
        f"prune-eval: {len(plan.cells)} evaluations of {len(plan.dirs)} fine-tunes ({sizes}) in {jobs} process(es); "
        f"about {makespan(list(unit_cost.values()), jobs) / 60:.0f} minutes at this machine's current speed",
        flush=True,
    )
    with Progress("prune-eval", len(plan.cells), unit="evals", enabled=args["progress"]) as bar:
        bar.update(0, detail=f"{units[0][0]}/{units[0][1]}")  # a first line before the first fine-tune loads
        if jobs == 1:  # one fine-tune in memory at a time
            results = {u: _unit_outputs(plan.load(u), plan.unit_cells[u], ps, bar) for u in units}
        else:
            results = _run_parallel(plan, unit_cost, ps, jobs, bar)
    rows = [r for u in units for r in results[u][0]]
    qrows = [r for u in units for r in results[u][1]]
    recs = [r for u in units for r in results[u][2]]
    wall = time.perf_counter() - start
    meta = _meta(args, plan, jobs, wall, [results[u][3] for u in units])
    paths = write_outputs(Path(os.path.expanduser(args["out"])), rows, qrows, recs, meta)
    print(f"prune-eval finished in {wall / 60:.1f} min: " + ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return paths


def _meta(
    args: dict[str, Any], plan: StudyPlan, jobs: int, wall: float, finetune_info: list[dict[str, Any]]
) -> dict[str, Any]:
    """``meta.json``: the command that repeats the study, its options and settings, threads and jobs, the size of
    each task's splits and each fine-tune's numbers."""
    first = args["finetunes"][0]
    return {
        "command": repro_command("lifelong-delta prune-eval", prune_eval, args, skip=("progress", "jobs")),
        "wall_time_s": round(wall, 1),
        **{
            k: args[k]
            for k in (
                "tasks",
                "finetunes",
                "methods",
                "ps",
                "seeds",
                "low_p_seeds",
                "lora_methods",
                "extreme_methods",
                "cache_dir",
                "backbone",
            )
        },
        "settings": plan.settings.as_dict(),
        "threads": torch.get_num_threads(),
        "jobs": jobs,
        "splits": {
            t: {
                "test": plan.splits[t, first].test.n,
                "test_full": plan.splits[t, first].test_full,
                "val": plan.splits[t, first].val.n,
                "calib": plan.splits[t, first].calib.n,
                "majority": plan.splits[t, first].majority,
            }
            for t in args["tasks"]
        },
        "finetunes_info": finetune_info,
    }


def _unit_outputs(run: FinetuneRun, cells: Sequence[Cell], ps: Sequence[float], bar: Any) -> tuple:
    result = run.evaluate(cells, ps, bar)
    return result.rows, result.q_rows, result.recommendations(ps), result.info


def _worker(
    unit: tuple[str, str],
    cells: list[Cell],
    ft_dir: Path,
    base_dir: Path,
    splits: Any,
    s: Settings,
    ps: list[float],
    bar: Any,
) -> tuple:
    """One fine-tune of the study, in a worker process of :func:`~lifelong_delta.progress.run_spawned`."""
    run = FinetuneRun(*unit, ft_dir, base_dir, splits, s)
    return _unit_outputs(run, cells, ps, bar)


def _run_parallel(
    plan: StudyPlan, unit_cost: dict[tuple[str, str], float], ps: list[float], jobs: int, bar: Any
) -> dict[tuple[str, str], tuple]:
    """The fine-tunes spread over ``jobs`` spawned processes, longest first; results keyed by fine-tune.

    Each fine-tune's evaluation is deterministic and independent of the others, so the rows equal those of one
    process.
    """
    from lifelong_delta.progress import run_spawned

    order = sorted(plan.units, key=lambda u: -unit_cost[u])
    calls = [
        (u, plan.unit_cells[u], plan.dirs[u], plan.base_dirs[u[0]], plan.splits[u], plan.settings, ps) for u in order
    ]
    return dict(zip(order, run_spawned(_worker, calls, jobs, bar)))
