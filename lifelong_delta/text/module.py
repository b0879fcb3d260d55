"""``SequenceClassifier``: fine-tune a Hugging Face encoder (the offline MiniLM) for text classification.

The model is ``AutoModelForSequenceClassification.from_pretrained(model_dir)``, loaded offline. Fine-tuning is
full (every parameter trains) or LoRA (Hu et al., https://arxiv.org/abs/2106.09685) through peft, where the
classifier head trains fully (``modules_to_save=["classifier"]``). The optimiser is any torch optimiser
factory: AdamW without weight decay (the default), or AdamR (``lifelong_delta.optim.AdamR``,
https://arxiv.org/abs/2410.09344), which pulls the weights toward the values they have when the optimiser is
built, i.e. the pretrained base. The learning rate warms up linearly over ``warmup_fraction`` of the steps,
then decays linearly to 0.

Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` (see ``TextClassificationDataModule``).
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["SequenceClassifier", "linear_warmup_decay", "load_classifier", "param_groups"]


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR factor: ``step / warmup_steps`` during warm-up, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def param_groups(model: torch.nn.Module, unregularized: Sequence[str]) -> list[dict]:
    """Trainable parameters in two groups: the rest, and those matching ``unregularized`` (with ``reg=0``).

    Empty groups are left out.
    """
    rest, free = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (free if any(fnmatch.fnmatchcase(name, pat) for pat in unregularized) else rest).append(p)
    return [g for g in ({"params": rest}, {"params": free, "reg": 0.0}) if g["params"]]


def load_classifier(
    model_dir: str | os.PathLike, num_labels: int | None = None, label_names: Sequence[str] | None = None
) -> torch.nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained`` offline, quietly.

    Args:
        model_dir: a local Hugging Face directory.
        num_labels: head width; None keeps the checkpoint's. A checkpoint without a head (the pretrained
            MiniLM) gets a freshly initialised ``classifier`` drawn from torch's global RNG (seed it first).
        label_names: ``id2label`` names written to the config.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs: dict = {}
    if label_names is not None:
        if num_labels is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names but num_labels={num_labels}")
        num_labels = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised classifier" and unused position_ids are expected
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


class SequenceClassifier(L.LightningModule):
    """A Hugging Face sequence classifier, fully fine-tuned or with LoRA.

    Args:
        model_dir: Hugging Face directory to start from; None = the offline MiniLM (a fresh head is
            initialised from the global seed). ``finetune`` passes the saved ``base`` directory, so every
            recipe starts from the same head.
        num_labels: head width; None keeps the checkpoint's.
        label_names: class names for the config's ``id2label`` (sets ``num_labels``).
        optimizer: optimiser factory over the trainable parameters; None = ``AdamW(lr=5e-5, weight_decay=0)``.
            E.g. ``functools.partial(AdamR, lr=5e-5, reg=0.1, variant="l2")``, or a ``class_path`` in YAML.
        warmup_fraction: fraction of the training steps with a linear warm-up; the rest decays linearly to 0.
        lora_r: LoRA rank; 0 = full fine-tuning.
        lora_alpha: LoRA α (the update is scaled by α / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names that get LoRA adapters (BERT: ``query``, ``key``, ``value``,
            ``dense``).
        unregularized: globs over the model's parameter names (``classifier.weight`` ...) put in a parameter
            group with ``reg=0``, so AdamR does not pull them toward the base: by default the task head, which
            starts from a random draw and is excluded from delta pruning anyway. Other optimisers ignore
            ``reg``.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        warmup_fraction: float = 0.1,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        lora_target_modules: list[str] | None = None,
        unregularized: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = full fine-tuning), got {lora_r}")
        self.save_hyperparameters(ignore=["optimizer"])
        if model_dir is None:
            from lifelong_delta.text.data import minilm_dir

            model_dir = str(minilm_dir())
        self.model = load_classifier(model_dir, num_labels, label_names)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps module modes: dropout on
        self.num_labels = int(self.model.config.num_labels)
        if lora_r > 0:
            self.model = _wrap_lora(
                self.model, lora_r, lora_alpha, lora_dropout, list(lora_target_modules or ["query", "value"])
            )
        self.optimizer = optimizer
        self.warmup_fraction = warmup_fraction
        self.unregularized = list(["classifier.*"] if unregularized is None else unregularized)
        self.val_acc = MulticlassAccuracy(num_classes=self.num_labels, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_labels, average="micro")

    @property
    def is_lora(self) -> bool:
        return self.hparams.lora_r > 0

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits float [B, num_labels] of token ids int64 [B, L]."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_acc(logits, batch["labels"])
        n = len(batch["labels"])
        self.log("val_loss", loss, batch_size=n)
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=n)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, logits = self._loss(batch)
        self.test_acc(logits, batch["labels"])
        self.log("test_acc", self.test_acc, batch_size=len(batch["labels"]))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:
        groups = param_groups(self.model, self.unregularized)
        if self.optimizer is None:
            opt = torch.optim.AdamW(groups, lr=5e-5, weight_decay=0.0)
        else:
            opt = self.optimizer(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_fraction * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, total, warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------ export
    def merged_model(self) -> torch.nn.Module:
        """A plain ``transformers`` model with the trained weights (LoRA: merged into a copy of the model)."""
        if not self.is_lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a Hugging Face directory (``config.json``, ``model.safetensors``); LoRA adds ``adapter/``.

        ``adapter/`` is the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, holding the
        LoRA factors and the fully trained classifier). The top-level model is the merged one, with the same
        tensor names as the base model.
        """
        from transformers.utils import logging as hf_logging

        directory = Path(directory)
        hf_logging.disable_progress_bar()
        try:
            self.merged_model().save_pretrained(directory)
            if self.is_lora:
                self.model.save_pretrained(directory / "adapter")
        finally:
            hf_logging.enable_progress_bar()


def _wrap_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str]) -> torch.nn.Module:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'lifelong-delta[text]'") from None
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=["classifier"],
    )
    return get_peft_model(model, config)
