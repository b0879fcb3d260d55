"""DAREx-q's per-layer q from calibration activations, with no labelled metric.

Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models", arXiv 2410.09344.

For a weight matrix with delta ``Δw`` and mean calibration input ``x̄``, pruning changes output unit i on ``x̄`` by
``h_i = Σ_j c_ij (1 − m_ij / q)`` with ``c_ij = Δw_ij · x̄_j`` and ``m_ij ~ Bernoulli(1 − p)``. Two ways to pick q
from ``c``:

* :func:`analytic_q_per_layer`: the authors' tail-bound objective, per output row, taken from their code at
  https://github.com/vengdeng/DAREx (free parameter η), in their float16 arithmetic by default (see
  :func:`analytic_row_q` for why that matters);
* :func:`min_mse_q_per_layer`: this project's closed form minimising ``Σ_i E[h_i²]`` (no free parameter).

:class:`lifelong_delta.delta.darex.MaskedDelta` supplies ``p`` and ``Δw``; the chosen qs go back to its ``apply_``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lifelong_delta.delta.choices import Arithmetic
from lifelong_delta.delta.darex import MaskedDelta

__all__ = [
    "Arithmetic",
    "analytic_q_per_layer",
    "analytic_row_q",
    "analytic_row_q_sequential",
    "analytic_weight_q",
    "bernoulli_subgaussian_phi",
    "min_mse_q_per_layer",
    "spread_weight_q",
]


def bernoulli_subgaussian_phi(p: float) -> float:
    """``Φ(p) = (1 − 2p) / log((1 − p) / p)``, twice the optimal sub-Gaussian variance proxy of a Bernoulli(p).

    ``Φ(0.5) = 1/2`` (the limit; the formula is 0/0 there). Used by :func:`analytic_q_per_layer`.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: Φ(p) needs 0 < p < 1")
    if abs(p - 0.5) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def _layer_contributions(
    masked: MaskedDelta, name: str, xbar: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``c [out, in(+1)]``: ``Δw_ij · mean(x_j)``, with the layer's bias delta appended as a column (input 1).

    Computed in ``dtype`` (the authors multiply in float32 and then round c to float16). ``xbar`` of shape
    ``[in, 1]`` marks a weight stored input-major (``[in, out]``, GPT-2's ``Conv1D``), which is read transposed.
    """
    d, xbar = _output_major(masked.delta[name], xbar)
    c = d.to(dtype) * xbar.to(device=d.device, dtype=dtype)[None, :]
    bias = name[: -len("weight")] + "bias" if name.endswith("weight") else None
    if bias is not None and bias in masked.delta and masked.delta[bias].shape == (d.shape[0],):
        c = torch.cat([c, masked.delta[bias].to(dtype)[:, None]], dim=1)
    return c


def _output_major(d: torch.Tensor, xbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δw [out, in], mean(x) [in])``: an input-major weight (``xbar`` of shape ``[in, 1]``) transposed."""
    return (d.T, xbar[:, 0]) if xbar.dim() == 2 else (d, xbar)


def _check_mean_inputs(name: str, d: torch.Tensor, xbar: torch.Tensor) -> None:
    want = (d.shape[0], 1) if xbar.dim() == 2 else (d.shape[1],)
    if xbar.shape != want:
        raise ValueError(f"mean_inputs[{name!r}] has shape {tuple(xbar.shape)}, expected {list(want)}")


_Q_BLOCK = 64  # q values per block of :func:`analytic_row_q`'s scan


def analytic_row_q(
    c: torch.Tensor,
    p: float,
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
    step: float = 0.001,
    arithmetic: Arithmetic = "float16",
    tie_rtol: float = 0.0,
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
    https://github.com/vengdeng/DAREx (commit 8f5ced8).

    ``arithmetic`` decides how it is computed, and the two give very different q on small deltas:

    * ``"float16"`` (default): as the authors' code does. c, its row sums and every term of ``F_i`` are float16
      tensors, and so is the running best. For small ``c_ij`` the objective is ``log(2/(1−γ)) ≈ 3.69`` plus terms
      below float16's resolution there (``2⁻⁹ ≈ 0.002``), so the second q ties with the first: a tie counts as an
      improvement *and* as "stopped", the scan ends, and the row keeps ``q = (1 − p) + step``, about DARE's rescale.
      Only rows whose terms are large enough to move the rounded objective get another q. In effect float16 is a
      tolerance on the improvement. This is the variant that reproduces the paper's claim on our MiniLM fine-tunes
      (docs/reproduction.md, finding 2).
    * ``"float64"``: the objective exactly, in float64, with no ties. Rows with ``Σ_j c_ij < 0`` then keep
      improving up to the end of the grid and rows with ``Σ_j c_ij > 0`` stay near ``1 − p``, so on small deltas
      a layer's mean q is about 0.5 whatever p is, which prunes far worse than DARE. Blocked scan, below.

    ``tie_rtol > 0`` makes the tolerance explicit: a q whose ``F_i`` is within ``tie_rtol · best`` of the row's
    best so far counts as a tie (improved *and* stopped), in either arithmetic. In float64, ``tie_rtol`` between
    1e-4 and 2e-3 behaves like float16 on our fine-tunes (docs/reproduction.md, finding 2): the effect is the
    tolerance, not the precision.

    Args:
        c: ``[out, k]`` contributions ``c_ij``.
        p: Drop rate in ``(0, 1)``.
        eta: The bound's free parameter η (the authors tune it on validation data per task; their README uses
            0.27 – 1.01 for BERT on GLUE).
        gamma: Confidence of the bound (the authors use 0.95).
        stop_fraction: Fraction of rows past their minimum at which the scan stops (the authors use 0.8);
            None scans the whole grid (each row then gets the grid argmin of ``F_i``).
        step: Grid step of q.
        arithmetic: ``"float16"`` (the authors') or ``"float64"``, see above.
        tie_rtol: Relative tolerance under which two values of ``F_i`` tie (0: exact comparisons).

    Returns:
        ``[out]`` float64 q per row.
    """
    _check_analytic_args(p, eta=eta, gamma=gamma, tie_rtol=tie_rtol, arithmetic=arithmetic)
    if arithmetic == "float16" or tie_rtol > 0:  # ties make the scan path-dependent: no blocking
        dtype = torch.float16 if arithmetic == "float16" else torch.float64
        return _sequential_scan(
            c, p, eta=eta, gamma=gamma, stop_fraction=stop_fraction, step=step, dtype=dtype, tie_rtol=tie_rtol
        )
    return _blocked_scan(c, p, eta=eta, gamma=gamma, stop_fraction=stop_fraction, step=step)


def _check_analytic_args(p: float, *, eta: float, gamma: float, tie_rtol: float, arithmetic: str) -> None:
    """Raise a ``ValueError`` naming the first of :func:`analytic_row_q`'s settings that is out of range."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: the analytic q needs 0 < p < 1")
    if not eta > 0.0:
        raise ValueError(f"eta={eta} must be > 0")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma={gamma} must be in (0, 1)")
    if not (math.isfinite(tie_rtol) and 0.0 <= tie_rtol < 1.0):
        raise ValueError(f"tie_rtol={tie_rtol} must be in [0, 1)")
    if arithmetic not in ("float16", "float64"):
        raise ValueError(f"arithmetic={arithmetic!r}: choose 'float16' (the authors') or 'float64'")


def _blocked_scan(
    c: torch.Tensor, p: float, *, eta: float, gamma: float, stop_fraction: float | None, step: float
) -> torch.Tensor:
    """:func:`analytic_row_q` in exact float64 with no tie tolerance: ``[out]`` q per row of ``c`` (``[out, k]``).

    The scan of the authors' code, one q at a time, is evaluated a block of q values at once: in a block, a q
    improves a row when its F is <= the minimum over every earlier q (the running minimum before it), and the row has
    stopped from the first q whose F is >= that minimum. The scan ends at the first q after which ``stop_fraction``
    of the rows have stopped; the rows keep the last improving q up to there. Same values as the sequential loop (the
    same float64 operations per element), ~100x fewer kernel launches.
    """
    c = c.double()
    s1, s2 = torch.sum(c, dim=1), torch.sum(c**2, dim=1)
    phi, const = bernoulli_subgaussian_phi(p), math.log(2.0 / (1.0 - gamma))
    n_steps = round(1.0 / step)
    ks = torch.arange(_grid_start(p, step), n_steps - 1, dtype=torch.float64)
    best_q = torch.full_like(s1, 1.0 - p)
    best = torch.full_like(s1, math.inf)
    stopped = torch.zeros_like(s1, dtype=torch.bool)
    for start in range(0, len(ks), _Q_BLOCK):
        q = (ks[start : start + _Q_BLOCK] * step)[:, None]  # [b, 1]
        res = _objective(s1, s2, p, q, eta, phi, const)  # [b, rows]
        prev_min = torch.cat([best[None], res[:-1]]).cummin(0).values
        improved, worse = res <= prev_min, res >= prev_min
        stop_now = stopped[None] | worse.cummax(0).values  # [b, rows]: stopped after each q
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


def _grid_start(p: float, step: float) -> int:
    """First grid index: 1 − p rounded up to the grid (the authors round down, which can start below 1 − p)."""
    return math.ceil((1.0 - p) * round(1.0 / step) - 1e-9)


def _objective(
    s1: torch.Tensor, s2: torch.Tensor, p: float, q: float | torch.Tensor, eta: float, phi: float, const: float
) -> torch.Tensor:
    """``F_i(q)`` in the authors' order of operations; the dtype of ``s1`` and ``s2`` is the arithmetic (Python
    floats times a float16 tensor stay float16). ``q`` is a float, or a ``[b, 1]`` float64 tensor for a block of
    q values (the same float64 operations per element as a Python float)."""
    term1 = (1 - (1 - p) / q) * s1
    term2 = eta**2 * phi * s2 / (4 * q**2) + const
    return abs(eta * term1 + term2)


def _sequential_scan(
    c: torch.Tensor,
    p: float,
    *,
    eta: float,
    gamma: float,
    stop_fraction: float | None,
    step: float,
    dtype: torch.dtype,
    tie_rtol: float = 0.0,
) -> torch.Tensor:
    """The authors' scan, one q per iteration, with c, the sums, the objective and the running best in ``dtype``.

    float16 is how their code computes it (and the running best starts at their 10 000); the row sums are taken
    once instead of at every q (the same values). In float16 the scan usually ends within a few q (ties stop it).
    """
    c = c.to(dtype)
    s1, s2 = torch.sum(c, dim=1), torch.sum(c**2, dim=1)
    phi, const = bernoulli_subgaussian_phi(p), math.log(2.0 / (1.0 - gamma))
    best_q = torch.full(s1.shape, 1.0 - p, dtype=torch.float64)
    best = torch.full(s1.shape, 10000.0 if dtype == torch.float16 else math.inf, dtype=dtype)
    stopped = torch.zeros(s1.shape, dtype=torch.bool)
    for k in range(_grid_start(p, step), round(1.0 / step) - 1):
        q = k * step
        res = _objective(s1, s2, p, q, eta, phi, const)
        improved, worse = res <= best, res >= best
        if tie_rtol > 0:
            tie = ((res - best).abs() <= tie_rtol * best) & torch.isfinite(best)
            improved, worse = improved | tie, worse | tie
        best = torch.where(improved, res, best)
        best_q = torch.where(improved, torch.full_like(best_q, q), best_q)
        stopped |= worse
        if stop_fraction is not None and stopped.double().mean() >= stop_fraction:
            break
    return best_q


def analytic_row_q_sequential(
    c: torch.Tensor,
    p: float,
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
    step: float = 0.001,
) -> torch.Tensor:
    """:func:`analytic_row_q` with ``arithmetic="float64"``, one q per iteration as the authors' code loops: the
    reference that the blocked scan is tested and benchmarked against (same result bit for bit, slower)."""
    return _sequential_scan(c, p, eta=eta, gamma=gamma, stop_fraction=stop_fraction, step=step, dtype=torch.float64)


def analytic_q_per_layer(
    masked: MaskedDelta,
    mean_inputs: Mapping[str, torch.Tensor],
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
    arithmetic: Arithmetic = "float16",
    tie_rtol: float = 0.0,
) -> dict[str, float]:
    """DAREx-q's analytic per-layer q (Deng et al., arXiv 2410.09344), as implemented by the authors.

    For each weight matrix with a ``mean_inputs`` entry, ``c_ij = Δw_ij · mean(x_j)`` (the layer's bias delta
    appended as one more column with input 1), every output row gets q from :func:`analytic_row_q`, and the layer's q
    is the mean over rows, clipped to ``[1 − p, 1]`` (the authors' does not clip; a float16 mean of rows at
    ``1 − p`` can land a rounding error below it). The layer's bias gets the layer's q; every other pruned tensor
    (embeddings, norms, a weight without calibration inputs) gets the mean of the layer qs, or ``1 − p`` when no
    layer has one. This follows ``optimal_q_calculation`` and ``rescale_q`` in https://github.com/vengdeng/DAREx
    (``utils/analyticalq.py``, ``utils/deltaprune.py``).

    Source note: the objective is taken from the authors' code; the paper's own text (its equation numbers) was not
    available to us, so no equation is cited here. The parameter-free alternative derived in this project is
    :func:`min_mse_q_per_layer`.

    Args:
        masked: The masked delta (supplies p and Δw).
        mean_inputs: ``{weight name: [in] mean(x_j)}`` e.g. from
            :func:`lifelong_delta.delta.importance.collect_input_stats`; ``[in, 1]`` for a weight stored
            input-major (``[in, out]``, GPT-2's ``Conv1D``).
        eta: The bound's free parameter η (see :func:`analytic_row_q`).
        gamma: Confidence of the bound.
        stop_fraction: Early-stop fraction of the q scan.
        arithmetic: ``"float16"`` as the authors' code, or ``"float64"`` (see :func:`analytic_row_q`).
        tie_rtol: Relative tie tolerance of the scan (see :func:`analytic_row_q`).

    Returns:
        ``{name: q}`` for every tensor of ``masked``.

    Raises:
        ValueError: a mean-input vector whose length is not the weight's ``in`` dimension, or bad eta/gamma.
    """
    layer_q = analytic_weight_q(
        masked, mean_inputs, eta=eta, gamma=gamma, stop_fraction=stop_fraction, arithmetic=arithmetic, tie_rtol=tie_rtol
    )
    return spread_weight_q(masked.names, layer_q, masked.p)


def analytic_weight_q(
    masked: MaskedDelta,
    mean_inputs: Mapping[str, torch.Tensor],
    *,
    eta: float = 0.37,
    gamma: float = 0.95,
    stop_fraction: float | None = 0.8,
    arithmetic: Arithmetic = "float16",
    tie_rtol: float = 0.0,
) -> dict[str, float]:
    """The q of each weight matrix of ``masked`` that has a ``mean_inputs`` entry (see
    :func:`analytic_q_per_layer`, which gives the other tensors theirs with :func:`spread_weight_q`)."""
    p = masked.p
    layer_q: dict[str, float] = {}
    for name in masked.names:
        d, xbar = masked.delta[name], mean_inputs.get(name)
        if xbar is None or d.dim() != 2:
            continue
        _check_mean_inputs(name, d, xbar)
        if p == 0.0:
            layer_q[name] = 1.0
            continue
        dtype = torch.float32 if arithmetic == "float16" else torch.float64
        rows = analytic_row_q(
            _layer_contributions(masked, name, xbar, dtype),
            p,
            eta=eta,
            gamma=gamma,
            stop_fraction=stop_fraction,
            arithmetic=arithmetic,
            tie_rtol=tie_rtol,
        )
        layer_q[name] = min(max(float(rows.mean()), 1.0 - p), 1.0)
    return layer_q


def spread_weight_q(names: Sequence[str], weight_q: Mapping[str, float], p: float) -> dict[str, float]:
    """``{name: q}`` for every tensor of ``names``: a weight's own q, a bias its weight's, any other tensor the
    mean of the weights' qs (summed in the order of ``names``), or ``1 − p`` when no weight has one."""
    qs = [weight_q[n] for n in names if n in weight_q]
    fallback = sum(qs) / len(qs) if qs else 1.0 - p
    out: dict[str, float] = {}
    for name in names:
        weight = name[: -len("bias")] + "weight" if name.endswith("bias") else None
        out[name] = weight_q.get(name, weight_q.get(weight, fallback) if weight else fallback)
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
        _check_mean_inputs(name, d, xbar)
        d, xbar = _output_major(d, xbar)
        c = d * xbar.to(device=d.device, dtype=torch.float32)[None, :]  # c_ij = Δw_ij · mean(x_j)
        s1sq = c.sum(1).double().pow(2).sum().item()  # Σ_i S1_i²
        s2 = c.double().pow(2).sum().item()  # Σ_i S2_i
        q = (1.0 - p) + p * s2 / s1sq if s1sq > 0 else 1.0
        out[name] = min(max(q, 1.0 - p), 1.0) if clip else q
    return out
