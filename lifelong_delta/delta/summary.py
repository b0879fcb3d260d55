"""What a prune run did: per-tensor nnz and norms of the delta before and after, pooled into a summary.

No torch at import: the streaming prune fills :class:`PruneStatsAccumulator` from its fused kernel's counts; only
:meth:`PruneStatsAccumulator.add`, given torch tensors, uses torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lifelong_delta.delta.matching import _listing

if TYPE_CHECKING:
    import torch
    from rich.table import Table

__all__ = ["PruneStatsAccumulator", "PruneSummary", "TensorPruneStats"]


@dataclass(frozen=True)
class TensorPruneStats:
    """One pruned tensor: nonzero delta entries and ‖δ‖₂ before and after pruning."""

    name: str
    numel: int
    nnz_before: int
    nnz_after: int
    norm_before: float
    norm_after: float


@dataclass
class PruneSummary:
    """What a prune run did. ``kept_fraction`` is nnz(δ after) / nnz(δ before), pooled over pruned tensors."""

    method: str
    p: float
    q: float | str | None
    tensors: list[TensorPruneStats] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    out: str | None = None
    finetuned_only: list[str] = field(default_factory=list)
    name_mapping: str | None = None
    q_per_tensor: dict[str, float] | None = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def kept_fraction(self) -> float:
        before = sum(t.nnz_before for t in self.tensors)
        return sum(t.nnz_after for t in self.tensors) / before if before else 1.0

    @property
    def norm_before(self) -> float:
        return math.sqrt(sum(t.norm_before**2 for t in self.tensors))

    @property
    def norm_after(self) -> float:
        return math.sqrt(sum(t.norm_after**2 for t in self.tensors))

    def table(self) -> Table:
        """A two-column rich table of the run."""
        from rich.table import Table

        q = "" if self.q is None else f", q={self.q:g}" if isinstance(self.q, float) else f", q={self.q}"
        table = Table(title=f"prune summary ({self.method}, p={self.p:g}{q})")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        rows = [
            ("tensors pruned", f"{len(self.tensors):,}"),
            ("tensors copied unchanged", f"{len(self.copied):,}"),
            *(
                [("only in the fine-tuned model (copied)", _listing(self.finetuned_only))]
                if self.finetuned_only
                else []
            ),
            *([("name mapping", self.name_mapping)] if self.name_mapping else []),
            ("delta entries", f"{self.numel:,}"),
            ("kept fraction (nonzero δ after / before)", f"{self.kept_fraction:.4f}"),
            ("‖δ‖ before", f"{self.norm_before:.6g}"),
            ("‖δ‖ after", f"{self.norm_after:.6g}"),
        ]
        if self.q_per_tensor:
            qs = [self.q_per_tensor[t.name] for t in self.tensors if t.name in self.q_per_tensor]
            if qs:
                rows.append(
                    ("q per tensor: min / median / max", f"{min(qs):.4g} / {statistics.median(qs):.4g} / {max(qs):.4g}")
                )
        if self.out:
            rows.append(("output", self.out))
        for row in rows:
            table.add_row(*row)
        return table

    def as_dict(self) -> dict[str, object]:
        """Plain-data form, e.g. for JSON."""
        return {
            "method": self.method,
            "p": self.p,
            "q": self.q,
            "tensors_pruned": len(self.tensors),
            "tensors_copied": len(self.copied),
            "finetuned_only": list(self.finetuned_only),
            "name_mapping": self.name_mapping,
            "numel": self.numel,
            "kept_fraction": self.kept_fraction,
            "norm_before": self.norm_before,
            "norm_after": self.norm_after,
            "out": self.out,
            "q_per_tensor": self.q_per_tensor,
        }


class PruneStatsAccumulator:
    """Accumulates :class:`TensorPruneStats` of one tensor over consecutive chunks of its flattened data.

    nnz compares in the output dtype, so an entry whose delta was dropped counts as zero even when the base and
    output dtypes differ. Norms are accumulated in fp64 across chunks.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.numel = self.nnz_before = self.nnz_after = 0
        self.sq_before = self.sq_after = 0.0

    def add(self, base: torch.Tensor, finetuned: torch.Tensor, merged: torch.Tensor) -> None:
        """Add one chunk: three flat tensors of equal length (base, fine-tuned and merged values)."""
        import torch

        with torch.no_grad():
            self._add(base, finetuned, merged)

    def _add(self, base: torch.Tensor, finetuned: torch.Tensor, merged: torch.Tensor) -> None:
        import torch

        bf = base.reshape(-1).float()
        d = finetuned.reshape(-1).float() - bf
        dm = merged.reshape(-1).float() - bf
        self.numel += d.numel()
        self.sq_before += float(torch.dot(d, d))
        self.sq_after += float(torch.dot(dm, dm))
        # a - b == 0 exactly iff a == b for finite floats, so the fp32 differences count changed entries
        self.nnz_before += int(
            torch.count_nonzero(
                d if finetuned.dtype == base.dtype else finetuned.reshape(-1) != base.reshape(-1).to(finetuned.dtype)
            )
        )
        self.nnz_after += int(
            torch.count_nonzero(
                dm if merged.dtype == base.dtype else merged.reshape(-1) != base.reshape(-1).to(merged.dtype)
            )
        )

    def add_counts(self, numel: int, nnz_before: int, nnz_after: int, sq_before: float, sq_after: float) -> None:
        """Add one chunk's statistics computed elsewhere (the fused kernel of
        :func:`~lifelong_delta.delta.dare.dare_merge_stats`)."""
        self.numel += numel
        self.nnz_before += nnz_before
        self.nnz_after += nnz_after
        self.sq_before += sq_before
        self.sq_after += sq_after

    def result(self) -> TensorPruneStats:
        return TensorPruneStats(
            self.name, self.numel, self.nnz_before, self.nnz_after, math.sqrt(self.sq_before), math.sqrt(self.sq_after)
        )
