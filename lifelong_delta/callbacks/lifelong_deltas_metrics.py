"""The forward passes that score :class:`~lifelong_delta.callbacks.LifelongDeltas`' task deltas.

* :func:`evaluate_bank`: task- and class-incremental accuracy of one bank of task deltas on the validation data of
  the stored tasks. Task-IL classifies a task's samples among its own classes with its own delta in; class-IL runs
  every sample through every task's delta and keeps the prediction of the most confident task
  (:func:`task_confidence`).
* :func:`select_q_by_loss`: the q of a task's pruned delta with the lowest loss on the task's labelled training
  batches (``LifelongDeltas(q="grid")``).

Plain torch on a model and its deltas; the callback gathers the model, the banks and the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ["Confidence", "evaluate_bank", "mean_or_nan", "select_q_by_loss", "task_confidence"]

Confidence = Literal["max_sigmoid", "entropy"]


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean of ``values``; NaN for none."""
    return float(sum(values) / len(values)) if values else math.nan


def task_confidence(logits: torch.Tensor, how: Confidence) -> torch.Tensor:
    """Per-sample confidence of one task's logits (higher is more confident)."""
    if how == "max_sigmoid":
        return torch.sigmoid(logits).amax(1)
    logp = torch.log_softmax(logits, 1)
    return (logp.exp() * logp).sum(1)  # minus the entropy


def evaluate_bank(
    bank: Any,
    records: dict[int, dict[str, float]],
    net: torch.nn.Module,
    tasks: list[range],
    loaders: list[Any],
    device: torch.device,
    confidence: Confidence,
) -> dict[str, Any]:
    """One pass over every loader per task delta: task-IL on the task's own data, and the most confident
    task's prediction for every sample.

    Args:
        bank: The :class:`~lifelong_delta.delta.bank.DeltaBank` holding task ``t``'s delta as ``task<t>``.
        records: Per task, its delta's ``q`` and ``bytes`` (reported as they are).
        net: The model, holding θ_pre and every stored task's head rows.
        tasks: Per task, the range of its classes.
        loaders: Per task, its validation loader.
        device: Where the model is.
        confidence: How the most confident task is picked (:func:`task_confidence`).
    """
    n_tasks = len(tasks)
    conf: list[torch.Tensor] = []  # per batch of every loader, in loader order
    chosen: list[torch.Tensor] = []
    pred: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    correct, total = [0] * n_tasks, [0] * n_tasks
    for t, cls in enumerate(tasks):
        i = 0
        with bank.use(f"task{t}"):
            for j, loader in enumerate(loaders):
                for x, y in loader:
                    logits = net(x.to(device))[:, cls.start : cls.stop].float()
                    p_t = logits.argmax(1).cpu() + cls.start
                    c_t = task_confidence(logits, confidence).cpu()
                    if j == t:
                        correct[t] += int((p_t == y).sum())
                        total[t] += len(y)
                    if t == 0:
                        conf.append(c_t)
                        chosen.append(torch.zeros_like(p_t))
                        pred.append(p_t)
                        labels.append(y.clone())
                    else:
                        better = c_t > conf[i]
                        conf[i] = torch.where(better, c_t, conf[i])
                        chosen[i] = torch.where(better, t, chosen[i])
                        pred[i] = torch.where(better, p_t, pred[i])
                    i += 1
    y_all, pred_all, chosen_all = torch.cat(labels), torch.cat(pred), torch.cat(chosen)
    true_task = torch.zeros_like(y_all)
    for t, cls in enumerate(tasks):
        true_task[(y_all >= cls.start) & (y_all < cls.stop)] = t
    return {
        "task_il_accuracy": sum(correct) / max(sum(total), 1),
        "task_il_per_task": [c / max(n, 1) for c, n in zip(correct, total)],
        "class_il_accuracy": float((pred_all == y_all).double().mean()),
        "task_inference_accuracy": float((chosen_all == true_task).double().mean()),
        "q": [records[t]["q"] for t in sorted(records)],
        "bytes_per_task": mean_or_nan([records[t]["bytes"] for t in sorted(records)]),
    }


@torch.no_grad()
def select_q_by_loss(
    net: torch.nn.Module, masked: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], classes: range, p: float
) -> float:
    """The grid q with the lowest mean cross-entropy over ``classes`` on labelled ``batches``; the model (holding the
    trained weights on entry) is restored on exit."""
    from lifelong_delta.delta.darex import select_q_grid

    params = dict(net.named_parameters())
    saved = {n: params[n].detach().clone() for n in masked.names}
    was_training = net.training
    net.eval()

    def loss(q: float) -> float:
        masked.apply_(net, q, force=True)
        losses = [
            torch.nn.functional.cross_entropy(net(x)[:, classes.start : classes.stop].float(), y) for x, y in batches
        ]
        return float(torch.stack(losses).mean())

    try:
        return select_q_grid(loss, p, mode="min").q
    finally:
        for n, v in saved.items():
            params[n].copy_(v)
        net.train(was_training)
