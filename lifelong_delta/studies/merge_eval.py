"""``make merge-eval``: merge the TREC and VADER MiniLM fine-tunes every way ``lifelong-delta merge`` can; measure
each task's test accuracy with its own classifier head.

Methods and papers: :mod:`lifelong_delta.delta.merge` (task arithmetic, TIES, DARE-linear, DARE-TIES, DAREx-q).

For each recipe (``adamw`` and ``adamr-l2`` by default: the fine-tunes of :mod:`lifelong_delta.text.finetune`, one
per task, all started from the same pretrained MiniLM; AdamR-L2's deltas are the small ones of DAREx-L2) the study

1. reads the base ``θ_pre`` (the encoder of ``<task>/base``; every task's base must hold the same encoder) and each
   task's fine-tune;
2. merges the encoders in memory, a tensor at a time, with :func:`~lifelong_delta.delta.merge.merge_tensor`, the
   function the streaming ``lifelong-delta merge`` command applies to chunks: every method at every density
   (task arithmetic at density 1 only), weights 1 each, ``λ = 1``, each method's default ``normalize`` (TIES and
   DARE-TIES divide by the agreeing weights), DARE mask seeds ``seed + i`` for model ``i``. The classifier heads
   (``classifier.*``) are not merged: they are task-specific (``--exclude 'classifier.*'``);
3. evaluates task ``T`` with the merged encoder and ``T``'s own head (from ``T``'s fine-tune), on the same stratified
   test subsample for every row;
4. adds reference rows: the base encoder with each task's head (``base``), and each fine-tune's encoder with every
   task's head (``finetune-<task>``: its own task is the accuracy a merge tries to keep, the other shows how far
   one task's encoder carries the other's head).

DARE's mask at density 1 keeps every entry, so the random methods run one seed there (the other seeds would give the
same model). :func:`merge_encoder` is bit for bit what ``lifelong-delta merge`` writes for the same inputs (a test
holds that line), so the accuracies are those of the command's outputs.

Outputs (:mod:`.merge_eval_report`): ``results.csv``, ``summary.md``, ``accuracy_vs_density.png``, ``meta.json``.
``bench/merge_vs_mergekit.py`` runs the same merges as whole commands, ``lifelong-delta merge`` against
``mergekit-yaml``, and compares accuracy and time.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lifelong_delta import outputs
from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.merge import MERGE_METHODS, MergeSpec, merge_tensor
from lifelong_delta.repro import repro_command
from lifelong_delta.studies.prune_eval_data import TaskSplits, accuracy, finetune_hparams, task_splits

__all__ = [
    "DENSITIES",
    "METHODS",
    "MergeCell",
    "RecipeRun",
    "encoder_checkpoint",
    "merge_encoder",
    "merge_eval",
    "plan_merges",
    "spec_of",
]

DEFAULT_CACHE_DIR = "~/.cache/lifelong_delta/finetunes"
METHODS: tuple[str, ...] = tuple(MERGE_METHODS)
DENSITIES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
HEAD = ("classifier.*",)


@dataclass(frozen=True)
class MergeCell:
    """One merge of the study: ``method`` at ``density`` with mask seed ``seed``, of the fine-tunes of ``recipe``."""

    recipe: str
    method: str
    density: float
    seed: int


def _random(method: str) -> bool:
    return MERGE_METHODS[method].sparsify == "random"


def plan_merges(
    recipes: Sequence[str], methods: Sequence[str], densities: Sequence[float], seeds: Sequence[int]
) -> list[MergeCell]:
    """Every merge the study evaluates, in order.

    Task arithmetic runs once (density 1; it keeps every entry); TIES once per density (deterministic); the DARE
    merges once per density and seed, except at density 1, where the mask keeps everything: one seed.
    """
    cells = []
    for recipe in recipes:
        for m in methods:
            for d in [1.0] if MERGE_METHODS[m].sparsify == "none" else sorted(densities):
                use = seeds if _random(m) and d < 1.0 else seeds[:1]
                cells.extend(MergeCell(recipe, m, float(d), s) for s in use)
    return cells


def spec_of(cell: MergeCell, n_models: int) -> MergeSpec:
    """The :class:`MergeSpec` of ``cell`` for ``n_models`` fine-tunes: weights 1, ``λ = 1``, default normalize."""
    density = None if MERGE_METHODS[cell.method].sparsify == "none" else (cell.density,)
    return MergeSpec(cell.method, (1.0,) * n_models, density=density, seed=cell.seed)  # type: ignore[arg-type]


@torch.no_grad()
def merge_encoder(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], spec: MergeSpec, names: Sequence[str]
) -> dict[str, Tensor]:
    """The merged tensors ``names`` in memory, one whole tensor at a time (what ``lifelong-delta merge`` streams).

    Args:
        base: ``θ_pre`` by tensor name.
        finetuned: ``θ_i`` by tensor name, one mapping per model, in merge order.
        spec: The merge.
        names: The tensors to merge (the DARE masks are keyed by these names, as in the command).

    Returns:
        ``{name: merged tensor}`` in the base's dtype.
    """
    return {n: merge_tensor(base[n], [f[n] for f in finetuned], spec, name=n) for n in names}


def encoder_names(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], exclude: Sequence[str] = HEAD
) -> list[str]:
    """The floating tensors of ``base`` not matched by ``exclude``; every fine-tune must have them, same shapes."""
    names = [n for n, t in base.items() if t.is_floating_point() and not is_excluded(n, exclude)]
    for i, f in enumerate(finetuned):
        bad = [n for n in names if n not in f or f[n].shape != base[n].shape]
        if bad:
            raise ValueError(f"fine-tune #{i + 1} lacks tensor {bad[0]!r} of the base or has another shape")
    return names


def encoder_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    head_from: str | os.PathLike[str],
    exclude: Sequence[str] = HEAD,
) -> Path:
    """Copy an HF classifier directory with its head replaced by ``head_from``'s: the inputs ``lifelong-delta
    merge`` and ``mergekit-yaml`` take when the fine-tunes' heads differ in shape (TREC has 6 classes, VADER 2).

    With one shared head in the base and in every fine-tune, the heads' deltas are zero, so a merge leaves the head
    as it is and merges exactly the encoders. (mergekit 0.1.5 cannot read a head-less ``BertModel`` folder: its
    alias lookup of the optional ``position_ids`` fails, so the inputs keep the ``BertForSequenceClassification``
    layout.) Tensor names are kept: the DARE masks are keyed by them.

    Args:
        src: the fine-tune (or base) directory whose encoder is copied, with its tokenizer files.
        out: the new directory.
        head_from: the directory whose ``exclude`` tensors (the head) and ``config.json`` are used.
        exclude: glob patterns of the head's tensors.

    Returns:
        ``out``.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    src, out, head_from = Path(src), Path(out), Path(head_from)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t for n, t in load_file(str(src / "model.safetensors")).items() if not is_excluded(n, exclude)}
    tensors.update(
        {n: t for n, t in load_file(str(head_from / "model.safetensors")).items() if is_excluded(n, exclude)}
    )
    save_file(
        {n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name not in ("finetune.json", "config.json"):
            shutil.copy(f, out / f.name)
    shutil.copy(head_from / "config.json", out / "config.json")
    return out


class RecipeRun:
    """The fine-tunes of one recipe loaded once: base and fine-tuned encoders, and one classifier per task.

    Args:
        recipe: the recipe's name.
        tasks: the tasks whose fine-tunes are merged, in merge order.
        base_dirs: each task's ``<task>/base`` directory (every one must hold the same encoder).
        ft_dirs: each task's fine-tune directory.
        splits: each task's evaluation sets.
        exclude: the task-specific tensors (the heads), never merged.
    """

    def __init__(
        self,
        recipe: str,
        tasks: Sequence[str],
        base_dirs: Mapping[str, Path],
        ft_dirs: Mapping[str, Path],
        splits: Mapping[str, TaskSplits],
        exclude: Sequence[str] = HEAD,
    ) -> None:
        from safetensors.torch import load_file

        from lifelong_delta.text.module import load_classifier

        self.recipe, self.tasks, self.splits = recipe, list(tasks), splits
        self.base = load_file(str(Path(base_dirs[tasks[0]]) / "model.safetensors"))
        self.finetuned = [load_file(str(Path(ft_dirs[t]) / "model.safetensors")) for t in tasks]
        self.names = encoder_names(self.base, self.finetuned, exclude)
        for t in tasks[1:]:
            other = load_file(str(Path(base_dirs[t]) / "model.safetensors"))
            differ = [n for n in self.names if n not in other or not torch.equal(other[n], self.base[n])]
            if differ:
                raise ValueError(
                    f"the bases of {tasks[0]} and {t} differ in {differ[0]!r}: a merge needs one "
                    f"pretrained encoder ({base_dirs[tasks[0]]}, {base_dirs[t]})"
                )
        self.models = {t: load_classifier(ft_dirs[t]).eval() for t in tasks}
        for t, model in self.models.items():
            missing = [n for n in self.names if n not in model.state_dict()]
            if missing:
                raise ValueError(f"{ft_dirs[t]}: the model has no parameter {missing[0]!r}")

    @torch.no_grad()
    def accuracies(self, encoder: Mapping[str, Tensor]) -> dict[str, float]:
        """Each task's test accuracy with ``encoder`` (``{name: tensor}`` of :attr:`names`) and the task's head."""
        out = {}
        for t, model in self.models.items():
            state = model.state_dict(keep_vars=True)
            for n in self.names:
                state[n].copy_(encoder[n])
            out[t] = accuracy(model, self.splits[t].test)
        return out

    def references(self) -> list[dict[str, Any]]:
        """The rows of the base encoder and of each unmerged fine-tune, with every task's head."""
        rows = []
        encoders = {"base": self.base, **{f"finetune-{t}": f for t, f in zip(self.tasks, self.finetuned)}}
        for label, enc in encoders.items():
            for t, acc in self.accuracies(enc).items():
                rows.append(
                    {
                        "recipe": self.recipe,
                        "method": label,
                        "density": "",
                        "seed": "",
                        "task": t,
                        "accuracy": acc,
                        "merge_s": "",
                    }
                )
        return rows

    def run(self, cells: Sequence[MergeCell], bar: Any = None) -> list[dict[str, Any]]:
        """Merge and evaluate ``cells`` (this recipe's), in order: two rows per cell, one per task."""
        rows = []
        for c in cells:
            start = time.perf_counter()
            merged = merge_encoder(self.base, self.finetuned, spec_of(c, len(self.tasks)), self.names)
            seconds = time.perf_counter() - start
            for t, acc in self.accuracies(merged).items():
                rows.append(
                    {
                        "recipe": c.recipe,
                        "method": c.method,
                        "density": c.density,
                        "seed": c.seed,
                        "task": t,
                        "accuracy": acc,
                        "merge_s": round(seconds, 3),
                    }
                )
            if bar is not None:
                bar.update(1, detail=f"{c.recipe} {c.method} density={c.density:g} seed={c.seed}")
        return rows


def _check(
    tasks: Sequence[str],
    recipes: Sequence[str],
    methods: Sequence[str],
    densities: Sequence[float],
    seeds: Sequence[int],
    max_test: int | None,
    jobs: int | None,
    threads: int | None,
) -> None:
    from lifelong_delta.text.data import TASKS
    from lifelong_delta.text.finetune import RECIPES

    for option, values, allowed in (
        ("tasks", tasks, TASKS),
        ("recipes", recipes, tuple(RECIPES)),
        ("methods", methods, METHODS),
    ):
        if not values:
            raise ValueError(f"{option}: give at least one of {', '.join(allowed)}")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{option}: {bad[0]!r} is not one of {', '.join(allowed)}")
        if len(set(values)) != len(values):
            raise ValueError(f"{option}: each value once, got {list(values)}")
    if "lora" in recipes:
        raise ValueError("recipes: lora fine-tunes merge their B·A deltas; this study merges full fine-tunes")
    if not densities or any(isinstance(d, bool) or not 0.0 < float(d) <= 1.0 for d in densities):
        raise ValueError(f"densities: kept fractions in (0, 1], got {list(densities)}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds: give distinct integer mask seeds, got {list(seeds)}")
    if max_test is not None and max_test < 1:
        raise ValueError(f"max_test must be >= 1 or None (the whole test split), got {max_test}")
    for option, value in (("jobs", jobs), ("threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1 or None, got {value}")


def merge_eval(
    cache_dir: str = DEFAULT_CACHE_DIR,
    out: str = "results/merge_eval",
    tasks: Sequence[str] = ("trec", "vader"),
    recipes: Sequence[str] = ("adamw", "adamr-l2"),
    methods: Sequence[str] = METHODS,
    densities: Sequence[float] = DENSITIES,
    seeds: Sequence[int] = (0, 1, 2),
    max_test: int | None = 256,
    batch_size: int = 32,
    threads: int | None = 1,
    jobs: int | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Merge the tasks' fine-tunes every way, evaluate each task with its own head, and write a CSV, a summary and
    a plot.

    Missing fine-tunes are trained first (``lifelong-delta finetune``). Outputs, each written atomically:
    ``results.csv`` (``recipe,method,density,seed,task,accuracy,merge_s``), ``summary.md``,
    ``accuracy_vs_density.png`` and ``meta.json``.

    Args:
        cache_dir: root of the fine-tune cache (``<cache_dir>/<task>/<recipe>``, ``<task>/base``).
        out: output directory.
        tasks: the tasks whose fine-tunes are merged (model i of a merge is the i-th task's fine-tune).
        recipes: fine-tune recipes, each merged on its own (``adamw``, ``adamr-l2``, ``adamw-large``, ...: any full
            fine-tune, not ``lora``).
        methods: merge methods (task-arithmetic, ties, dare-linear, dare-ties, darex-q).
        densities: kept fractions in (0, 1]; task arithmetic runs at 1 only.
        seeds: mask seeds of the DARE merges (model i draws seed + i).
        max_test: stratified subsample of each test split (None: the whole split), the same for every row.
        batch_size: examples per forward pass.
        threads: torch threads per process (None: torch's default). One thread per process is fastest for
            MiniLM's small batches on a shared 2-core machine (see ``prune-eval``).
        jobs: worker processes (None: one per core); each holds one recipe's models and evaluates a share of its
            merges. The rows do not depend on it.
        progress: show progress (a bar on a terminal, a line every 10 s elsewhere).

    Returns:
        ``{"results": path, "summary": path, "plot": path, "meta": path}``.
    """
    args = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in locals().items()}
    args["densities"] = [float(d) for d in densities]
    _check(tasks, recipes, methods, densities, seeds, max_test, jobs, threads)
    outputs.check_can_create(out, option="--out")
    start = time.perf_counter()
    _ensure_finetunes(cache_dir, tasks, recipes)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        return _run(args, start)
    finally:
        torch.set_num_threads(saved)


def _ensure_finetunes(cache_dir: str, tasks: Sequence[str], recipes: Sequence[str]) -> None:
    from lifelong_delta.text.finetune import all_finetunes, finetune_dir

    missing = [
        r for r in recipes if any(not (finetune_dir(t, r, cache_dir) / "finetune.json").is_file() for t in tasks)
    ]
    if missing:
        print(
            f"fine-tunes of {', '.join(missing)} are not all cached in {cache_dir}; fine-tuning them first", flush=True
        )
        all_finetunes(cache_dir, tasks=list(tasks), recipes=missing)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Unit:
    """A share of one recipe's merges, for one process: ``cells[k::shares]`` and, in share 0, the references."""

    recipe: str
    share: int
    tasks: tuple[str, ...]
    base_dirs: dict[str, Path]
    ft_dirs: dict[str, Path]
    splits: dict[str, TaskSplits]
    cells: tuple[MergeCell, ...]


def _do_unit(u: _Unit, bar: Any) -> list[dict[str, Any]]:
    run = RecipeRun(u.recipe, u.tasks, u.base_dirs, u.ft_dirs, u.splits)
    rows = run.references() if u.share == 0 else []
    return rows + run.run(u.cells, bar)


def _run_units(units: Sequence[_Unit], jobs: int, bar: Any) -> list[list[dict[str, Any]]]:
    """Every unit's rows, in unit order; in ``jobs`` spawned processes (here when ``jobs`` is 1)."""
    if jobs == 1:
        return [_do_unit(u, bar) for u in units]
    from lifelong_delta.progress import run_spawned

    return run_spawned(_do_unit, [(u,) for u in units], jobs, bar)


def _run(args: dict[str, Any], start: float) -> dict[str, str]:
    """The study of :func:`merge_eval` with checked arguments."""
    from lifelong_delta.progress import Progress
    from lifelong_delta.studies.merge_eval_report import write_outputs
    from lifelong_delta.text.finetune import finetune_dir

    tasks, recipes, cache = tuple(args["tasks"]), args["recipes"], args["cache_dir"]
    base_dirs = {t: finetune_dir(t, "base", cache) for t in tasks}
    splits = {
        t: task_splits(finetune_hparams(finetune_dir(t, recipes[0], cache)), args["max_test"], 1, 1, args["batch_size"])
        for t in tasks
    }
    cells = plan_merges(recipes, args["methods"], args["densities"], args["seeds"])
    jobs = max(1, args["jobs"] or os.cpu_count() or 1)
    shares = max(1, jobs // len(recipes))
    units = []
    for r in recipes:
        mine = [c for c in cells if c.recipe == r]
        units += [
            _Unit(r, k, tasks, base_dirs, {t: finetune_dir(t, r, cache) for t in tasks}, splits, tuple(mine[k::shares]))
            for k in range(min(shares, max(len(mine), 1)))
        ]
    jobs = min(jobs, len(units))
    sizes = ", ".join(f"{t} test {splits[t].test.n} of {splits[t].test_full}" for t in tasks)
    print(
        f"merge-eval: {len(cells)} merges of {len(tasks)} fine-tunes x {len(recipes)} recipe(s), each evaluated on "
        f"{len(tasks)} task(s) ({sizes}), in {jobs} process(es)",
        flush=True,
    )
    with Progress("merge-eval", len(cells), unit="merges", enabled=args["progress"]) as bar:
        bar.update(0, detail=f"loading {recipes[0]}")
        per_unit = _run_units(units, jobs, bar)
    order = {(c.recipe, c.method, c.density, c.seed): i for i, c in enumerate(cells)}
    refs = [r for rows in per_unit for r in rows if r["density"] == ""]
    merged = sorted(
        (r for rows in per_unit for r in rows if r["density"] != ""),
        key=lambda r: (order[r["recipe"], r["method"], r["density"], r["seed"]], tasks.index(r["task"])),
    )
    refs.sort(key=lambda r: recipes.index(r["recipe"]))
    wall = time.perf_counter() - start
    meta = {
        "command": repro_command(
            "lifelong-delta merge-eval", merge_eval, args, skip=("progress", "jobs"), default="make merge-eval"
        ),
        "wall_time_s": round(wall, 1),
        **{k: args[k] for k in ("tasks", "recipes", "methods", "densities", "seeds", "max_test", "cache_dir")},
        "weights": 1.0,
        "lambda": 1.0,
        "exclude": list(HEAD),
        "normalize": {m: MERGE_METHODS[m].normalize for m in args["methods"]},
        "threads": torch.get_num_threads(),
        "jobs": jobs,
        "splits": {
            t: {"test": splits[t].test.n, "test_full": splits[t].test_full, "majority": splits[t].majority}
            for t in tasks
        },
        "merge_s_median": statistics.median(float(r["merge_s"]) for r in merged) if merged else math.nan,
    }
    paths = write_outputs(Path(os.path.expanduser(args["out"])), refs + merged, meta)
    print(f"merge-eval finished in {wall / 60:.1f} min: " + ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return paths
