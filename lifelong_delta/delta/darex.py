"""DAREx-q: DARE with the rescale 1/q instead of 1/(1-p), and three ways to choose q.

Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models", arXiv 2410.09344.

Build the masked delta once per seed (:meth:`MaskedDelta.build`); after that each q candidate costs only
a rescale (:meth:`MaskedDelta.apply_`) and an evaluation. q is chosen

1. on a labelled metric with a coarse-then-fine global grid (:func:`select_q_grid`),
2. per layer, analytically from ``c_ij = Δw_ij · mean(x_j)`` on calibration inputs
   (:mod:`lifelong_delta.delta.analytic_q`), or
3. without labels, minimising ``mean |h_last(ft) − h_last(pruned)|`` (:func:`select_q_unlabelled`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lifelong_delta.delta.dare import resolve_q, scale_of
from lifelong_delta.delta.masks import keep_mask
from lifelong_delta.delta.matching import is_excluded

__all__ = [
    "MaskedDelta",
    "QSearchResult",
    "default_coarse_grid",
    "select_q_grid",
    "select_q_unlabelled",
]


@dataclass
class QSearchResult:
    """Outcome of a q search.

    Attributes:
        q: The chosen q.
        table: ``[(q, value), ...]`` for every evaluated candidate, in evaluation order.
    """

    q: float
    table: list[tuple[float, float]] = field(default_factory=list)


class MaskedDelta:
    """The DARE-masked delta of a model, built once per ``(p, seed)``, rescaled cheaply per q.

    Per tensor it holds the pretrained tensor (as given), the fp32 delta ``θ_ft − θ_pre`` and the bool
    keep-mask of :func:`lifelong_delta.delta.masks.keep_mask`. ``apply_`` with ``q = 1 - p`` reproduces
    :func:`lifelong_delta.delta.dare.dare_merge` bit for bit.

    Attributes:
        p: Drop rate.
        seed: Mask seed.
        names: Pruned tensor names, in state-dict order.
    """

    def __init__(
        self,
        p: float,
        seed: int,
        base: dict[str, torch.Tensor],
        delta: dict[str, torch.Tensor],
        keep: dict[str, torch.Tensor],
        dtypes: dict[str, torch.dtype],
    ) -> None:
        self.p, self.seed = p, seed
        self.base, self.delta, self.keep, self.dtypes = base, delta, keep, dtypes
        self.names = list(delta)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        base_sd: Mapping[str, torch.Tensor],
        ft_sd: Mapping[str, torch.Tensor],
        p: float,
        *,
        seed: int = 0,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        keep_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> MaskedDelta:
        """Mask every floating tensor present in both state dicts and matched by include/exclude globs.

        Args:
            base_sd: Pretrained state dict ``θ_pre`` (tensors are referenced, not copied).
            ft_sd: Fine-tuned state dict ``θ_ft``.
            p: Drop rate in ``[0, 1)``.
            seed: Mask seed (same masks as :func:`~lifelong_delta.delta.dare.dare` for this seed).
            include: Globs of tensor names to prune.
            exclude: Globs of tensor names to leave alone.
            keep_fn: ``keep_fn(name, fp32 delta) -> bool mask`` of the delta's shape; default DARE's
                :func:`~lifelong_delta.delta.masks.keep_mask`. Pass
                ``lambda n, d: keep_mask_for(n, d, spec)`` (:mod:`lifelong_delta.delta.methods`) to search q for
                magnitude, WANDA or structural pruning.

        Raises:
            ValueError: shape mismatch or non-finite delta (naming the tensor), bad ``p``.
        """
        resolve_q(p, None)
        base, delta, keep, dtypes = {}, {}, {}, {}
        for name, ft in ft_sd.items():
            if name not in base_sd or not ft.is_floating_point() or not base_sd[name].is_floating_point():
                continue
            if not any(fnmatch.fnmatchcase(name, pat) for pat in include) or is_excluded(name, exclude):
                continue
            b = base_sd[name]
            if b.shape != ft.shape:
                raise ValueError(f"tensor {name!r}: base shape {tuple(b.shape)} != fine-tuned shape {tuple(ft.shape)}")
            d = ft.detach().to(torch.float32) - b.detach().to(device=ft.device, dtype=torch.float32)
            if not torch.isfinite(d).all():
                raise ValueError(f"tensor {name!r} has non-finite delta entries (NaN/inf in base or fine-tuned)")
            base[name], delta[name], dtypes[name] = b.detach(), d, ft.dtype
            if keep_fn is None:
                keep[name] = keep_mask(d.numel(), p, seed=seed, name=name, device=d.device).view(d.shape)
            else:
                keep[name] = keep_fn(name, d)
        return cls(p, seed, base, delta, keep, dtypes)

    def kept(self, name: str) -> torch.Tensor:
        """fp32 kept delta entries of ``name`` (unscaled; zeros where dropped)."""
        return torch.where(self.keep[name], self.delta[name], torch.zeros((), device=self.delta[name].device))

    @torch.no_grad()
    def merged(self, name: str, q: float) -> torch.Tensor:
        """``θ_pre + kept / q`` for one tensor, in the fine-tuned dtype (not in place).

        Same arithmetic as :func:`~lifelong_delta.delta.dare.dare_merge`: kept entries are
        ``b + d * float32(1/q)`` in fp32, dropped entries are exactly ``b``.
        """
        d = self.delta[name]
        b = self.base[name].to(device=d.device, dtype=torch.float32)
        return torch.where(self.keep[name], b + d * scale_of(q), b).to(self.dtypes[name])

    @torch.no_grad()
    def apply_(
        self,
        target: nn.Module | dict[str, torch.Tensor],
        q: float | Mapping[str, float],
        *,
        force: bool = False,
    ) -> None:
        """Write ``θ = θ_pre + kept / q`` into ``target`` IN PLACE (module parameters/buffers or state dict).

        Args:
            target: Module (matched by ``state_dict`` names) or state dict to modify in place.
            q: One q for all tensors, or ``{name: q}`` covering every pruned tensor.
            force: Allow ``q`` outside ``[1 - p, 1]``.

        Raises:
            ValueError: bad q, a per-tensor q dict that misses a tensor, or a target without a tensor.
        """
        if isinstance(q, Mapping):
            missing = [n for n in self.names if n not in q]
            if missing:
                raise ValueError(f"q: no value for tensor {missing[0]!r} ({len(missing)} tensors missing)")
            qs = {n: resolve_q(self.p, float(q[n]), force=force, name=n) for n in self.names}
        else:
            q0 = resolve_q(self.p, q, force=force)
            qs = {n: q0 for n in self.names}
        dest = target.state_dict(keep_vars=True) if isinstance(target, nn.Module) else target
        absent = [n for n in self.names if n not in dest]
        if absent:
            raise ValueError(f"target has no tensor {absent[0]!r} ({len(absent)} pruned tensors missing)")
        for n in self.names:
            dest[n].data.copy_(self.merged(n, qs[n]))


def default_coarse_grid(p: float, n: int = 6) -> list[float]:
    """``n`` evenly spaced q in ``[1 - p, 1]`` (both ends included)."""
    resolve_q(p, None)
    if n < 2:
        raise ValueError(f"n={n}: a coarse grid needs at least 2 points")
    lo = 1.0 - p
    return [lo + (1.0 - lo) * i / (n - 1) for i in range(n)]


def select_q_grid(
    evaluate: Callable[[float], float] | Callable[[list[float]], Sequence[float]],
    p: float,
    coarse: Sequence[float] | None = None,
    fine_steps: int = 5,
    *,
    mode: Literal["max", "min"] = "max",
    batched: bool = False,
) -> QSearchResult:
    """Global q by a coarse grid over ``[1 - p, 1]`` and then a fine grid around the best coarse q.

    Args:
        evaluate: ``evaluate(q)`` returns the validation metric with the model rescaled by 1/q; with
            ``batched``, ``evaluate([q, ...])`` returns the metrics of several q's at once (a layer-by-layer pass
            runs them side by side).
        p: Drop rate.
        coarse: Coarse candidates (default :func:`default_coarse_grid`).
        fine_steps: Number of fine candidates evenly spaced strictly between the best coarse q's
            neighbours (0: none); a candidate equal to an evaluated q is not evaluated again.
        mode: Maximise (accuracy) or minimise (loss, distance) the metric.
        batched: ``evaluate`` takes a list of q's (the coarse grid, then the fine grid).

    Returns:
        :class:`QSearchResult` with the best q and the full table.

    Raises:
        ValueError: empty grid, ``fine_steps < 0``, bad ``mode``, or a non-finite metric.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not one of 'max', 'min'")
    if fine_steps < 0:
        raise ValueError(f"fine_steps={fine_steps} must be >= 0")
    grid = sorted({round(float(x), 12) for x in (coarse if coarse is not None else default_coarse_grid(p))})
    if not grid:
        raise ValueError("coarse: the q grid is empty")
    sign = 1.0 if mode == "max" else -1.0
    table: list[tuple[float, float]] = []
    seen: dict[float, float] = {}

    def run(qs: list[float]) -> None:
        new = [q for q in dict.fromkeys(round(q, 12) for q in qs) if q not in seen]  # each q once
        values = list(evaluate(new)) if batched and new else [evaluate(q) for q in new]  # type: ignore[arg-type]
        for q, v in zip(new, values, strict=True):
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"evaluate({q:g}) returned {v}; the metric must be a finite number")
            seen[q] = v
            table.append((q, v))

    run(grid)
    best = max(grid, key=lambda q: sign * seen[q])
    i = grid.index(best)
    lo = grid[i - 1] if i > 0 else best
    hi = grid[i + 1] if i + 1 < len(grid) else best
    if fine_steps and hi > lo:
        fine = [round(lo + (hi - lo) * k / (fine_steps + 1), 12) for k in range(1, fine_steps + 1)]
        run(fine)
        best = max([best, *fine], key=lambda q: sign * seen[q])
    return QSearchResult(q=best, table=table)


def select_q_unlabelled(
    model: nn.Module,
    masked: MaskedDelta,
    batches: Iterable[Any],
    hidden_fn: Callable[[nn.Module, Any], torch.Tensor],
    p: float | None = None,
    grid: Sequence[float] | None = None,
    fine_steps: int = 5,
) -> QSearchResult:
    """q minimising ``mean |h_last(ft) − h_last(pruned)|`` over calibration batches (no labels).

    ``model`` must hold the fine-tuned weights on entry; they are restored on exit, so the model is
    unchanged (apply the chosen q with ``masked.apply_``).

    Args:
        model: Fine-tuned model.
        masked: Masked delta of that model against its pretrained weights.
        batches: Calibration batches (re-iterated for every candidate; pass a list).
        hidden_fn: ``hidden_fn(model, batch)`` → last hidden states.
        p: Drop rate (default ``masked.p``).
        grid: Coarse candidates (default :func:`default_coarse_grid`).
        fine_steps: Fine candidates around the best coarse q.

    Returns:
        :class:`QSearchResult` whose table holds ``(q, mean |Δh|)``.
    """
    p = masked.p if p is None else p
    batches = list(batches)
    if not batches:
        raise ValueError("batches: pass at least one calibration batch")
    sd = model.state_dict(keep_vars=True)
    saved = {n: sd[n].detach().clone() for n in masked.names}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = [hidden_fn(model, b).detach().to(torch.float32) for b in batches]

        def distance(q: float) -> float:
            masked.apply_(model, q, force=True)
            diffs = [(hidden_fn(model, b).to(torch.float32) - r).abs().mean() for b, r in zip(batches, ref)]
            return float(torch.stack(diffs).mean())

        try:
            return select_q_grid(distance, p, grid, fine_steps, mode="min")
        finally:
            for n, t in saved.items():
                sd[n].data.copy_(t)
            model.train(was_training)
