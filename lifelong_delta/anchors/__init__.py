"""Parameter anchors: a reference θ* and an importance ω for selected parameters (no Lightning imports).

One anchor object serves three consumers, which read θ* by parameter name without copying it:
``penalty(model) = Σ ω (θ − θ*)²`` for continual-learning losses (``strength`` times it: Kirkpatrick et al.'s λ/2),
``pull_tensors_(named, rate)`` for AdamR's decoupled pull, and ``DeltaPruning(reference=anchor)`` for pruning
``θ − θ*``. ``snapshot_(model, **ctx)`` re-anchors at the end of a task. See ``docs/anchors.md``.
"""

from lifelong_delta.anchors.base import ParameterAnchor
from lifelong_delta.anchors.ewc import EWCAnchor
from lifelong_delta.anchors.fisher import diagonal_fisher, fisher_targets, head_loss
from lifelong_delta.anchors.l2 import L2Anchor
from lifelong_delta.anchors.ops import PullVariant, anchor_penalty, anchor_pull_
from lifelong_delta.anchors.pretrained import PretrainedAnchor

#: Anchors by the name a user may pick them with, each with its paper.
ANCHORS: dict[str, type[ParameterAnchor]] = {
    "l2": L2Anchor,  # Smith et al., 2022, https://arxiv.org/abs/2203.17269 (L2 on QKV of early ViT blocks)
    "ewc": EWCAnchor,  # Kirkpatrick et al., 2017, https://arxiv.org/abs/1612.00796
    "pretrained": PretrainedAnchor,  # anchor to θ_pre as in AdamR, https://arxiv.org/abs/2410.09344
}

__all__ = [
    "ANCHORS",
    "EWCAnchor",
    "L2Anchor",
    "ParameterAnchor",
    "PretrainedAnchor",
    "PullVariant",
    "anchor_penalty",
    "anchor_pull_",
    "diagonal_fisher",
    "fisher_targets",
    "head_loss",
]
