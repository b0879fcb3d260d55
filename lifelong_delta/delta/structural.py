"""Structural delta pruning: drop whole rows or columns of each delta matrix (arXiv 2410.09344, §5).

Rows/columns are chosen at random (from the counter-based stream of :mod:`masks`, so the choice is a
pure function of ``(seed, name)``) or by importance (smallest L2 norm of the delta row/column, times
``‖x_j‖₂`` for columns when input norms are given). The kept delta is rescaled DAREx-q style by ``1/q``
(``q=None`` → ``1 - p``).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["structural_keep", "structural_prune"]

Axis = Literal["rows", "columns"]
Select = Literal["random", "importance"]


def structural_keep(
    delta: torch.Tensor,
    p: float,
    *,
    axis: Axis = "rows",
    select: Select = "random",
    seed: int = 0,
    name: str = "",
    input_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool keep-vector over the rows (``[shape[0]]``) or columns (``[numel / shape[0]]``) of ``delta``.

    Exactly ``n - round((1 - p) · n)`` of the ``n`` rows/columns are dropped: for ``select="random"``
    those with the smallest counter-based uniforms of the stream ``(seed, name + "#rows"|"#columns")``,
    for ``select="importance"`` those with the smallest delta L2 norm (columns weighted by
    ``input_norms``). Ties are broken by index (stable sort), so the choice is deterministic.

    Returns:
        ``BoolTensor[n]`` on ``delta.device``, True = keep.
    """
    from lifelong_delta.delta.dare import resolve_q
    from lifelong_delta.delta.importance import n_keep
    from lifelong_delta.delta.masks import uniform

    resolve_q(p, None, name=name)
    if axis not in ("rows", "columns"):
        raise ValueError(f"axis={axis!r} is not one of 'rows', 'columns'")
    if select not in ("random", "importance"):
        raise ValueError(f"select={select!r} is not one of 'random', 'importance'")
    mat = _as_matrix(delta)
    dim = 0 if axis == "rows" else 1
    n = mat.shape[dim]
    if select == "random":
        scores = uniform(n, seed=seed, name=f"{name}#{axis}").to(delta.device)
    else:
        m = mat.detach().to(torch.float32)
        scores = m.norm(dim=1 - dim)
        if input_norms is not None and axis == "columns" and delta.dim() == 2:
            if input_norms.shape != (n,):
                raise ValueError(
                    f"input_norms for tensor {name!r} has shape {tuple(input_norms.shape)}, expected [{n}]"
                )
            scores = scores * input_norms.to(device=scores.device, dtype=torch.float32)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[: n_keep(n, p)]] = True
    return keep


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    """``[shape[0], -1]`` view; 0/1-D tensors become a column ``[n, 1]`` (each element is a row)."""
    if delta.dim() < 2:
        return delta.reshape(-1, 1)
    return delta.reshape(delta.shape[0], -1)


@torch.no_grad()
def structural_prune(
    delta: torch.Tensor,
    p: float,
    *,
    axis: Axis = "rows",
    select: Select = "random",
    seed: int = 0,
    name: str = "",
    q: float | None = None,
    input_norms: torch.Tensor | None = None,
    force: bool = False,
) -> torch.Tensor:
    """Drop ``round(p·n)`` whole rows or columns of a delta and rescale the rest by ``1/q``.

    N-D tensors are viewed as ``[shape[0], -1]``; 0/1-D tensors are pruned element-wise (each element is
    a row) whatever the axis.

    Args:
        delta: Delta tensor.
        p: Drop rate in ``[0, 1)``: fraction of rows/columns dropped.
        axis: ``"rows"`` (output units) or ``"columns"`` (input features).
        select: ``"random"`` (counter-based draw) or ``"importance"`` (drop the smallest-norm ones).
        seed: Seed for ``select="random"``.
        name: Tensor name (keys the random draw; named in errors).
        q: Rescale of the kept part (``None`` → ``1 - p``).
        input_norms: Optional ``[in]`` ‖x_j‖₂ weighting column importance.
        force: Allow ``q`` outside ``[1 - p, 1]``.

    Returns:
        fp32 pruned delta of ``delta.shape``.

    Raises:
        ValueError: bad ``p``/``q``/``axis``/``select``, or non-finite delta (naming the tensor).
    """
    from lifelong_delta.delta.dare import resolve_q, scale_of

    scale = scale_of(resolve_q(p, q, force=force, name=name))
    d = delta.detach().to(torch.float32)
    if not torch.isfinite(d).all():
        raise ValueError(f"tensor {name!r} has non-finite delta entries (NaN/inf in base or fine-tuned)")
    if delta.dim() < 2:
        axis = "rows"
    keep = structural_keep(d, p, axis=axis, select=select, seed=seed, name=name, input_norms=input_norms)
    mat = _as_matrix(d)
    keep2 = keep[:, None] if axis == "rows" else keep[None, :]
    return torch.where(keep2, mat * scale, torch.zeros((), device=mat.device)).view(delta.shape)
