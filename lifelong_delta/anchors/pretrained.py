"""Pretrained anchor: θ* = the first weights the anchor sees (θ_pre), never re-anchored; ω = 1.

This is the anchor of AdamR's decoupled pull toward the pretrained model (DARE the Extreme,
https://arxiv.org/abs/2410.09344): keeping the fine-tuned delta small makes it prunable. One instance can serve
the three consumers of the reference at once: a continual-learning penalty, AdamR's pull and ``DeltaPruning``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lifelong_delta.anchors.base import ParameterAnchor
from lifelong_delta.anchors.ops import PullVariant

__all__ = ["PretrainedAnchor"]


class PretrainedAnchor(ParameterAnchor):
    """Anchor fixed at the pretrained weights: the first weights it sees, later snapshots are no-ops.

    The anchor takes θ* from the model the first time any of :meth:`snapshot_`, :meth:`penalty` or
    :meth:`pull_` is called, or from the tensors given to :meth:`snapshot_tensors_` (AdamR does this when it is
    built). So in a ``ContinualModule`` anchor list it anchors at the first training step of task 0, before any
    update, and the task-boundary snapshots leave it at θ_pre.

    Args:
        include: ``fnmatch`` patterns over parameter names.
        exclude: patterns removed from the selection.
        strength: λ of the loss term ``strength * penalty(model)`` (Kirkpatrick et al.'s λ/2).

    Example (YAML for LightningCLI, next to the previous-task anchors of a ``ContinualModule``)::

        class_path: lifelong_delta.anchors.PretrainedAnchor
        init_args: {include: ["blocks.*.attn.qkv.*"], strength: 10.0}
    """

    unit_importance = True

    def snapshot_(self, model: nn.Module, **context: Any) -> None:
        """Anchor at the current weights the first time only; afterwards do nothing (θ* stays θ_pre)."""
        if not self._reference:
            super().snapshot_(model, **context)

    def penalty(self, model: nn.Module) -> Tensor:
        """Σ (θ − θ*)² (see :meth:`ParameterAnchor.penalty`); the first call anchors at ``model``'s weights."""
        self.snapshot_(model)
        return super().penalty(model)

    @torch.no_grad()
    def pull_(self, model: nn.Module, rate: float, variant: PullVariant = "l2") -> None:
        """:meth:`ParameterAnchor.pull_`; the first call anchors at ``model``'s weights (and so moves nothing)."""
        self.snapshot_(model)
        super().pull_(model, rate, variant)

    @torch.no_grad()
    def snapshot_tensors_(self, named: Mapping[str, Tensor]) -> None:
        """Anchor at copies of the matching tensors of ``named`` if the anchor has no reference yet; in place.

        Args:
            named: ``{parameter name: θ}``, e.g. an optimiser's named parameters.

        Raises:
            ValueError: if no name matches ``include`` / ``exclude``.
        """
        if not self._reference:
            names = self.match(list(named))
            self._set_reference({n: named[n].detach().clone() for n in names})

    @classmethod
    def from_reference(
        cls,
        reference: Mapping[str, Tensor],
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        strength: float = 1.0,
        *,
        model: nn.Module | None = None,
    ) -> PretrainedAnchor:
        """An anchor whose θ* is given, e.g. a pretrained state dict read from safetensors (not copied).

        Args:
            reference: ``{parameter name: θ_pre}``; only the names matching include/exclude are kept.
            include: see the class.
            exclude: see the class.
            strength: see the class.
            model: if given, keep only names that are parameters of ``model`` (drops buffers such as BatchNorm
                statistics that a state dict also holds).
        """
        anchor = cls(include, exclude, strength)
        names = list(reference)
        if model is not None:
            params = {n for n, _ in model.named_parameters()}
            names = [n for n in names if n in params]
        names = anchor.match(names)
        anchor._set_reference({n: reference[n].detach() for n in names})
        return anchor

    def _set_reference(self, reference: dict[str, Tensor]) -> None:
        """θ* ← ``reference`` (kept, not copied), ω ← 1 as zero-stride views, and count one snapshot."""
        self._reference = reference
        self._importance = {n: torch.ones((), device=t.device).expand(t.shape) for n, t in reference.items()}
        self.num_snapshots = 1
        self._cache.clear()
