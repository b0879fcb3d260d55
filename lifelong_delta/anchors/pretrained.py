"""Pretrained anchor: θ* = the weights at the first snapshot (θ_pre), never re-anchored; ω = 1.

This is the anchor of AdamR's decoupled pull toward the pretrained model (DARE the Extreme,
https://arxiv.org/abs/2410.09344): keeping the fine-tuned delta small makes it prunable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lifelong_delta.anchors.base import ParameterAnchor

__all__ = ["PretrainedAnchor"]


class PretrainedAnchor(ParameterAnchor):
    """Anchor fixed at the pretrained weights; :meth:`snapshot_` anchors once, later calls are no-ops.

    Args:
        include: ``fnmatch`` patterns over parameter names.
        exclude: patterns removed from the selection.
        strength: λ of the loss term ``strength * penalty(model)``.
    """

    unit_importance = True

    def snapshot_(self, model: nn.Module, **context: Any) -> None:
        """Anchor at the current weights the first time only; afterwards do nothing (θ* stays θ_pre)."""
        if not self._reference:
            super().snapshot_(model, **context)

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
        anchor._reference = {n: reference[n].detach() for n in names}
        anchor._importance = {
            n: torch.ones((), device=t.device).expand(t.shape) for n, t in anchor._reference.items()
        }
        anchor.num_snapshots = 1
        return anchor
