"""``ProgressLines``: progress of fit / validate / test as plain lines when stderr is not a terminal.

A live progress bar shows nothing useful in a log file, CI or ``nohup`` (rich prints it once at the end, tqdm fills
the log with ``\\r`` updates). This callback prints a line at the first step, then at most every ``interval``
seconds, and a final line, through :class:`lifelong_delta.progress.Progress`::

    fit: 120/1407 steps (8%), 12 s elapsed, about 2 min 09 s left — epoch 1/3, loss 0.5123
    fit: 1407/1407 steps (100%), done in 2 min 21 s

On a terminal it prints nothing: the trainer's progress bar shows the run. Trainers that use it should turn
their bar off when stderr is not a terminal (``enable_progress_bar=is_terminal()``). Only global rank 0 prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TextIO

import lightning.pytorch as pl

from lifelong_delta.progress import Progress, is_terminal, progress_interval

__all__ = ["ProgressLines"]

_LOSS_KEYS = ("loss", "train_loss", "train/loss")


class ProgressLines(pl.Callback):
    """Print progress lines of ``fit`` (steps), ``validate`` and ``test`` (batches) when stderr is not a terminal.

    A fit line holds the global step out of the estimated total, the epoch, the latest training loss (the first
    logged metric named ``loss``, ``train_loss``, ``train/loss`` or ending in ``loss``) and the other progress-bar
    metrics, the elapsed time and the time left at the rate so far.

    Args:
        interval: seconds between two lines (default ``$LIFELONG_DELTA_PROGRESS_INTERVAL`` or 10).
        stream: where to write (default: ``sys.stderr``); nothing is printed if it is a terminal.
        clock: the time source, in seconds (tests pass a fake one).

    Raises:
        ValueError: a negative interval.
    """

    def __init__(
        self,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = progress_interval(interval)
        self._stream, self._clock = stream, clock
        self._bar: Progress | None = None
        self._stage: str | None = None

    # ------------------------------------------------------------------ fit
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._open(trainer, "fit", _finite(trainer.estimated_stepping_batches), "steps")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None and self._stage == "fit":  # the loader may change per epoch (one task each)
            self._bar.update(0, total=_finite(trainer.estimated_stepping_batches), detail=_fit_detail(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is not None and self._stage == "fit":
            self._bar.update(trainer.global_step - self._bar.completed, detail=_fit_detail(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("fit", detail=_fit_detail(trainer))

    # ------------------------------------------------------------------ validate (alone or inside fit), test
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._stage != "fit":
            self._open(trainer, "validate", _finite(sum(trainer.num_val_batches)), "batches")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bar is None or trainer.sanity_checking:
            return
        if self._stage == "fit":
            where = f"validating batch {batch_idx + 1}/{_count(trainer.num_val_batches[dataloader_idx])}"
            self._bar.update(0, detail=f"{_epoch(trainer)}, {where}")
        else:
            self._bar.update(1, detail=_loader_detail(trainer.num_val_batches, dataloader_idx))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._open(trainer, "test", _finite(sum(trainer.num_test_batches)), "batches")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bar is not None and self._stage == "test":
            self._bar.update(1, detail=_loader_detail(trainer.num_test_batches, dataloader_idx))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close("test")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._bar is not None:
            self._bar.close(failed=True)
        self._bar, self._stage = None, None

    # ------------------------------------------------------------------ private
    def _open(self, trainer: pl.Trainer, stage: str, total: float | None, unit: str) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None
        if trainer.is_global_zero and not is_terminal(self._stream):
            self._bar = Progress(
                stage, total, unit=unit, live=False, interval=self.interval, stream=self._stream, clock=self._clock
            )
            self._stage = stage

    def _close(self, stage: str, detail: str | None = None) -> None:
        if self._bar is not None and self._stage == stage:
            self._bar.close(detail=detail)
            self._bar, self._stage = None, None


def _finite(n: float) -> float | None:
    return None if n is None or math.isinf(n) else n


def _count(n: float) -> str:
    return "?" if math.isinf(n) else str(int(n))


def _epochs(trainer: pl.Trainer) -> int | None:
    """The epochs the fit will run: ``max_epochs``, fewer if ``max_steps`` ends it sooner (None: unbounded)."""
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    batches = trainer.num_training_batches
    if trainer.max_steps != -1 and batches and not math.isinf(batches):
        by_steps = math.ceil(trainer.max_steps / math.ceil(batches / trainer.accumulate_grad_batches))
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    return epochs


def _epoch(trainer: pl.Trainer) -> str:
    epochs, epoch = _epochs(trainer), trainer.current_epoch + 1
    if epochs:  # at the end of a fit the epoch counter is one past the last epoch
        return f"epoch {min(epoch, epochs)}/{epochs}"
    return f"epoch {epoch}"


def _fit_detail(trainer: pl.Trainer) -> str:
    """``"epoch 1/3, loss 0.5123, val_acc 0.8"``: the epoch, the latest loss and the progress-bar metrics."""
    return ", ".join([_epoch(trainer)] + [f"{k} {v:.4g}" for k, v in _metrics(trainer)])


def _metrics(trainer: pl.Trainer) -> list[tuple[str, float]]:
    """The latest training loss, then the other progress-bar metrics, as (name, value) pairs."""
    shown = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.progress_bar_metrics.items()) if v is not None}
    logged = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
    both = {**logged, **shown}
    loss = next((k for k in _LOSS_KEYS if k in both), None)
    if loss is None:
        loss = next((k for k in both if k.endswith("loss") and not k.startswith(("val", "test"))), None)
    pairs = [(loss, both[loss])] if loss is not None else []
    return pairs + [(k, v) for k, v in shown.items() if k != loss]


def _scalar(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor with more than one element
        return None


def _loader_detail(batches: list[float], dataloader_idx: int) -> str:
    return f"dataloader {dataloader_idx + 1}/{len(batches)}" if len(batches) > 1 else ""
