"""Distillation losses against a frozen copy of the previous model: PredKD and FeatKD.

Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", https://arxiv.org/abs/2203.17269
(PredKD: distil the past-class predictions, as in LwF; FeatKD: distil the penultimate features).

Pure functions on tensors; no Lightning. The teacher's tensors are detached here, so callers may pass them
straight from a forward pass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lifelong_delta.continual.heads import ClassSet, _columns

__all__ = ["feat_kd_loss", "pred_kd_loss"]


def pred_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    classes: ClassSet,
    temperature: float = 1.0,
    head: Literal["bce", "ce"] = "bce",
) -> torch.Tensor:
    """Prediction distillation (PredKD) on the past classes.

    With ``s = student_logits[:, classes] / T`` and ``t = teacher_logits[:, classes] / T``:

    * ``head="bce"``: ``BCE(sigmoid(s), sigmoid(t))``, the teacher's sigmoid outputs as soft binary targets,
      averaged over batch × past classes. This is the reference code's LwF-MC term (its past-class columns of the
      BCE target are ``sigmoid(teacher)``), generalised with a temperature.
    * ``head="ce"``: ``T² · KL(softmax(t) ‖ softmax(s))``, summed over the past classes and averaged over the
      batch (Hinton et al.'s scaling keeps gradient magnitudes independent of T).

    Args:
        student_logits: [B, C] logits of the model being trained.
        teacher_logits: [B, C] logits of the frozen previous model (detached here).
        classes: the past classes to distil (remapped ids), e.g. ``range(0, first class of the current task)``.
        temperature: T > 0.
        head: ``"bce"`` or ``"ce"``, matching the classification loss.

    Returns:
        Scalar loss tensor; exactly 0 (on the student's device and dtype) when ``classes`` is empty.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [B, C]; got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if head not in ("bce", "ce"):
        raise ValueError(f"head must be 'bce' or 'ce', got {head!r}")
    n_classes = classes.numel() if isinstance(classes, torch.Tensor) else len(classes)
    if n_classes == 0:
        return student_logits.new_zeros(())
    s = _columns(student_logits, classes) / temperature
    t = _columns(teacher_logits.detach(), classes) / temperature
    if head == "bce":
        return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t))
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def feat_kd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """Feature distillation (FeatKD) on penultimate features.

    The mean squared error over all B × D entries, ``(1 / (B·D)) Σ_b ‖s_b − t_b‖²``, i.e. the mean squared L2
    distance per sample divided by the feature width D (the reference code's ``MSELoss(...).mean()``), so the
    weight λ_feat does not depend on the backbone's width.

    Args:
        student_feats: [B, D] features of the model being trained.
        teacher_feats: [B, D] features of the frozen previous model (detached here).

    Returns:
        Scalar loss tensor.
    """
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"student and teacher features must have the same shape; got {tuple(student_feats.shape)} "
            f"and {tuple(teacher_feats.shape)}"
        )
    return F.mse_loss(student_feats, teacher_feats.detach())
