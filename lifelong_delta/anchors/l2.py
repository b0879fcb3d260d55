"""L2 anchor: ω = 1, so ``penalty = ‖θ − θ*‖²`` over the selected parameters.

The "L2 on the attention QKV of early ViT blocks" baseline of Smith et al., *A Closer Look at Rehearsal-Free
Continual Learning*, https://arxiv.org/abs/2203.17269.
"""

from __future__ import annotations

from lifelong_delta.anchors.base import ParameterAnchor

__all__ = ["L2Anchor"]


class L2Anchor(ParameterAnchor):
    """Anchor with unit importance; each :meth:`snapshot_` re-anchors θ* at the current weights.

    Args:
        include: ``fnmatch`` patterns over parameter names, e.g. ``["blocks.[0-4].attn.qkv.*", "head.*"]``.
        exclude: patterns removed from the selection.
        strength: λ of the loss term ``strength * penalty(model)``.

    Example (YAML for LightningCLI)::

        class_path: lifelong_delta.anchors.L2Anchor
        init_args: {include: ["blocks.[0-4].attn.qkv.*"], strength: 100.0}
    """

    unit_importance = True
