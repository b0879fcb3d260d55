"""AdamR: Adam with a decoupled pull toward the pretrained weights (DAREx-L2, https://arxiv.org/abs/2410.09344).

DARE fails when the fine-tuned delta δ = θ − θ_pre has a large mean or variance. AdamR keeps δ small while training,
so that the delta can afterwards be pruned at extreme rates. Before each Adam step, every parameter with a gradient is
moved toward its pretrained value θ_pre (the reference captured when the optimiser is built, i.e. the anchor):

    L2 variant:  θ ← θ − lr · λ / (√mean(v̂_t) + ε) · (θ − θ_pre)
    L1 variant:  θ ← θ − lr · λ / (√mean(v̂_t) + ε) · sign(θ − θ_pre)

then the usual Adam update θ ← θ − lr · m̂_t / (√v̂_t + ε). ``mean(v̂_t)`` is the mean of Adam's bias-corrected second
moment over all elements of all parameters with gradients, including this step's gradient. This scale-invariant
decay follows the paper's use of the scheduled weight decay of Xie et al. (2023, https://arxiv.org/abs/2011.11152):
dividing by √mean(v̂) makes λ comparable to the Adam step size. With λ = 0 the optimiser is ``torch.optim.AdamW`` with
``weight_decay=0`` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lifelong_delta.anchors.ops import anchor_pull_

__all__ = ["AdamR"]

Variant = Literal["l2", "l1"]


class AdamR(torch.optim.AdamW):
    """Adam with a decoupled L2 or L1 pull toward the weights the parameters had when the optimiser was built.

    Args:
        params: parameters or parameter groups, as for any torch optimiser. Each group may set its own ``reg`` and
            ``variant``.
        lr: learning rate.
        betas: Adam's (β1, β2).
        eps: Adam's ε; also added to √mean(v̂) in the pull.
        reg: λ, the strength of the pull toward θ_pre (0 reproduces AdamW without weight decay).
        variant: ``"l2"`` pulls by (θ − θ_pre), ``"l1"`` by sign(θ − θ_pre).
        amsgrad: as in AdamW.

    The pretrained reference θ_pre travels in ``state_dict()`` under ``"pretrained"``, so a resumed run keeps pulling
    toward the original weights, not toward the weights at resume time.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reg: float = 0.0,
        variant: Variant = "l2",
        amsgrad: bool = False,
    ) -> None:
        _check_reg(reg)
        _check_variant(variant)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, amsgrad=amsgrad)
        self.defaults.update(reg=reg, variant=variant)  # for groups added later with add_param_group
        for group in self.param_groups:
            group.setdefault("reg", reg)
            group.setdefault("variant", variant)
            _check_reg(group["reg"])
            _check_variant(group["variant"])
            if group["weight_decay"] != 0:
                raise ValueError("AdamR decays toward the pretrained weights with reg=; set weight_decay=0")
        self.pretrained: dict[Tensor, Tensor] = {
            p: p.detach().clone() for group in self.param_groups for p in group["params"]
        }

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
        """Move every parameter with a gradient toward θ_pre in place (the decoupled part of AdamR)."""
        if all(group["reg"] == 0 for group in self.param_groups):
            return
        scale = 1.0 / (math.sqrt(self._mean_second_moment()) + self.defaults["eps"])
        for group in self.param_groups:
            if group["reg"] == 0:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            refs = [self.pretrained[p] for p in params]
            rate = group["lr"] * group["reg"] * scale
            if group["variant"] == "l2":
                anchor_pull_(params, refs, None, rate)
            else:
                signs = torch._foreach_sub(params, refs)
                torch._foreach_sign_(signs)
                torch._foreach_add_(params, signs, alpha=-rate)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        """Pull toward θ_pre, then take the AdamW step (``weight_decay=0``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._pull_()
        super().step()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus ``"pretrained"``: θ_pre of each parameter, in parameter order."""
        state = super().state_dict()
        state["pretrained"] = [self.pretrained[p] for group in self.param_groups for p in group["params"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, including θ_pre."""
        state_dict = dict(state_dict)
        pretrained = state_dict.pop("pretrained", None)
        super().load_state_dict(state_dict)
        if pretrained is None:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        if len(pretrained) != len(params):
            raise ValueError(
                f"AdamR state holds {len(pretrained)} pretrained tensors but the optimiser has {len(params)} parameters"
            )
        for p, ref in zip(params, pretrained):
            if ref.shape != p.shape:
                raise ValueError(f"AdamR state: pretrained tensor of shape {tuple(ref.shape)} for a parameter of shape "
                                 f"{tuple(p.shape)}")
            self.pretrained[p] = ref.to(device=p.device, dtype=p.dtype)


def _check_reg(reg: float) -> None:
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg < 0:
        raise ValueError(f"reg (AdamR's λ) must be a finite number >= 0, got {reg!r}")


def _check_variant(variant: str) -> None:
    if variant not in ("l2", "l1"):
        raise ValueError(f"variant must be 'l2' or 'l1', got {variant!r}")
