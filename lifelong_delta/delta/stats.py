"""Delta statistics: per-tensor mean, std, magnitude and norm of δ = θ_ft − θ_pre, and the nnz/norms of a pruned one.

DARE the Extreme (arXiv 2410.09344) traces DARE's failures to the mean and variance of the delta parameters; these
numbers feed ``lifelong-delta stats`` and the decision logic in :mod:`lifelong_delta.delta.recommend`. Pure tensor
functions; the name matching of two checkpoints is :mod:`.matching`, the summary of a prune run :mod:`.summary`.
No Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lifelong_delta.delta.matching import is_excluded, non_finite_error
from lifelong_delta.delta.summary import PruneStatsAccumulator, TensorPruneStats

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DeltaStats",
    "LayerStats",
    "check_finite",
    "layer_stats",
    "tensor_prune_stats",
]

_STATS_CHUNK = 1 << 22  # elements per chunk when measuring a pruned tensor (bounds the temporaries)


def check_finite(name: str, tensor: torch.Tensor, which: str) -> None:
    """Raise ``ValueError`` naming the tensor if it holds NaN or ±inf.

    Fast path: min and max (one reduction, which propagates NaN) are finite iff every entry is.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise non_finite_error(name, which, int((~torch.isfinite(tensor)).sum()))


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one delta tensor δ = θ_ft − θ_pre (computed in fp32, accumulated in fp64)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    sum: float
    sum_sq: float
    sum_abs: float
    max_abs: float
    base_sum_sq: float

    @property
    def mean(self) -> float:
        return self.sum / self.numel if self.numel else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of δ."""
        return math.sqrt(max(self.sum_sq / self.numel - self.mean**2, 0.0)) if self.numel else 0.0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.numel if self.numel else 0.0

    @property
    def norm(self) -> float:
        """‖δ‖₂."""
        return math.sqrt(self.sum_sq)

    @property
    def base_norm(self) -> float:
        """‖θ_pre‖₂."""
        return math.sqrt(self.base_sum_sq)

    @property
    def rel_norm(self) -> float:
        """‖δ‖₂ / ‖θ_pre‖₂ (inf for a nonzero delta on an all-zero base tensor)."""
        if self.base_sum_sq == 0:
            return 0.0 if self.sum_sq == 0 else math.inf
        return self.norm / self.base_norm


@torch.no_grad()
def layer_stats(name: str, base: torch.Tensor, finetuned: torch.Tensor) -> LayerStats:
    """Statistics of ``finetuned − base`` for one tensor.

    Args:
        name: Tensor name (only stored).
        base: θ_pre, any floating dtype. Shape ``(*S)``.
        finetuned: θ_ft, same shape ``(*S)``, any floating dtype.
    """
    b = base.float()
    delta = finetuned.float() - b
    return LayerStats(
        name=name,
        shape=tuple(delta.shape),
        numel=delta.numel(),
        sum=float(delta.sum(dtype=torch.float64)),
        sum_sq=float(delta.square().sum(dtype=torch.float64)),
        sum_abs=float(delta.abs().sum(dtype=torch.float64)),
        max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        base_sum_sq=float(b.square().sum(dtype=torch.float64)),
    )


@dataclass(frozen=True)
class DeltaStats:
    """Per-tensor and whole-model delta statistics. Whole-model numbers pool all elements of all tensors."""

    layers: tuple[LayerStats, ...]

    @classmethod
    def from_state_dicts(
        cls, base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], exclude: Sequence[str] = ()
    ) -> DeltaStats:
        """In-memory counterpart of :func:`lifelong_delta.delta.commands.stats` (handy in tests and notebooks)."""
        return cls(
            tuple(
                layer_stats(n, base[n], t)
                for n, t in finetuned.items()
                if t.is_floating_point() and n in base and not is_excluded(n, tuple(exclude))
            )
        )

    @staticmethod
    def pool(layers: Sequence[LayerStats], name: str = "(all)") -> LayerStats:
        """Pool several tensors' statistics as if they were one flat tensor."""
        return LayerStats(
            name=name,
            shape=(sum(s.numel for s in layers),),
            numel=sum(s.numel for s in layers),
            sum=sum(s.sum for s in layers),
            sum_sq=sum(s.sum_sq for s in layers),
            sum_abs=sum(s.sum_abs for s in layers),
            max_abs=max((s.max_abs for s in layers), default=0.0),
            base_sum_sq=sum(s.base_sum_sq for s in layers),
        )

    @property
    def total(self) -> LayerStats:
        """All tensors pooled as one."""
        return self.pool(self.layers)

    @property
    def matrices(self) -> tuple[LayerStats, ...]:
        """The 2-D (and higher) tensors: the weight matrices that delta pruning is about."""
        return tuple(s for s in self.layers if len(s.shape) >= 2)

    def table(self, top: int | None = None, title: str = "delta statistics (δ = finetuned − base)") -> Table:
        """A rich table, one row per tensor (or the ``top`` tensors by ‖δ‖/‖θ_pre‖) plus a pooled row."""
        from rich.table import Table

        rows = list(self.layers)
        if top is not None:
            rows = sorted(rows, key=lambda s: s.rel_norm, reverse=True)[:top]
        table = Table(title=title)
        for col in ("tensor", "numel", "mean δ", "std δ", "mean |δ|", "max |δ|", "‖δ‖", "‖δ‖/‖θ_pre‖"):
            table.add_column(col, justify="left" if col == "tensor" else "right")
        for i, s in enumerate([*rows, self.total]):
            table.add_row(
                s.name,
                f"{s.numel:,}",
                f"{s.mean:.3e}",
                f"{s.std:.3e}",
                f"{s.mean_abs:.3e}",
                f"{s.max_abs:.3e}",
                f"{s.norm:.4g}",
                f"{s.rel_norm:.3e}",
                end_section=i == len(rows) - 1,
                style="bold" if i == len(rows) else None,
            )
        return table


def tensor_prune_stats(
    name: str, base: torch.Tensor, finetuned: torch.Tensor, merged: torch.Tensor
) -> TensorPruneStats:
    """nnz and ‖δ‖₂ of the delta before and after pruning one tensor, chunk by chunk (bounded temporaries).

    ``base``, ``finetuned`` and ``merged`` have the same shape and may be on any device.
    """
    acc = PruneStatsAccumulator(name)
    b, f, m = base.reshape(-1), finetuned.reshape(-1), merged.reshape(-1)
    for i in range(0, m.numel(), _STATS_CHUNK):
        acc.add(b[i : i + _STATS_CHUNK], f[i : i + _STATS_CHUNK], m[i : i + _STATS_CHUNK])
    return acc.result()
