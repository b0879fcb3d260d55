"""Real offline fine-tunes of a text encoder, cached as Hugging Face directories for delta pruning (arXiv 2410.09344).

The encoder is a row of :data:`~lifelong_delta.text.backbones.BACKBONES`: MiniLM (the default) or MPNet-base.
Layout of the cache (default ``~/.cache/lifelong_delta/finetunes``; MPNet's under its ``mpnet/`` sub-folder)::

    <task>/base/        the pretrained encoder + the freshly initialised classifier head (seeded): θ_pre
    <task>/<recipe>/    a fine-tune started from <task>/base: θ_ft   (recipe-seed<k>/ for seed k != 0)
        config.json  model.safetensors  tokenizer files  finetune.json  logs/metrics.csv
        adapter/     (lora only) the PEFT adapter: adapter_config.json + adapter_model.safetensors

Why a ``base`` per task: the pretrained checkpoints have no classifier, and ``from_pretrained(num_labels=k)`` draws
the head (MiniLM's ``classifier``, MPNet's ``classifier.dense`` and ``classifier.out_proj``) at random. The base
directory stores that draw (torch seed ``seed``), and every recipe of the task starts from the base directory, so
``base`` and each fine-tune hold exactly the same tensor names and shapes and ``δ = θ_ft − θ_pre`` covers every
tensor. The head's delta is the whole trained head; leave it out of pruning with an exclude pattern such as
``classifier.*``. The LoRA directory's ``model.safetensors`` is the merged model (same tensors); its ``adapter/`` is
the LoRA delta B·A in PEFT format, with the fully trained classifier under ``modules_to_save``.

Every directory is written to a temporary sibling and renamed, so an interrupted run never leaves a half
model; a cached directory is reused (``force=True`` redoes it) unless it was made with other hyper-parameters,
which is a ``ValueError``. ``finetune.json`` records the recipe, hyper-parameters, validation / test accuracy,
the delta size and the wall time.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lifelong_delta import outputs
from lifelong_delta.text.backbones import get_backbone
from lifelong_delta.text.data import (
    DEFAULT_MAX_LENGTH,
    TASKS,
    TaskName,
    TextClassificationDataModule,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_TRAIN_CAP",
    "RECIPES",
    "STUDY_RECIPES",
    "Recipe",
    "all_finetunes",
    "base_model",
    "estimate_seconds",
    "finetune",
    "finetune_dir",
]

DEFAULT_CACHE_DIR = "~/.cache/lifelong_delta/finetunes"
RecipeName = Literal["adamw", "adamr-l2", "adamr-l1", "adamw-large", "lora", "adamr-l2-large"]
INFO_FILE = "finetune.json"


@dataclass(frozen=True)
class Recipe:
    """How one fine-tune is trained.

    Attributes:
        optimizer: ``adamw`` (``weight_decay=0``) or ``adamr`` (``lifelong_delta.optim.AdamR``).
        lr: peak learning rate (linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0).
        epochs: epochs per task.
        reg: AdamR's λ.
        variant: AdamR's ``l2`` or ``l1`` pull toward the base weights.
        lora_r: LoRA rank (0 = full fine-tuning); LoRA on the attention query and value (the backbone's
            ``lora_targets``), α = 2r, dropout 0.1.
        warmup_fraction: fraction of steps of linear warm-up.
        note: why the recipe exists.
    """

    optimizer: Literal["adamw", "adamr"]
    lr: float
    epochs: dict[str, int]
    reg: float = 0.0
    variant: Literal["l2", "l1"] = "l2"
    lora_r: int = 0
    warmup_fraction: float = 0.1
    note: str = ""


_EPOCHS = {"trec": 2, "vader": 1}
#: The five recipes of ``make prune-eval``. AdamR's λ keeps accuracy within ~1 point of AdamW; at these
#: settings the L2 pull caps a coordinate's delta near |m̂/√v̂|·√mean(v̂)/λ ≈ 3e-3·|m̂/√v̂|, and the L1 pull
#: pins coordinates whose normalised Adam step |m̂/√v̂| is below λ/√mean(v̂) ≈ 0.06 (√mean(v̂) ≈ 1.6e-4 for
#: MiniLM on TREC).
RECIPES: dict[str, Recipe] = {
    "adamw": Recipe("adamw", lr=1e-4, epochs=_EPOCHS, note="the standard fine-tune"),
    "adamr-l2": Recipe(
        "adamr",
        lr=1e-4,
        epochs=_EPOCHS,
        reg=0.05,
        variant="l2",
        note="DAREx-L2: decoupled L2 pull toward the base, small deltas",
    ),
    "adamr-l1": Recipe(
        "adamr",
        lr=1e-4,
        epochs=_EPOCHS,
        reg=1e-5,
        variant="l1",
        note="decoupled L1 pull toward the base, sparse deltas",
    ),
    "adamw-large": Recipe(
        "adamw",
        lr=4e-4,
        epochs=_EPOCHS,
        note="large deltas (4x the lr), where importance pruning should beat random drop",
    ),
    "lora": Recipe("adamw", lr=1e-3, epochs=_EPOCHS, lora_r=8, note="LoRA r=8 on query/value, classifier trained"),
    "adamr-l2-large": Recipe(
        "adamr",
        lr=4e-4,
        epochs=_EPOCHS,
        reg=0.05,
        variant="l2",
        note="AdamR-L2 at adamw-large's lr: does the pull keep a large-lr delta prunable?",
    ),
}
#: The recipes ``make finetune`` / ``make prune-eval`` train by default. ``adamr-l2-large`` is opt-in
#: (``make prune-eval-large``; docs/reproduction.md, finding 3).
STUDY_RECIPES: tuple[str, ...] = ("adamw", "adamr-l2", "adamr-l1", "adamw-large", "lora")
#: Default cap on the training split (stratified): VADER's 8 054 training snippets are cut to 4 000 to fit the
#: time budget (all ten fine-tunes took ~2.5 hours on a 2-core machine shared with other jobs, and about 20 minutes
#: at the free-machine speed below). Pass max_train_examples to change it.
DEFAULT_TRAIN_CAP: dict[str, int | None] = {"trec": None, "vader": 4000}

#: Seconds per training step at batch 32 on 2 free cores with torch's default 2 threads, from wall time / steps in
#: ``finetune.json`` (trec/adamw-large: 270 steps in 2.3 min, vader/adamw-large: 125 steps in 1.9 min, with loading
#: and evaluation). With 1 thread they are 1.6x, and on a machine shared with other jobs up to 6x, larger. LoRA
#: steps cost ~0.6 of these; other backbones ``Backbone.step_cost`` times these. ``all_finetunes`` re-estimates from
#: the measured speed after each fine-tune.
_SECONDS_PER_STEP = {"trec": 0.5, "vader": 0.85}
_LORA_STEP_FRACTION = 0.6


# ---------------------------------------------------------------------------------------------------- paths
def _root(cache_dir: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.fspath(cache_dir))).expanduser()


def finetune_dir(
    task: str,
    recipe: str,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    seed: int = 0,
    backbone: str = "minilm",
) -> Path:
    """``<cache_dir>/<task>/<recipe>`` (``<recipe>-seed<k>`` for seed k != 0; ``recipe="base"``: the base).

    A backbone with a ``cache_subdir`` (MPNet: ``mpnet``) puts it between ``<cache_dir>`` and ``<task>``.
    """
    name = recipe if seed == 0 else f"{recipe}-seed{seed}"
    return _root(cache_dir) / get_backbone(backbone).cache_subdir / task / name


def _check_task_recipe(task: str, recipe: str | None, backbone: str = "minilm") -> None:
    get_backbone(backbone)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)}, got {recipe!r}")


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


#: Hyper-parameters recorded only since a later version, with the value the directories written before had.
_ABSENT_MEANS: dict[str, Any] = {"backbone": "minilm"}


def _cached(path: Path, hparams: dict[str, Any], force: bool) -> bool:
    """True if ``path`` holds a finished directory made with ``hparams`` (ValueError if made with others)."""
    if force or not path.exists():
        return False
    info = _read_info(path)
    if info is None:
        raise ValueError(f"{path} exists but has no readable {INFO_FILE}; remove it or pass force=True")
    old = {**_ABSENT_MEANS, **info.get("hparams", {})}
    diff = {k: (old.get(k), v) for k, v in hparams.items() if old.get(k) != v}
    if diff:
        what = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in sorted(diff.items()))
        raise ValueError(f"{path} was made with {what}; pass force=True to redo it, or another cache_dir")
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _save_model(model: torch.nn.Module, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(directory))
    finally:
        hf_logging.enable_progress_bar()


def _save_tokenizer(directory: Path, backbone: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(get_backbone(backbone).locate())).save_pretrained(str(directory))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run info lines (GPU available..., seed set...): progress bars stay readable."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------- base
def base_model(
    task: TaskName = "trec",
    cache_dir: str = DEFAULT_CACHE_DIR,
    seed: int = 0,
    force: bool = False,
    backbone: str = "minilm",
) -> str:
    """Write (once) the base directory of a task: the pretrained encoder with a seeded, fresh classifier head.

    Args:
        task: ``trec`` or ``vader`` (sets the head width and the label names).
        cache_dir: root of the cache.
        seed: torch seed of the head initialisation.
        force: rewrite it even if cached.
        backbone: the pretrained encoder, a key of :data:`~lifelong_delta.text.backbones.BACKBONES`.

    Returns:
        The directory path.
    """
    _check_task_recipe(task, None, backbone)
    from lifelong_delta.text.module import load_classifier

    path = finetune_dir(task, "base", cache_dir, seed, backbone)
    label_names = list(TextClassificationDataModule(task).label_names)
    hparams = {"task": task, "seed": seed, "label_names": label_names, "backbone": backbone}
    if _cached(path, hparams, force):
        return str(path)
    pretrained = get_backbone(backbone).locate()
    with outputs.atomic_dir(path) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_classifier(pretrained, label_names=label_names)
        _save_model(model, tmp)
        _save_tokenizer(tmp, backbone)
        _write_json(
            tmp / INFO_FILE,
            {
                "recipe": "base",
                "hparams": hparams,
                "pretrained": str(pretrained),
                "note": f"pretrained {get_backbone(backbone).label} + classifier head initialised with "
                "torch.manual_seed(seed); every fine-tune of this task starts from this directory, so "
                "delta = finetuned - base covers every tensor",
            },
        )
    return str(path)


# -------------------------------------------------------------------------------------------------- fine-tune
def _epochs(task: str, recipe: str, backbone: str) -> int:
    """The epochs of a recipe on a task: the backbone's own budget if it has one, else the recipe's."""
    own = get_backbone(backbone).epochs
    return own[task] if own is not None else RECIPES[recipe].epochs[task]


def _train_cap(task: str, backbone: str) -> int | None:
    own = get_backbone(backbone).train_cap
    return own[task] if own is not None else DEFAULT_TRAIN_CAP[task]


def _hparams(
    task: str,
    recipe: str,
    seed: int,
    epochs: int | None,
    lr: float | None,
    reg: float | None,
    batch_size: int,
    max_length: int | None,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    backbone: str,
) -> dict[str, Any]:
    r = RECIPES[recipe]
    return {
        "backbone": backbone,
        "task": task,
        "recipe": recipe,
        "seed": seed,
        "split_seed": 0,
        "optimizer": r.optimizer,
        "lr": r.lr if lr is None else lr,
        "reg": r.reg if reg is None else reg,
        "variant": r.variant,
        "epochs": _epochs(task, recipe, backbone) if epochs is None else epochs,
        "batch_size": batch_size,
        "warmup_fraction": r.warmup_fraction,
        "schedule": "linear warm-up, linear decay to 0",
        "lora_r": r.lora_r,
        "lora_alpha": 2 * r.lora_r,
        "lora_dropout": 0.1 if r.lora_r else 0.0,
        "lora_target_modules": list(get_backbone(backbone).lora_targets) if r.lora_r else [],
        "max_length": max_length or DEFAULT_MAX_LENGTH[task],
        "max_train_examples": max_train_examples,
        "max_eval_examples": max_eval_examples,
        "unregularized": ["classifier.*"],
    }


def _optimizer_factory(h: dict[str, Any]) -> Any:
    if h["optimizer"] == "adamr":
        from lifelong_delta.optim import AdamR

        return functools.partial(AdamR, lr=h["lr"], reg=h["reg"], variant=h["variant"])
    return functools.partial(torch.optim.AdamW, lr=h["lr"], weight_decay=0.0)


@torch.no_grad()
def _delta_stats(base: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """Size of δ = θ_ft − θ_base over the encoder (every tensor but ``classifier.*``)."""
    sq, ab, n = 0.0, 0.0, 0
    for name, t in model.state_dict().items():
        if name.startswith("classifier.") or name not in base or not t.is_floating_point():
            continue
        d = t.float() - base[name].float()
        sq, ab, n = sq + float(d.square().sum()), ab + float(d.abs().sum()), n + d.numel()
    return {"delta_l2": math.sqrt(sq), "delta_abs_mean": ab / max(n, 1), "delta_numel": n}


def finetune(
    task: TaskName = "trec",
    recipe: RecipeName = "adamw",
    cache_dir: str = DEFAULT_CACHE_DIR,
    epochs: int | None = None,
    seed: int = 0,
    force: bool = False,
    lr: float | None = None,
    reg: float | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    backbone: str = "minilm",
) -> str:
    """Fine-tune a pretrained encoder on an offline task with a recipe, and cache it as a Hugging Face directory.

    Args:
        task: ``trec`` (6 question types) or ``vader`` (movie-snippet sentiment).
        recipe: ``adamw``, ``adamr-l2``, ``adamr-l1``, ``adamw-large`` or ``lora`` (see ``RECIPES``).
        cache_dir: root of the cache; the model goes to ``<cache_dir>/<task>/<recipe>``.
        epochs: override the recipe's epochs (or the backbone's, see ``Backbone.epochs``).
        seed: seed of the head initialisation (the base directory), dropout and shuffling. The splits are
            fixed.
        force: redo it even if cached.
        lr: override the recipe's peak learning rate.
        reg: override the recipe's AdamR λ.
        batch_size: training batch size.
        max_length: max tokens per text (default: 32 for trec, 48 for vader).
        max_train_examples: stratified cap on the training split; None = ``DEFAULT_TRAIN_CAP`` (4000 for
            vader), or the backbone's ``train_cap`` (MPNet: 2000 for each task).
        max_eval_examples: stratified cap on the validation and test splits.
        progress: show progress: Lightning's bar on a terminal, else a line every 10 s
            (:class:`~lifelong_delta.callbacks.ProgressLines`).
        callbacks: extra Lightning callbacks for the trainer (e.g. a step counter of an outer progress).
        backbone: the pretrained encoder, ``minilm`` or ``mpnet`` (see
            :data:`~lifelong_delta.text.backbones.BACKBONES`); its fine-tunes go to its ``cache_subdir``.

    Returns:
        The directory path. It is returned at once if cached with the same hyper-parameters.
    """
    _check_task_recipe(task, recipe, backbone)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if max_train_examples is None:
        max_train_examples = _train_cap(task, backbone)
    h = _hparams(
        task, recipe, seed, epochs, lr, reg, batch_size, max_length, max_train_examples, max_eval_examples, backbone
    )
    path = finetune_dir(task, recipe, cache_dir, seed, backbone)
    if _cached(path, h, force):
        print(f"cached: {path}")
        return str(path)

    base = base_model(task, cache_dir, seed, backbone=backbone)
    with outputs.atomic_dir(path) as tmp, _quiet_lightning():
        info, wall = _train(tmp, h, base, progress=progress, callbacks=callbacks)
        _write_json(tmp / INFO_FILE, info)
    # Lightning's trainer and the module refer to each other: free the model and its optimiser state now, not at
    # the next full collection, so that a loop of fine-tunes holds one at a time
    gc.collect()
    print(
        f"{task}/{recipe}: val_acc {info['val_acc']:.4f} test_acc {info['test_acc']:.4f} in {wall / 60:.1f} min "
        f"-> {path}"
    )
    return str(path)


def _train(
    tmp: Path, h: dict[str, Any], base: str, *, progress: bool, callbacks: Sequence[Any]
) -> tuple[dict[str, Any], float]:
    """Fine-tune ``base`` with the hyper-parameters ``h`` and save the model and tokenizer into ``tmp``.

    Returns:
        The fine-tune's record (validation and test accuracy, steps, threads, split sizes, delta size, versions)
        and the wall time in seconds.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from safetensors.torch import load_file

    from lifelong_delta.callbacks.progress_lines import ProgressLines
    from lifelong_delta.progress import is_terminal
    from lifelong_delta.text.module import SequenceClassifier

    start = time.perf_counter()
    L.seed_everything(h["seed"], verbose=False)
    dm = TextClassificationDataModule(
        h["task"],
        seed=0,
        shuffle_seed=h["seed"],
        max_length=h["max_length"],
        batch_size=h["batch_size"],
        max_train_examples=h["max_train_examples"],
        max_eval_examples=h["max_eval_examples"],
        tokenizer_dir=str(get_backbone(h["backbone"]).locate()),
    )
    r = RECIPES[h["recipe"]]
    module = SequenceClassifier(
        model_dir=base,
        optimizer=_optimizer_factory(h),
        warmup_fraction=r.warmup_fraction,
        lora_r=r.lora_r,
        lora_alpha=h["lora_alpha"],
        lora_dropout=h["lora_dropout"],
        lora_target_modules=h["lora_target_modules"] or None,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=h["epochs"],
        logger=CSVLogger(tmp, name="logs", version=""),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=progress and is_terminal(),  # not a terminal: ProgressLines prints lines
        callbacks=[*callbacks, *([ProgressLines()] if progress else [])],
        log_every_n_steps=max(1, min(10, len(dm.train_dataloader()))),
    )
    trainer.fit(module, datamodule=dm)
    val_acc = float(trainer.callback_metrics["val_acc"])
    test_acc = float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"])
    module.save_pretrained(tmp)
    _save_tokenizer(tmp, h["backbone"])
    wall = time.perf_counter() - start
    info = {
        "recipe": h["recipe"],
        "note": r.note,
        "hparams": h,
        "base": base,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "wall_time_s": round(wall, 1),
        "steps": int(trainer.global_step),
        "torch_threads": torch.get_num_threads(),  # the weights depend on it (CPU reductions)
        "n_examples": {k: len(v) for k, v in dm.datasets.items()},
        **_delta_stats(load_file(str(Path(base) / "model.safetensors")), module.merged_model()),
        "versions": _versions(),
    }
    return info, wall


def _versions() -> dict[str, str]:
    import lightning
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


# ---------------------------------------------------------------------------------------------------- all
def estimate_seconds(
    task: TaskName,
    recipe: RecipeName,
    epochs: int | None = None,
    batch_size: int = 32,
    max_train_examples: int | None = None,
    backbone: str = "minilm",
) -> float:
    """Rough wall time of one fine-tune on 2 cores (training steps + evaluation), in seconds."""
    _check_task_recipe(task, recipe, backbone)
    cap = _train_cap(task, backbone) if max_train_examples is None else max_train_examples
    dm = TextClassificationDataModule(task, max_train_examples=cap)
    sizes = {k: len(v) for k, v in dm.split_indices().items()}
    r = RECIPES[recipe]
    n_epochs = _epochs(task, recipe, backbone) if epochs is None else epochs
    per_step = (
        _SECONDS_PER_STEP[task]
        * batch_size
        / 32
        * get_backbone(backbone).step_cost
        * (_LORA_STEP_FRACTION if r.lora_r else 1.0)
    )
    steps = math.ceil(sizes["train"] / batch_size) * n_epochs
    evals = (sizes["val"] * n_epochs + sizes["test"]) / 32 * _SECONDS_PER_STEP[task] / 3  # forward only
    evals *= get_backbone(backbone).step_cost
    return steps * per_step + evals + 10.0  # + loading and saving


def all_finetunes(
    cache_dir: str = DEFAULT_CACHE_DIR,
    tasks: Sequence[TaskName] = TASKS,
    recipes: Sequence[RecipeName] = STUDY_RECIPES,
    epochs: int | None = None,
    seed: int = 0,
    force: bool = False,
    backbone: str = "minilm",
) -> list[str]:
    """Run every (task, recipe) fine-tune that is not cached, showing progress, and print a summary.

    Args:
        cache_dir: root of the cache.
        tasks: tasks to fine-tune on.
        recipes: recipes to run (see ``RECIPES``).
        epochs: override every recipe's epochs.
        seed: seed of the heads, dropout and shuffling.
        force: redo cached fine-tunes.
        backbone: the pretrained encoder, ``minilm`` or ``mpnet`` (MPNet-base: ~5x the time).

    Returns:
        The fine-tuned directories, in (task, recipe) order.
    """
    from lifelong_delta.progress import Progress

    for t in tasks:
        for r in recipes:
            _check_task_recipe(t, r, backbone)
    jobs = [(t, r) for t in tasks for r in recipes]
    pending = {(t, r) for t, r in jobs if force or _read_info(finetune_dir(t, r, cache_dir, seed, backbone)) is None}
    estimates = {job: estimate_seconds(*job, epochs=epochs, backbone=backbone) for job in pending}
    label = get_backbone(backbone).label
    print(
        f"fine-tuning {len(pending)} {label} models ({len(jobs) - len(pending)} cached), about "
        f"{sum(estimates.values()) / 60:.0f} minutes on 2 cores, into "
        f"{_root(cache_dir) / get_backbone(backbone).cache_subdir}",
        flush=True,
    )
    paths, spent, estimated = [], 0.0, 0.0
    with Progress("fine-tunes", len(pending), unit="models") as bar:  # cached ones take no time
        for t, r in jobs:
            bar.update(0, detail=f"{t}/{r}")
            start = time.perf_counter()
            paths.append(
                finetune(
                    t,
                    r,
                    cache_dir,
                    epochs=epochs,
                    seed=seed,
                    force=force,
                    progress=False,
                    callbacks=[_steps_in_detail(bar, f"{t}/{r}")],
                    backbone=backbone,
                )
            )
            if (t, r) in pending:
                spent, estimated = spent + time.perf_counter() - start, estimated + estimates.pop((t, r))
                bar.update(1)
                if estimates:  # re-estimate with this machine's measured speed
                    left = sum(estimates.values()) * spent / estimated / 60
                    print(f"about {left:.0f} minutes left ({spent / estimated:.1f}x the estimate so far)", flush=True)
    _print_summary(paths)
    return paths


def _steps_in_detail(bar: Any, label: str) -> Any:
    """A Lightning callback that shows ``task/recipe step i/n`` as the current item of the outer fine-tunes
    :class:`~lifelong_delta.progress.Progress`."""
    from lightning.pytorch.callbacks import Callback

    class StepsInDetail(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            step, total = trainer.global_step, trainer.estimated_stepping_batches
            if step == 1 or step % 5 == 0 or step == total:
                bar.update(0, detail=f"{label} step {step}/{total}")

    return StepsInDetail()


def _print_summary(paths: Sequence[str]) -> None:
    print(f"{'task':6} {'recipe':12} {'val_acc':>8} {'test_acc':>8} {'|delta| mean':>12} {'minutes':>8}")
    for p in paths:
        info = _read_info(Path(p)) or {}
        h = info.get("hparams", {})
        print(
            f"{h.get('task', '?'):6} {info.get('recipe', '?'):12} {info.get('val_acc', float('nan')):8.4f} "
            f"{info.get('test_acc', float('nan')):8.4f} {info.get('delta_abs_mean', float('nan')):12.2e} "
            f"{info.get('wall_time_s', float('nan')) / 60:8.1f}"
        )
