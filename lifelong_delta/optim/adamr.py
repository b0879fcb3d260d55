"""AdamR: Adam with a decoupled pull toward the pretrained weights (DAREx-L2, https://arxiv.org/abs/2410.09344).

DARE fails when the fine-tuned delta δ = θ − θ_pre has a large mean or variance. AdamR keeps δ small while training,
so that the delta can afterwards be pruned at extreme rates. Before each Adam step, every parameter with a gradient is
moved toward its reference θ* with the per-element weight ω of a :class:`~lifelong_delta.anchors.ParameterAnchor`
(by default a :class:`~lifelong_delta.anchors.PretrainedAnchor` of the weights the optimiser is built with: θ* = θ_pre,
ω = 1):

    L2 variant:  θ ← θ − lr · λ / (√mean(v̂_t) + ε) · ω ⊙ (θ − θ*)
    L1 variant:  θ ← θ − lr · λ / (√mean(v̂_t) + ε) · ω ⊙ sign(θ − θ*)

then the usual Adam update θ ← θ − lr · m̂_t / (√v̂_t + ε). ``mean(v̂_t)`` is the mean of Adam's bias-corrected second
moment over all elements of all parameters with gradients, including this step's gradient. This scale-invariant
decay follows the paper's use of the scheduled weight decay of Xie et al. (2023, https://arxiv.org/abs/2011.11152):
dividing by √mean(v̂) makes λ comparable to the Adam step size. With λ = 0 the optimiser is ``torch.optim.AdamW`` with
``weight_decay=0`` bit for bit. With an :class:`~lifelong_delta.anchors.EWCAnchor` the pull is importance-weighted
(ω = Fisher): keep ``lr · λ · ω / √mean(v̂)`` below 1, or the step overshoots θ*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lifelong_delta.anchors.base import ParameterAnchor
from lifelong_delta.anchors.ops import PullVariant
from lifelong_delta.anchors.pretrained import PretrainedAnchor

__all__ = ["AdamR"]


class AdamR(torch.optim.AdamW):
    """Adam with a decoupled L2 or L1 pull toward the reference θ* of a parameter anchor, weighted by its ω.

    Args:
        params: parameters or parameter groups, as for any torch optimiser, named (``model.named_parameters()``,
            or groups of ``(name, parameter)`` pairs) or not. Each group may set its own ``reg`` and ``variant``.
        lr: learning rate.
        betas: Adam's (β1, β2).
        eps: Adam's ε; also added to √mean(v̂) in the pull.
        reg: λ, the strength of the pull toward θ* (0 reproduces AdamW without weight decay).
        variant: ``"l2"`` pulls by ω ⊙ (θ − θ*), ``"l1"`` by ω ⊙ sign(θ − θ*).
        amsgrad: as in AdamW.
        anchor: where θ* and ω come from, matched by parameter name, so ``params`` must be named. A
            :class:`~lifelong_delta.anchors.PretrainedAnchor` without a reference is anchored here, at the weights
            of ``params``; any other anchor without a reference pulls nothing until it is snapshotted (e.g. at a task
            boundary). ``None``: a new ``PretrainedAnchor`` of all ``params`` at their current weights (unnamed
            parameters are then named ``param0``, ``param1``, ... in group order).

    Parameters the anchor does not hold (e.g. added later with ``add_param_group``) are not pulled. The anchor's
    state travels in ``state_dict()`` under ``"anchor"``, so a resumed run keeps pulling toward the original θ*, not
    toward the weights at resume time. The anchor's tensors are shared, not copied: ``DeltaPruning(reference=anchor)``
    prunes against the same θ_pre that the optimiser pulls toward.

    Example::

        anchor = PretrainedAnchor()
        opt = AdamR(model.named_parameters(), lr=5e-5, reg=0.1, anchor=anchor)  # anchors at the current weights
        trainer = L.Trainer(callbacks=[DeltaPruning(p=0.99, reference=anchor)])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reg: float = 0.0,
        variant: PullVariant = "l2",
        amsgrad: bool = False,
        anchor: ParameterAnchor | None = None,
    ) -> None:
        _check_reg(reg)
        _check_variant(variant)
        if anchor is not None and not isinstance(anchor, ParameterAnchor):
            raise TypeError(f"AdamR(anchor=...) must be a ParameterAnchor, got {type(anchor).__name__}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, amsgrad=amsgrad)
        self.defaults.update(reg=reg, variant=variant)  # for groups added later with add_param_group
        for group in self.param_groups:
            group.setdefault("reg", reg)
            group.setdefault("variant", variant)
            _check_reg(group["reg"])
            _check_variant(group["variant"])
            if group["weight_decay"] != 0:
                raise ValueError("AdamR decays toward the pretrained weights with reg=; set weight_decay=0")
        if anchor is not None and "param_names" not in self.param_groups[0]:
            raise ValueError(
                "AdamR(anchor=...) matches parameters by name: pass model.named_parameters(), or "
                "groups whose params are (name, parameter) pairs"
            )
        if anchor is None:
            anchor = PretrainedAnchor()
        if isinstance(anchor, PretrainedAnchor):
            anchor.snapshot_tensors_(self._named())  # a no-op if it already has a reference
        self.anchor = anchor
        self._check_anchor_names()

    # ------------------------------------------------------------------ names
    def _group_names(self) -> list[list[str]]:
        """Each group's parameter names: torch's ``param_names``, or ``param{i}`` by position in group order."""
        names, i = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            positional = [f"param{j}" for j in range(i, i + n)]
            names.append(list(group["param_names"]) if "param_names" in group else positional)
            i += n
        return names

    def _named(self) -> dict[str, Tensor]:
        """``{name: parameter}`` over all groups, with the names the anchor is matched by."""
        return {
            n: p for group, names in zip(self.param_groups, self._group_names()) for n, p in zip(names, group["params"])
        }

    @property
    def pretrained(self) -> dict[Tensor, Tensor]:
        """θ* of each parameter that the anchor holds, keyed by the parameter (the anchor's tensors, not copies)."""
        reference = self.anchor.reference
        return {p: reference[n] for n, p in self._named().items() if n in reference}

    def _check_anchor_names(self) -> None:
        reference = self.anchor.reference
        if reference and not any(n in reference for n in self._named()):
            ours, theirs = list(self._named())[:3], list(reference)[:3]
            raise ValueError(
                f"AdamR: the anchor holds no parameter of the optimiser (its names look like {theirs}, "
                f"the optimiser's like {ours}); anchor the module whose named_parameters() you pass"
            )

    # ------------------------------------------------------------------ the decoupled pull
    @torch.no_grad()
    def _mean_second_moment(self) -> float:
        """mean(v̂_t) over all elements of all parameters with gradients, including this step's gradient."""
        total, count = 0.0, 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grad_sq = torch.stack(torch._foreach_norm([p.grad for p in params])).double().square()
            for p, g2 in zip(params, grad_sq.tolist()):
                state = self.state.get(p, {})
                step = float(state["step"]) + 1 if "step" in state else 1.0
                v_prev = float(state["exp_avg_sq"].double().sum()) if "exp_avg_sq" in state else 0.0
                total += (beta2 * v_prev + (1 - beta2) * g2) / (1 - beta2**step)
                count += p.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def _pull_(self) -> None:
        """Move every parameter with a gradient toward θ* in place (the decoupled part of AdamR).

        The rate lr·λ/√mean(v̂) grows without bound as the gradients vanish; it is capped at 1, so that with ω ≤ 1
        (a PretrainedAnchor's or L2Anchor's ω = 1) the L2 pull stops at θ* instead of overshooting it and
        diverging.
        """
        if all(group["reg"] == 0 for group in self.param_groups):
            return
        scale = 1.0 / (math.sqrt(self._mean_second_moment()) + self.defaults["eps"])
        for group, names in zip(self.param_groups, self._group_names()):
            if group["reg"] == 0:
                continue
            named = {n: p for n, p in zip(names, group["params"]) if p.grad is not None}
            if named:
                rate = min(group["lr"] * group["reg"] * scale, 1.0)
                self.anchor.pull_tensors_(named, rate, group["variant"])

    @torch.no_grad()
    def step(self, closure=None):
        """Pull toward θ*, then take the AdamW step (``weight_decay=0``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pull_()
        super().step()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus ``"anchor"``: the anchor's :meth:`~ParameterAnchor.state_dict` (θ*, ω, counters)."""
        state = super().state_dict()
        state["anchor"] = self.anchor.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, including the anchor's state.

        A state that holds ``"pretrained"`` instead, θ* of every parameter as a list in group order, loads too.
        """
        state_dict = dict(state_dict)
        anchor_state = state_dict.pop("anchor", None)
        pretrained = state_dict.pop("pretrained", None)
        super().load_state_dict(state_dict)
        if anchor_state is None and pretrained is not None:
            anchor_state = self._pretrained_list_state(pretrained)
        if anchor_state is not None:
            self.anchor.load_state_dict(anchor_state)
            self._check_anchor_names()

    def _pretrained_list_state(self, pretrained: list[Tensor]) -> dict[str, Any]:
        """The state of a ``PretrainedAnchor`` whose θ* is ``pretrained``, one tensor per parameter in group order."""
        named = self._named()
        if len(pretrained) != len(named):
            raise ValueError(
                f"AdamR state holds {len(pretrained)} pretrained tensors but the optimiser has {len(named)} parameters"
            )
        for (name, p), ref in zip(named.items(), pretrained):
            if ref.shape != p.shape:
                raise ValueError(
                    f"AdamR state: pretrained tensor of shape {tuple(ref.shape)} for parameter {name!r} "
                    f"of shape {tuple(p.shape)}"
                )
        return PretrainedAnchor.from_reference(dict(zip(named, pretrained))).state_dict()


def _check_reg(reg: float) -> None:
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg < 0:
        raise ValueError(f"reg (AdamR's λ) must be a finite number >= 0, got {reg!r}")


def _check_variant(variant: str) -> None:
    if variant not in ("l2", "l1"):
        raise ValueError(f"variant must be 'l2' or 'l1', got {variant!r}")
