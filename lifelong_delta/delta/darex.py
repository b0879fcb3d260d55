"""DAREx-q: DARE with the rescale 1/q instead of 1/(1-p), and three ways to choose q.

Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models", arXiv 2410.09344.

Build the masked delta once per seed (:meth:`MaskedDelta.build`); after that each q candidate costs only
a rescale (:meth:`MaskedDelta.apply_`) and an evaluation. q is chosen

1. on a labelled metric with a coarse-then-fine global grid (:func:`select_q_grid`),
2. per layer, analytically from ``c_ij = Δw_ij · mean(x_j)`` on calibration inputs: the authors' tail-bound
   objective (:func:`analytic_q_per_layer`, taken from their code at https://github.com/vengdeng/DAREx) or this
   project's parameter-free minimum-MSE closed form (:func:`min_mse_q_per_layer`), or
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
from lifelong_delta.delta.methods import is_excluded

__all__ = [
    "MaskedDelta",
    "QSearchResult",
    "select_q_grid",
    "analytic_q_per_layer",
    "analytic_row_q",
    "bernoulli_subgaussian_phi",
    "min_mse_q_per_layer",
    "select_q_unlabelled",
    "default_coarse_grid",
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

    def __init__(self, p: float, seed: int, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                 keep: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> None:
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
                raise ValueError(f"tensor {name!r}: base shape {tuple(b.shape)} != fine-tuned shape "
                                 f"{tuple(ft.shape)}")
            d = ft.detach().to(torch.float32) - b.detach().to(device=ft.device, dtype=torch.float32)
            if not torch.isfinite(d).all():
                raise ValueError(f"tensor {name!r} has non-finite delta entries "
                                 "(NaN/inf in base or fine-tuned)")
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
    evaluate: Callable[[float], float],
    p: float,
    coarse: Sequence[float] | None = None,
    fine_steps: int = 5,
    *,
    mode: Literal["max", "min"] = "max",
) -> QSearchResult:
    """Global q by a coarse grid over ``[1 - p, 1]`` and then a fine grid around the best coarse q.

    Args:
        evaluate: ``evaluate(q)`` returns the validation metric with the model rescaled by 1/q.
        p: Drop rate.
        coarse: Coarse candidates (default :func:`default_coarse_grid`).
        fine_steps: Number of fine candidates evenly spaced strictly between the best coarse q's
            neighbours (0: none); a candidate equal to an evaluated q is not evaluated again.
        mode: Maximise (accuracy) or minimise (loss, distance) the metric.

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

    def run(q: float) -> float:
        q = round(q, 12)  # candidates that coincide up to rounding are evaluated once
        if q not in seen:
            v = float(evaluate(q))
            if v != v:
                raise ValueError(f"evaluate({q:g}) returned NaN; the metric must be a finite number")
            seen[q] = v
            table.append((q, v))
        return seen[q]

    best = max(grid, key=lambda q: sign * run(q))
    i = grid.index(best)
    lo = grid[i - 1] if i > 0 else best
    hi = grid[i + 1] if i + 1 < len(grid) else best
    if fine_steps and hi > lo:
        fine = [lo + (hi - lo) * k / (fine_steps + 1) for k in range(1, fine_steps + 1)]
        best = max([best, *(round(q, 12) for q in fine)], key=lambda q: sign * run(q))
    return QSearchResult(q=best, table=table)


def bernoulli_subgaussian_phi(p: float) -> float:
    """``Φ(p) = (1 − 2p) / log((1 − p) / p)``, twice the optimal sub-Gaussian variance proxy of a Bernoulli(p).

    ``Φ(0.5) = 1/2`` (the limit; the formula is 0/0 there). Used by :func:`analytic_q_per_layer`.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: Φ(p) needs 0 < p < 1")
    if abs(p - 0.5) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def _layer_contributions(masked: MaskedDelta, name: str, xbar: torch.Tensor) -> torch.Tensor:
    """``c [out, in(+1)]``: ``Δw_ij · mean(x_j)``, with the layer's bias delta appended as a column (input 1)."""
    d = masked.delta[name]
    c = d.double() * xbar.to(device=d.device, dtype=torch.float64)[None, :]
    bias = name[: -len("weight")] + "bias" if name.endswith("weight") else None
    if bias is not None and bias in masked.delta and masked.delta[bias].shape == (d.shape[0],):
        c = torch.cat([c, masked.delta[bias].double()[:, None]], dim=1)
    return c


_Q_BLOCK = 64  # q values per block of :func:`analytic_row_q`'s scan


def analytic_row_q(
    c: torch.Tensor,
    p: float,
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
    step: float = 0.001,
) -> torch.Tensor:
    """Per-output-row q of DAREx-q's analytic mode: the grid q minimising a tail bound on the row's output change.

    With ``m_ij ~ Bernoulli(1 − p)`` the pruned layer's output change on the mean input is
    ``h_i = Σ_j c_ij (1 − m_ij / q)``. Bounding its moment generating function with the sub-Gaussian proxy of a
    Bernoulli (:func:`bernoulli_subgaussian_phi`) gives, for a free parameter ``η > 0``, the objective

        F_i(q) = | η · (1 − (1 − p)/q) · Σ_j c_ij  +  η² · Φ(p) · Σ_j c_ij² / (4 q²)  +  log(2 / (1 − γ)) |

    (η times the high-probability bound on ``h_i`` at confidence γ). q runs over the grid
    ``(1 − p), (1 − p) + step, …, 0.998`` (``step = 0.001``; 1 − p rounded up to the grid, where the authors' code
    rounds down); each row keeps the q of its smallest ``F_i`` (ties go to the larger q). The scan stops early once
    ``stop_fraction`` of the rows have seen ``F_i`` stop decreasing, which keeps rows dominated by outlier features
    from dragging the scan to q = 1.

    This is the algorithm of the authors' code, ``analytical_resolve_new`` in ``utils/analyticalq.py`` of
    https://github.com/vengdeng/DAREx (commit 8f5ced8), computed here in float64 instead of float16.

    Args:
        c: ``[out, k]`` contributions ``c_ij``.
        p: Drop rate in ``(0, 1)``.
        eta: The bound's free parameter η (the authors tune it on validation data per task; their README uses
            0.27 – 1.01 for BERT on GLUE).
        gamma: Confidence of the bound (the authors use 0.95).
        stop_fraction: Fraction of rows past their minimum at which the scan stops (the authors use 0.8);
            None scans the whole grid (each row then gets the grid argmin of ``F_i``).
        step: Grid step of q.

    Returns:
        ``[out]`` float64 q per row.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: the analytic q needs 0 < p < 1")
    if not eta > 0.0:
        raise ValueError(f"eta={eta} must be > 0")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma={gamma} must be in (0, 1)")
    c = c.double()
    s1, s2 = c.sum(1), c.pow(2).sum(1)
    phi, const = bernoulli_subgaussian_phi(p), math.log(2.0 / (1.0 - gamma))
    n_steps = round(1.0 / step)
    ks = torch.arange(math.ceil((1.0 - p) * n_steps - 1e-9), n_steps - 1, dtype=torch.float64)
    best_q = torch.full_like(s1, 1.0 - p)
    best = torch.full_like(s1, math.inf)
    stopped = torch.zeros_like(s1, dtype=torch.bool)
    # The scan of the authors' code, one q at a time, is evaluated a block of q values at once: in a block, a
    # q improves a row when its F is <= the minimum over every earlier q (the running minimum before it), and
    # the row has stopped from the first q whose F is >= that minimum. The scan ends at the first q after which
    # stop_fraction of the rows have stopped; the rows keep the last improving q up to there. Same values as the
    # sequential loop (the same float64 operations per element), ~100x fewer kernel launches.
    for start in range(0, len(ks), _Q_BLOCK):
        q = (ks[start : start + _Q_BLOCK] * step)[:, None]  # [b, 1]
        res = (eta * (1.0 - (1.0 - p) / q) * s1 + eta**2 * phi * s2 / (4.0 * q * q) + const).abs()  # [b, rows]
        prev_min = torch.cat([best[None], res[:-1]]).cummin(0).values
        improved, worse = res <= prev_min, res >= prev_min
        stop_now = (stopped[None] | worse.cummax(0).values)  # [b, rows]: stopped after each q
        end = len(q)
        if stop_fraction is not None:
            hit = (stop_now.double().mean(1) >= stop_fraction).nonzero()
            if len(hit):
                end = int(hit[0]) + 1
        steps = torch.arange(end, dtype=torch.long)[:, None]
        last = torch.where(improved[:end], steps, -1).max(0).values  # last improving q of each row, or -1
        best_q = torch.where(last >= 0, q[:end, 0][last.clamp(min=0)], best_q)
        best = torch.minimum(best, res[:end].min(0).values)
        stopped = stop_now[end - 1]
        if end < len(q):
            break
    return best_q


def analytic_row_q_sequential(
    c: torch.Tensor, p: float, *, eta: float = 0.37, gamma: float = 0.95, stop_fraction: float | None = 0.8,
    step: float = 0.001,
) -> torch.Tensor:
    """:func:`analytic_row_q` computed as the authors' code does, one q per iteration: the reference that the
    blocked scan is tested and benchmarked against (same arguments, same result bit for bit, slower)."""
    c = c.double()
    s1, s2 = c.sum(1), c.pow(2).sum(1)
    phi, const = bernoulli_subgaussian_phi(p), math.log(2.0 / (1.0 - gamma))
    best_q, best = torch.full_like(s1, 1.0 - p), torch.full_like(s1, math.inf)
    stopped = torch.zeros_like(s1, dtype=torch.bool)
    for k in range(math.ceil((1.0 - p) * round(1.0 / step) - 1e-9), round(1.0 / step) - 1):
        q = k * step
        res = (eta * (1.0 - (1.0 - p) / q) * s1 + eta**2 * phi * s2 / (4.0 * q * q) + const).abs()
        improved, worse = res <= best, res >= best
        best = torch.where(improved, res, best)
        best_q = torch.where(improved, torch.full_like(best_q, q), best_q)
        stopped |= worse
        if stop_fraction is not None and stopped.double().mean() >= stop_fraction:
            break
    return best_q


def analytic_q_per_layer(
    masked: MaskedDelta,
    mean_inputs: Mapping[str, torch.Tensor],
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
) -> dict[str, float]:
    """DAREx-q's analytic per-layer q (Deng et al., arXiv 2410.09344), as implemented by the authors.

    For each weight matrix with a ``mean_inputs`` entry, ``c_ij = Δw_ij · mean(x_j)`` (the layer's bias delta
    appended as one more column with input 1), every output row gets q from :func:`analytic_row_q`, and the layer's q
    is the mean over rows. The layer's bias gets the layer's q; every other pruned tensor (embeddings, norms, a
    weight without calibration inputs) gets the mean of the layer qs, or ``1 − p`` when no layer has one. This
    follows ``optimal_q_calculation`` and ``rescale_q`` in https://github.com/vengdeng/DAREx (``utils/analyticalq.py``,
    ``utils/deltaprune.py``).

    Source note: the objective is taken from the authors' code; the paper's own text (its equation numbers) was not
    available to us, so no equation is cited here. The parameter-free alternative derived in this project is
    :func:`min_mse_q_per_layer`.

    Args:
        masked: The masked delta (supplies p and Δw).
        mean_inputs: ``{weight name: [in] mean(x_j)}`` e.g. from
            :func:`lifelong_delta.delta.importance.collect_input_stats`.
        eta: The bound's free parameter η (see :func:`analytic_row_q`).
        gamma: Confidence of the bound.
        stop_fraction: Early-stop fraction of the q scan.

    Returns:
        ``{name: q}`` for every tensor of ``masked``.

    Raises:
        ValueError: a mean-input vector whose length is not the weight's ``in`` dimension, or bad eta/gamma.
    """
    p = masked.p
    layer_q: dict[str, float] = {}
    for name in masked.names:
        d, xbar = masked.delta[name], mean_inputs.get(name)
        if xbar is None or d.dim() != 2:
            continue
        if xbar.shape != (d.shape[1],):
            raise ValueError(f"mean_inputs[{name!r}] has shape {tuple(xbar.shape)}, expected [{d.shape[1]}]")
        if p == 0.0:
            layer_q[name] = 1.0
            continue
        rows = analytic_row_q(_layer_contributions(masked, name, xbar), p, eta=eta, gamma=gamma,
                              stop_fraction=stop_fraction)
        layer_q[name] = float(rows.mean())
    fallback = sum(layer_q.values()) / len(layer_q) if layer_q else 1.0 - p
    out: dict[str, float] = {}
    for name in masked.names:
        weight = name[: -len("bias")] + "weight" if name.endswith("bias") else None
        out[name] = layer_q.get(name, layer_q.get(weight, fallback) if weight else fallback)
    return out


def min_mse_q_per_layer(
    masked: MaskedDelta,
    mean_inputs: Mapping[str, torch.Tensor],
    *,
    clip: bool = True,
) -> dict[str, float]:
    """Per-layer q minimising the expected squared output change (this project's derivation, not the paper's).

    For output unit i and the mean calibration input x̄, the change of the layer output caused by pruning is
    ``h_i = Σ_j c_ij (1 − m_ij / q)`` with ``c_ij = Δw_ij · mean(x_j)`` and ``m_ij ~ Bernoulli(1 − p)``. With
    ``S1_i = Σ_j c_ij`` and ``S2_i = Σ_j c_ij²``:

        E[h_i]   = (1 − (1 − p)/q) · S1_i          (bias, zero at q = 1 − p)
        Var[h_i] = p (1 − p) / q² · S2_i           (variance, shrinks as q grows)

    Minimising ``Σ_i E[h_i²]`` over ``u = 1/q`` gives the closed form

        q* = (1 − p) + p · Σ_i S2_i / Σ_i S1_i²

    clipped to ``[1 − p, 1]`` (``q = 1`` when ``Σ_i S1_i² = 0``). Unlike :func:`analytic_q_per_layer` it has no free
    parameter. Tensors without a ``mean_inputs`` entry and non-2-D tensors (biases, norms, convs) get ``1 − p``.

    Args:
        masked: The masked delta (supplies p and Δw).
        mean_inputs: ``{weight name: [in] mean(x_j)}``.
        clip: Clip q to ``[1 − p, 1]``.

    Returns:
        ``{name: q}`` for every tensor of ``masked``.

    Raises:
        ValueError: a mean-input vector whose length is not the weight's ``in`` dimension.
    """
    p = masked.p
    out: dict[str, float] = {}
    for name in masked.names:
        d = masked.delta[name]
        xbar = mean_inputs.get(name)
        if xbar is None or d.dim() != 2:
            out[name] = 1.0 - p
            continue
        if xbar.shape != (d.shape[1],):
            raise ValueError(f"mean_inputs[{name!r}] has shape {tuple(xbar.shape)}, expected [{d.shape[1]}]")
        c = d * xbar.to(device=d.device, dtype=torch.float32)[None, :]  # c_ij = Δw_ij · mean(x_j)
        s1sq = c.sum(1).double().pow(2).sum().item()  # Σ_i S1_i²
        s2 = c.double().pow(2).sum().item()  # Σ_i S2_i
        q = (1.0 - p) + p * s2 / s1sq if s1sq > 0 else 1.0
        out[name] = min(max(q, 1.0 - p), 1.0) if clip else q
    return out


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
