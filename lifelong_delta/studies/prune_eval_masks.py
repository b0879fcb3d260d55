"""Masked deltas for ``prune_eval``: one keep-mask per (method, p, seed), cheap to rescale per q.

Every pruning method of the study is "keep some delta entries, rescale them by 1/q": DARE / DAREx-q keep the
counter-based Bernoulli mask of :func:`lifelong_delta.delta.masks.keep_mask`, magnitude / WANDA keep the top-k
of each output row (no rescale: q = 1) and structural keeps random whole rows. The masks are the registry rows'
own (:data:`lifelong_delta.delta.methods.METHODS`, through ``keep_mask_for``), so the merged weights are the ones
``lifelong-delta prune`` writes, and a registered method runs in the study as it does in ``prune``.

:class:`RescaledDelta` is a :class:`~lifelong_delta.delta.darex.MaskedDelta` whose ``apply_`` writes only the
kept, nonzero delta entries when it was the last writer of the target module (and the whole tensors
otherwise). At p = 0.99 a q candidate then costs ~1 % of a full rewrite of the model, with the same values bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lifelong_delta.delta.dare import resolve_q, scale_of
from lifelong_delta.delta.darex import MaskedDelta
from lifelong_delta.delta.methods import METHODS, PruneSpec, keep_mask_for

__all__ = ["NonZero", "RescaledDelta", "build_masked", "mark_dirty", "restore_"]

_OWNER = "_prune_eval_writer"


@dataclass(frozen=True)
class NonZero:
    """The nonzero entries of one delta: flat indices (int64), deltas and ``θ_pre`` (fp32), all ``[k]``.

    Computed once per fine-tune; every mask then only looks at these entries (a fine-tune touches ~0.5 % of
    the word-embedding rows, so most of that matrix never needs a look).
    """

    idx: Tensor
    vals: Tensor
    base: Tensor

    @classmethod
    def of(cls, base: Tensor, delta: Tensor) -> NonZero:
        d = delta.reshape(-1)
        idx = torch.nonzero(d != 0).squeeze(1)
        return cls(
            idx, d[idx].to(torch.float32), base.reshape(-1)[idx].to(torch.float32)
        )  # attribute on the target module: token of the RescaledDelta that wrote it last


def mark_dirty(model: nn.Module) -> None:
    """Forget which :class:`RescaledDelta` wrote ``model`` last (call it after other writes to it)."""
    model.__dict__.pop(_OWNER, None)


@torch.no_grad()
def restore_(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (e.g. the fine-tuned weights) into ``model``'s state IN PLACE and mark it dirty."""
    sd = model.state_dict(keep_vars=True)
    for name, t in tensors.items():
        sd[name].data.copy_(t)
    mark_dirty(model)


class RescaledDelta(MaskedDelta):
    """A :class:`MaskedDelta` with a sparse ``apply_``: same values, a fraction of the memory traffic.

    Per tensor it keeps the flat indices of the kept entries whose delta is nonzero, their delta and their
    pretrained values; ``apply_`` writes ``θ_pre + δ · float32(1/q)`` there, exactly like
    ``MaskedDelta.merged``. The other entries must already be ``θ_pre``: they are when this object wrote the
    module last; otherwise the whole tensors are reset to ``θ_pre`` first. Anything else that writes the
    module must call :func:`mark_dirty`.
    """

    def __init__(
        self,
        p: float,
        seed: int,
        base: dict[str, Tensor],
        delta: dict[str, Tensor],
        keep: dict[str, Tensor],
        dtypes: dict[str, torch.dtype],
        nonzero: Mapping[str, NonZero] | None = None,
    ) -> None:
        super().__init__(p, seed, base, delta, keep, dtypes)
        self._token = object()
        self._idx: dict[str, Tensor] = {}
        self._vals: dict[str, Tensor] = {}
        self._base_at: dict[str, Tensor] = {}
        for n in self.names:
            nz = nonzero[n] if nonzero is not None else NonZero.of(base[n], delta[n])
            k = torch.nonzero(keep[n].reshape(-1).index_select(0, nz.idx)).squeeze(1)
            self._idx[n] = nz.idx.index_select(0, k)
            self._vals[n], self._base_at[n] = nz.vals.index_select(0, k), nz.base.index_select(0, k)

    @property
    def kept_fraction(self) -> float:
        """Kept nonzero delta entries / nonzero delta entries."""
        nnz = sum(int((self.delta[n] != 0).sum()) for n in self.names)
        return sum(len(i) for i in self._idx.values()) / max(nnz, 1)

    def _qs(self, q: float | Mapping[str, float], force: bool) -> dict[str, float]:
        if isinstance(q, Mapping):
            missing = [n for n in self.names if n not in q]
            if missing:
                raise ValueError(f"q: no value for tensor {missing[0]!r} ({len(missing)} tensors missing)")
            return {n: resolve_q(self.p, float(q[n]), force=force, name=n) for n in self.names}
        q0 = resolve_q(self.p, q, force=force)
        return dict.fromkeys(self.names, q0)

    @torch.no_grad()
    def apply_(
        self, target: nn.Module | dict[str, Tensor], q: float | Mapping[str, float], *, force: bool = False
    ) -> None:
        """Write ``θ = θ_pre + kept / q`` into ``target`` IN PLACE (see :meth:`MaskedDelta.apply_`)."""
        if not isinstance(target, nn.Module) or any(t != torch.float32 for t in self.dtypes.values()):
            if isinstance(target, nn.Module):
                mark_dirty(target)
            return super().apply_(target, q, force=force)
        qs = self._qs(q, force)
        dest = target.state_dict(keep_vars=True)
        absent = [n for n in self.names if n not in dest]
        if absent:
            raise ValueError(f"target has no tensor {absent[0]!r} ({len(absent)} pruned tensors missing)")
        dense = target.__dict__.get(_OWNER) is not self._token
        for n in self.names:
            flat = dest[n].data.view(-1)
            if dense:
                flat.copy_(self.base[n].reshape(-1))
            flat.index_copy_(0, self._idx[n], self._base_at[n] + self._vals[n] * scale_of(qs[n]))
        target.__dict__[_OWNER] = self._token


def build_masked(
    kind: str,
    base: dict[str, Tensor],
    delta: dict[str, Tensor],
    p: float,
    seed: int = 0,
    *,
    input_norms: Mapping[str, Tensor] | None = None,
    nonzero: Mapping[str, NonZero] | None = None,
) -> RescaledDelta:
    """The masked delta of one method at drop rate ``p``: its registry row's keep-mask
    (:func:`~lifelong_delta.delta.methods.keep_mask_for`, with the row's default settings).

    Args:
        kind: A method of :data:`~lifelong_delta.delta.methods.METHODS`: ``dare`` (Bernoulli keep-mask of the
            seed, shared by DAREx-q), ``magnitude`` / ``wanda`` (top-k of ``|δ|`` / ``|δ|·‖x‖₂`` per output row;
            ``seed`` unused), ``structural`` (random whole rows), or one registered by the user.
        base: ``{name: θ_pre}`` of the pruned tensors (referenced, not copied).
        delta: ``{name: fp32 δ}`` of the same tensors.
        p: drop rate in ``[0, 1)``.
        seed: mask seed (methods whose row is ``seeded``).
        input_norms: ``{name: [in] ‖x_j‖₂}`` for every 2-D tensor (methods whose row ``needs_input_norms``).
        nonzero: :class:`NonZero` of every tensor, if already computed.

    Returns:
        A :class:`RescaledDelta`; apply it with ``q = 1 - p`` (DARE), a chosen q (DAREx-q) or ``q = 1`` (no
        rescale: magnitude and WANDA).
    """
    resolve_q(p, None)
    if kind not in METHODS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(map(repr, METHODS))}")
    row = METHODS[kind]
    norms = input_norms or {}
    if row.needs_input_norms and not norms:
        raise ValueError(f"kind={kind!r} needs input_norms (calibration activations)")
    spec = PruneSpec(kind, p, seed=seed, force=True)

    def rule(n: str, d: Tensor) -> Tensor:
        keep = keep_mask_for(n, d, spec, input_norms=norms.get(n))
        # as prune: a fused DARE kernel writes every kept entry, the others leave a zero delta at θ_pre
        return keep if row.random_mask else keep & (d != 0)

    threads = torch.get_num_threads()
    if row.row_local:
        keep = {n: _rowwise_top(d, lambda sub, n=n: rule(n, sub)) for n, d in delta.items()}
    else:
        keep = {n: rule(n, d) for n, d in delta.items()}
    torch.set_num_threads(threads)  # the numba mask kernels' OpenMP pool resets torch's thread count
    return RescaledDelta(p, seed, base, delta, keep, {n: base[n].dtype for n in delta}, nonzero)


def _rowwise_top(d: Tensor, keep_of: Callable[[Tensor], Tensor]) -> Tensor:
    """``keep_of(d)`` for a row-wise rule, computed on the rows of a 2-D ``d`` that hold a nonzero delta.

    Row-wise top-k treats every row on its own, so the skipped all-zero rows change nothing that is kept
    (their delta is zero whatever the mask); a fine-tune's word-embedding delta has ~99 % such rows.
    """
    if d.dim() != 2:
        return keep_of(d)
    rows = torch.nonzero(d.ne(0).any(1)).squeeze(1)
    if len(rows) == d.shape[0]:
        return keep_of(d)
    keep = torch.zeros(d.shape, dtype=torch.bool, device=d.device)
    if len(rows):
        keep[rows] = keep_of(d[rows])
    return keep
