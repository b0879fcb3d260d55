"""Class masking, losses and prediction for one linear head over all classes of a class-incremental stream.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", https://arxiv.org/abs/2203.17269.

The head has one column per class of the whole stream; classes are remapped so that task ``t`` owns a
contiguous range of columns. While a task trains only the *active* columns take part in the loss:

* ``"ce"``: softmax cross-entropy with the logits of non-active classes set to ``-inf``, so past (and future)
  classes get no probability mass and no gradient.
* ``"bce"`` (the paper's default): one sigmoid per class. The targets are one-hot over the active columns and the
  loss is the binary cross-entropy with logits over those columns only, **averaged over batch × active classes**
  (``torch.nn.BCELoss`` with its default ``reduction="mean"``, as in the authors' reference code, which applies
  it to ``sigmoid(logits[:, :valid_out_dim])``). Columns outside ``active_classes`` get no gradient.

Pure functions on tensors; no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

ClassSet = range | Sequence[int] | torch.Tensor

__all__ = ["class_mask", "masked_loss", "predict"]


def _as_index(classes: ClassSet, num_classes: int, device: torch.device | str | None) -> torch.Tensor:
    """Return ``classes`` as a 1-D int64 index tensor on ``device``, checked against ``num_classes``."""
    if isinstance(classes, torch.Tensor):
        idx = classes.to(device=device, dtype=torch.long).flatten()
    else:
        idx = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(
            f"class ids must lie in [0, {num_classes}); got min {int(idx.min())}, max {int(idx.max())}: "
            "check the classes passed against the head's num_classes"
        )
    return idx


def _columns(logits: torch.Tensor, classes: ClassSet) -> torch.Tensor:
    """Select class columns of ``logits`` [B, C]; a contiguous ``range`` is a cheap slice (a view)."""
    if isinstance(classes, range) and classes.step == 1:
        if len(classes) and (classes.start < 0 or classes.stop > logits.shape[1]):
            raise ValueError(f"class range {classes} does not fit a head with {logits.shape[1]} classes")
        return logits[:, classes.start : classes.stop]
    return logits.index_select(1, _as_index(classes, logits.shape[1], logits.device))


def class_mask(num_classes: int, active: ClassSet, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask of the active classes.

    Args:
        num_classes: number of head columns C.
        active: class ids (remapped, ``0..C-1``) to mark True: a ``range``, a sequence or a 1-D tensor.
        device: device of the returned mask.

    Returns:
        BoolTensor [C], True at the active classes.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if isinstance(active, range) and active.step == 1:
        if len(active) and (active.start < 0 or active.stop > num_classes):
            raise ValueError(f"active classes {active} do not fit num_classes={num_classes}")
        mask[active.start : active.stop] = True
    else:
        mask[_as_index(active, num_classes, device)] = True
    return mask


def masked_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    active_classes: ClassSet,
    loss: Literal["bce", "ce"] = "bce",
) -> torch.Tensor:
    """Classification loss restricted to the active classes.

    Args:
        logits: [B, C] raw head outputs over all classes of the stream.
        targets: [B] int class ids, already remapped to ``0..C-1``; they should lie in ``active_classes``
            (a BCE target outside them simply counts as negative for every active class; a CE target outside
            them gives an infinite loss).
        active_classes: the classes that take part (e.g. the current task's ``range``).
        loss: ``"bce"`` (sigmoid per class, mean over B × |active|) or ``"ce"`` (softmax over the active
            classes, mean over B).

    Returns:
        Scalar loss tensor.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [B]={logits.shape[0]}, got shape {tuple(targets.shape)}")
    targets = targets.long()
    if loss == "ce":
        mask = class_mask(logits.shape[1], active_classes, logits.device)
        return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), targets)
    if loss == "bce":
        num_classes = logits.shape[1]
        one_hot = F.one_hot(targets, num_classes).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(_columns(logits, active_classes), _columns(one_hot, active_classes))
    raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")


def predict(logits: torch.Tensor, seen_classes: ClassSet) -> torch.Tensor:
    """Predicted class among the seen classes (argmax over their columns only).

    Sigmoid is monotone, so the argmax over logits is the prediction for both the BCE and the CE head.

    Args:
        logits: [B, C] raw head outputs.
        seen_classes: class ids the model may predict (e.g. ``range(0, end of current task)``).

    Returns:
        LongTensor [B] of class ids in ``0..C-1``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    n_seen = seen_classes.numel() if isinstance(seen_classes, torch.Tensor) else len(seen_classes)
    if n_seen == 0:
        raise ValueError("seen_classes is empty: predict needs at least one class")
    mask = class_mask(logits.shape[1], seen_classes, logits.device)
    return logits.masked_fill(~mask, float("-inf")).argmax(dim=1)
