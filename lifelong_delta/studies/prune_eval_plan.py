"""What the ``prune_eval`` study evaluates: its cells (task, fine-tune, method, p, seed), the fine-tunes they
belong to with their data splits, and the time each fine-tune is expected to take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifelong_delta.delta.methods import METHODS as PRUNE_METHODS
from lifelong_delta.studies.prune_eval_data import TaskSplits, finetune_hparams, task_splits
from lifelong_delta.studies.prune_eval_report import METHOD_ORDER
from lifelong_delta.studies.prune_eval_run import FinetuneRun, Settings, cell_cost

__all__ = ["EXTREME_METHODS", "METHODS", "Cell", "StudyPlan", "makespan", "plan_cells", "plan_study", "unit_costs"]

#: Every method of the study, ``unpruned`` first.
METHODS: tuple[str, ...] = ("unpruned", *METHOD_ORDER)
#: Deterministic methods (their registry rows are not ``seeded``): one row per p, with the first seed.
SEEDLESS = frozenset({"unpruned", *(m for m in METHOD_ORDER if m in PRUNE_METHODS and not PRUNE_METHODS[m].seeded)})
EXTREME_P = 0.999
#: the methods run at p >= EXTREME_P by default
EXTREME_METHODS: tuple[str, ...] = ("darex-q-grid", "darex-q-analytic", "magnitude", "wanda")
HIGH_P = 0.9  # from here on every random method runs every seed


@dataclass(frozen=True)
class Cell:
    """One row of ``results.csv``: the accuracy of ``method`` at drop rate ``p`` with mask seed ``seed``."""

    task: str
    finetune: str
    method: str
    p: float
    seed: int


def plan_cells(
    tasks: Sequence[str],
    finetunes: Sequence[str],
    methods: Sequence[str],
    ps: Sequence[float],
    seeds: Sequence[int],
    low_p_seeds: int = 1,
    lora_methods: Sequence[str] = METHODS,
    extreme_methods: Sequence[str] = EXTREME_METHODS,
) -> list[Cell]:
    """Every (task, fine-tune, method, p, seed) the study evaluates, in evaluation order.

    ``unpruned`` has ``p = 0`` and the first seed; ``magnitude``/``wanda`` one row per p with the first seed;
    the random methods run ``seeds[:low_p_seeds]`` at ``p < 0.9`` and every seed at ``p >= 0.9``. The LoRA
    fine-tune runs ``methods ∩ lora_methods``; drop rates ``p >= 0.999`` run only ``extreme_methods``.
    """
    cells = []
    for task in tasks:
        for ft in finetunes:
            allowed = [m for m in methods if ft != "lora" or m in lora_methods]
            if "unpruned" in allowed:
                cells.append(Cell(task, ft, "unpruned", 0.0, seeds[0]))
            for p in sorted(ps):
                for m in allowed:
                    if m == "unpruned" or (p >= EXTREME_P and m not in extreme_methods):
                        continue
                    use = seeds[:1] if m in SEEDLESS else seeds if p >= HIGH_P else seeds[:low_p_seeds]
                    cells.extend(Cell(task, ft, m, p, s) for s in use)
    return cells


@dataclass(frozen=True)
class StudyPlan:
    """What the study evaluates: its fine-tunes (``units``, (task, recipe) pairs), their directories and data
    splits, and the cells of each."""

    units: list[tuple[str, str]]
    dirs: dict[tuple[str, str], Path]
    base_dirs: dict[str, Path]
    splits: dict[tuple[str, str], TaskSplits]
    cells: list[Cell]
    unit_cells: dict[tuple[str, str], list[Cell]]
    settings: Settings

    def load(self, unit: tuple[str, str]) -> FinetuneRun:
        """The fine-tune ``unit`` and its base, loaded for evaluation."""
        return FinetuneRun(*unit, self.dirs[unit], self.base_dirs[unit[0]], self.splits[unit], self.settings)


def plan_study(args: dict[str, Any], s: Settings) -> StudyPlan:
    """The plan of :func:`~lifelong_delta.studies.prune_eval.prune_eval` from its normalised arguments (reads each
    fine-tune's hyper-parameters)."""
    from lifelong_delta.text.finetune import finetune_dir

    tasks, finetunes, cache_dir, backbone = args["tasks"], args["finetunes"], args["cache_dir"], args["backbone"]
    dirs = {(t, f): finetune_dir(t, f, cache_dir, backbone=backbone) for t in tasks for f in finetunes}
    splits = {
        k: task_splits(finetune_hparams(d), s.max_test, s.max_val, s.n_calib, s.batch_size) for k, d in dirs.items()
    }
    cells = plan_cells(
        tasks,
        finetunes,
        args["methods"],
        args["ps"],
        args["seeds"],
        args["low_p_seeds"],
        args["lora_methods"],
        args["extreme_methods"],
    )
    units = [(t, f) for t in tasks for f in finetunes]
    return StudyPlan(
        units=units,
        dirs=dirs,
        base_dirs={t: finetune_dir(t, "base", cache_dir, backbone=backbone) for t in tasks},
        splits=splits,
        cells=cells,
        unit_cells={u: [c for c in cells if (c.task, c.finetune) == u] for u in units},
        settings=s,
    )


def unit_costs(plan: StudyPlan) -> dict[tuple[str, str], float]:
    """Estimated seconds per fine-tune: its cells' token positions and delta rewrites at the speed measured on the
    first fine-tune, plus 5 s to load it."""
    per_token, per_rewrite = plan.load(plan.units[0]).probe_speed()  # the probe's model is freed right after
    unit_cost = {}
    for u in plan.units:
        costs = [cell_cost(c.method, c.p, plan.splits[u], plan.settings) for c in plan.unit_cells[u]]
        tokens, rewrites = sum(c[0] for c in costs), sum(c[1] for c in costs)
        unit_cost[u] = tokens * per_token + rewrites * per_rewrite + 5.0
    return unit_cost


def makespan(costs: Sequence[float], jobs: int) -> float:
    """Wall time of running jobs of ``costs`` longest first on ``jobs`` workers (the ETA of the study)."""
    loads = [0.0] * jobs
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)
