"""Delta statistics: per-tensor mean, std, magnitude and norm of δ = θ_ft − θ_pre, and the summary of a prune run.

DARE the Extreme (arXiv 2410.09344) traces DARE's failures to the mean and variance of the delta parameters; these
numbers feed ``lifelong-delta stats`` and the decision logic in :mod:`lifelong_delta.delta.recommend`.

Pure tensor functions (:func:`layer_stats`) plus the name matching shared by the streaming commands
(:func:`match_tensors`, which raises the user-facing errors for missing/extra tensors and shape mismatches).
No Lightning.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from lifelong_delta.delta.methods import is_excluded

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DeltaStats",
    "LayerStats",
    "PruneStatsAccumulator",
    "PruneSummary",
    "TensorMatch",
    "TensorPruneStats",
    "check_finite",
    "layer_stats",
    "match_tensors",
    "tensor_prune_stats",
]

_LIST = 5  # names listed in an error message before "and N more"


class _Checkpoint(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def __contains__(self, name: object) -> bool: ...


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST])
    return shown + (f" and {len(names) - _LIST} more" if len(names) > _LIST else "")


@dataclass(frozen=True)
class TensorMatch:
    """How the tensors of a fine-tuned checkpoint pair with its base (name lists in fine-tuned file order).

    Attributes:
        pruned: Fine-tuned tensors that are pruned against a base tensor.
        copied: Fine-tuned tensors copied unchanged (non-floating, excluded, or only in the fine-tuned model).
        base_names: ``{fine-tuned name: base name}`` where the two differ (a prefix mapping); see :meth:`base_name`.
        finetuned_only: Floating tensors with no base counterpart under the prefix mapping (e.g. a classifier head);
            they are among ``copied``.
        base_only: Base tensors that no fine-tuned tensor maps to under the prefix mapping (e.g. a head the
            fine-tuned model dropped); they are not used.
        prefix: ``(base prefix, fine-tuned prefix)`` of the mapping (one of them empty), or None for equal names.
    """

    pruned: list[str]
    copied: list[str]
    base_names: dict[str, str] = field(default_factory=dict)
    finetuned_only: list[str] = field(default_factory=list)
    base_only: list[str] = field(default_factory=list)
    prefix: tuple[str, str] | None = None

    def base_name(self, name: str) -> str:
        """The base checkpoint's name of fine-tuned tensor ``name``."""
        return self.base_names.get(name, name)

    def describe(self) -> str | None:
        """One line on the prefix mapping and the unmatched tensors, or None when names were equal."""
        if self.prefix is None:
            return None
        pb, pf = self.prefix
        line = (f"tensor names differ by a prefix: base '{pb}X' = fine-tuned '{pf}X' "
                f"({len(self.pruned)} tensors matched)")
        if self.finetuned_only:
            line += (f"; {len(self.finetuned_only)} only in the fine-tuned model, copied unchanged: "
                     f"{_listing(self.finetuned_only)}")
        if self.base_only:
            line += f"; {len(self.base_only)} only in the base model, not used: {_listing(self.base_only)}"
        return line


def _prefix_candidates(names: Sequence[str], others: set[str]) -> dict[str, int]:
    """``{prefix: count}`` of the names that become a name of ``others`` once a dotted prefix is stripped."""
    counts: dict[str, int] = {}
    for n in names:
        for i, ch in enumerate(n):
            if ch == "." and n[i + 1:] in others:
                counts[n[: i + 1]] = counts.get(n[: i + 1], 0) + 1
    return counts


def _match_by_prefix(base_float: list[str], ft_float: list[str]) -> tuple[str, str, dict[str, str], list[str],
                                                                           list[str]] | None:
    """The consistent prefix mapping between two name lists, or None.

    One side's names carry an extra dotted prefix P (``bert.``, ``model.``). The mapping is accepted when every name
    of the side with P that starts with P has a counterpart, and every name of the other side is matched. Names of
    the side with P that lack it are that side's extras (a head). The P matching most tensors wins.
    """
    ft_set, base_set = set(ft_float), set(base_float)
    options = [(c, "", p) for p, c in _prefix_candidates(ft_float, base_set).items()]
    options += [(c, p, "") for p, c in _prefix_candidates(base_float, ft_set).items()]
    for _, pb, pf in sorted(options, key=lambda o: (-o[0], o[1], o[2])):
        if pf:
            mapped = {n: n[len(pf):] for n in ft_float if n.startswith(pf)}
            if not all(b in base_set for b in mapped.values()):
                continue
            if set(mapped.values()) != base_set:
                continue
            ft_only = [n for n in ft_float if not n.startswith(pf)]
            return pb, pf, mapped, ft_only, []
        mapped = {n: pb + n for n in ft_float}
        if not all(b in base_set for b in mapped.values()):
            continue
        if {b for b in base_float if b.startswith(pb)} != set(mapped.values()):
            continue
        return pb, pf, mapped, [], [b for b in base_float if not b.startswith(pb)]
    return None


def match_tensors(base: _Checkpoint, finetuned: _Checkpoint, exclude: Sequence[str] = ()) -> TensorMatch:
    """Pair the floating tensors of two checkpoints and check that they line up.

    Every floating tensor of the fine-tuned model that no ``exclude`` pattern matches must exist in the base with the
    same shape, and vice versa. Non-floating tensors (e.g. ``position_ids``) and excluded ones are copied from the
    fine-tuned model unchanged.

    When the names differ by a consistent dotted prefix (a ``BertModel`` base ``embeddings.*`` against a
    ``BertForSequenceClassification`` fine-tune ``bert.embeddings.*``, or the reverse), the tensors are paired through
    that prefix; fine-tuned tensors outside the prefix (the classifier head) are copied unchanged and listed in
    :attr:`TensorMatch.finetuned_only`, base tensors outside it are listed in :attr:`TensorMatch.base_only`.

    Raises:
        ValueError: naming the missing/extra tensors (when no prefix mapping explains them) or the first tensor whose
            shape differs.
    """
    def floating(ckpt: _Checkpoint, name: str) -> bool:
        return ckpt.dtype(name).is_floating_point and not is_excluded(name, tuple(exclude))

    ft_names = finetuned.names()
    for n in ft_names:
        if n in base and not is_excluded(n, tuple(exclude)) and (
                base.dtype(n).is_floating_point != finetuned.dtype(n).is_floating_point):
            raise ValueError(f"tensor {n!r} is {_dtype_name(base.dtype(n))} in the base model but "
                             f"{_dtype_name(finetuned.dtype(n))} in the fine-tuned model; a delta needs both "
                             f"floating (pass --exclude '{n}' to copy the fine-tuned one unchanged)")
    pruned = [n for n in ft_names if floating(finetuned, n)]
    missing = [n for n in pruned if n not in base]
    extra = [n for n in base.names() if floating(base, n) and not (n in finetuned and floating(finetuned, n))]
    if missing or extra:
        found = _match_by_prefix([n for n in base.names() if floating(base, n)], pruned)
        if found is not None:
            pb, pf, mapped, ft_only, base_only = found
            for n, b in mapped.items():
                if base.shape(b) != finetuned.shape(n):
                    raise ValueError(f"tensor {n!r} has shape {list(finetuned.shape(n))} in the fine-tuned model but "
                                     f"{list(base.shape(b))} as {b!r} in the base model")
            kept = [n for n in ft_names if n in mapped]
            return TensorMatch(pruned=kept, copied=[n for n in ft_names if n not in mapped],
                               base_names={n: b for n, b in mapped.items() if n != b}, finetuned_only=ft_only,
                               base_only=base_only, prefix=(pb, pf))
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) of the fine-tuned model are missing from the base model: "
                         f"{_listing(missing)} (pass --exclude PATTERN to copy them unchanged)")
    if extra:
        raise ValueError(f"{len(extra)} tensor(s) of the base model are missing from the fine-tuned model: "
                         f"{_listing(extra)} (pass --exclude PATTERN to skip them)")
    for n in pruned:
        if base.shape(n) != finetuned.shape(n):
            raise ValueError(f"tensor {n!r} has shape {list(base.shape(n))} in the base model but "
                             f"{list(finetuned.shape(n))} in the fine-tuned model")
    kept = set(pruned)
    return TensorMatch(pruned=pruned, copied=[n for n in ft_names if n not in kept])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_finite(name: str, tensor: torch.Tensor, which: str) -> None:
    """Raise ``ValueError`` naming the tensor if it holds NaN or ±inf.

    Fast path: min and max (one reduction, which propagates NaN) are finite iff every entry is.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {name!r} of the {which} model has {bad} non-finite value(s) (NaN or inf)")


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
        return cls(tuple(
            layer_stats(n, base[n], t) for n, t in finetuned.items()
            if t.is_floating_point() and n in base and not is_excluded(n, tuple(exclude))
        ))

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
            table.add_row(s.name, f"{s.numel:,}", f"{s.mean:.3e}", f"{s.std:.3e}", f"{s.mean_abs:.3e}",
                          f"{s.max_abs:.3e}", f"{s.norm:.4g}", f"{s.rel_norm:.3e}",
                          end_section=i == len(rows) - 1, style="bold" if i == len(rows) else None)
        return table


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
            *([("only in the fine-tuned model (copied)", _listing(self.finetuned_only))] if self.finetuned_only else []),
            *([("name mapping", self.name_mapping)] if self.name_mapping else []),
            ("delta entries", f"{self.numel:,}"),
            ("kept fraction (nonzero δ after / before)", f"{self.kept_fraction:.4f}"),
            ("‖δ‖ before", f"{self.norm_before:.6g}"),
            ("‖δ‖ after", f"{self.norm_after:.6g}"),
        ]
        if self.q_per_tensor:
            qs = [self.q_per_tensor[t.name] for t in self.tensors if t.name in self.q_per_tensor]
            if qs:
                rows.append(("q per tensor: min / median / max",
                             f"{min(qs):.4g} / {statistics.median(qs):.4g} / {max(qs):.4g}"))
        if self.out:
            rows.append(("output", self.out))
        for row in rows:
            table.add_row(*row)
        return table

    def as_dict(self) -> dict[str, object]:
        """Plain-data form, e.g. for JSON."""
        return {"method": self.method, "p": self.p, "q": self.q, "tensors_pruned": len(self.tensors),
                "tensors_copied": len(self.copied), "finetuned_only": list(self.finetuned_only),
                "name_mapping": self.name_mapping, "numel": self.numel, "kept_fraction": self.kept_fraction,
                "norm_before": self.norm_before, "norm_after": self.norm_after, "out": self.out,
                "q_per_tensor": self.q_per_tensor}


_STATS_CHUNK = 1 << 22  # elements per chunk when measuring a pruned tensor (bounds the temporaries)


class PruneStatsAccumulator:
    """Accumulates :class:`TensorPruneStats` of one tensor over consecutive chunks of its flattened data.

    nnz compares in the output dtype, so an entry whose delta was dropped counts as zero even when the base and
    output dtypes differ. Norms are accumulated in fp64 across chunks.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.numel = self.nnz_before = self.nnz_after = 0
        self.sq_before = self.sq_after = 0.0

    @torch.no_grad()
    def add(self, base: torch.Tensor, finetuned: torch.Tensor, merged: torch.Tensor) -> None:
        """Add one chunk: three flat tensors of equal length (base, fine-tuned and merged values)."""
        bf = base.reshape(-1).float()
        d = finetuned.reshape(-1).float() - bf
        dm = merged.reshape(-1).float() - bf
        self.numel += d.numel()
        self.sq_before += float(torch.dot(d, d))
        self.sq_after += float(torch.dot(dm, dm))
        # a - b == 0 exactly iff a == b for finite floats, so the fp32 differences count changed entries
        self.nnz_before += int(torch.count_nonzero(d if finetuned.dtype == base.dtype else
                                                   finetuned.reshape(-1) != base.reshape(-1).to(finetuned.dtype)))
        self.nnz_after += int(torch.count_nonzero(dm if merged.dtype == base.dtype else
                                                  merged.reshape(-1) != base.reshape(-1).to(merged.dtype)))

    def add_counts(self, numel: int, nnz_before: int, nnz_after: int, sq_before: float, sq_after: float) -> None:
        """Add one chunk's statistics computed elsewhere (the fused kernel of
        :func:`~lifelong_delta.delta.dare.dare_merge_stats`)."""
        self.numel += numel
        self.nnz_before += nnz_before
        self.nnz_after += nnz_after
        self.sq_before += sq_before
        self.sq_after += sq_after

    def result(self) -> TensorPruneStats:
        return TensorPruneStats(self.name, self.numel, self.nnz_before, self.nnz_after, math.sqrt(self.sq_before),
                                math.sqrt(self.sq_after))


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
