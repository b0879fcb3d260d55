"""Merging fine-tunes of one base model: task arithmetic, TIES, DARE merges and a DAREx-q merge.

* Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv 2212.04089.
* TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023, arXiv 2306.01708.
* DARE merges: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", ICML 2024, arXiv 2311.03099.
* DAREx-q: Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models",
  arXiv 2410.09344.

Every method is one formula over the deltas ``δ_i = θ_i − θ_pre`` of one tensor of ``N`` fine-tunes, in fp32, with
weights ``w_i``, densities ``d_i`` (the kept fraction, ``1 − p_i``; mergekit's and peft's name) and the scale ``λ``:

1. **Sparsify** each delta (the registry row's ``sparsify``):

   * ``none``: ``δ̂_i = δ_i``.
   * ``magnitude`` (TIES' trim): keep the ``k_i = ⌊d_i · n⌋`` entries of largest ``|δ_i|`` of the tensor (``n``
     entries; ``int(density · n)`` as in mergekit and peft), entries of equal magnitude at the cut taken in flat
     index order, lowest first. ``k_i = 0`` keeps nothing. No rescale.
   * ``random`` (DARE): ``δ̂_i = δ_i ⊙ m_i / q_i`` with the keep-mask ``m_i`` of the element-wise pruning method
     the row names (``mask_method``, a row of :data:`lifelong_delta.delta.methods.METHODS`; ``dare``: the
     counter-hash mask of :func:`lifelong_delta.delta.masks.keep_mask`) at drop rate ``1 − d_i`` and seed
     ``seed + i`` for the model at 0-based position ``i``: model ``i``'s mask is exactly the one
     ``lifelong-delta prune --method dare --seed <seed + i>`` draws for that tensor, and the masks of different
     models are independent. ``q_i = d_i`` (DARE's ``1/(1 − p)``) or, for DAREx-q, the model's own ``q_i``
     (default ``√d_i``, see :attr:`MergeSpec.q`). The pruning method's own rescale is not used.

2. **Weight**: ``u_i = w_i · δ̂_i``.

3. **Combine** (the row's ``consensus``):

   * linear: ``τ = Σ_i u_i``; with ``normalize``, ``τ / Σ_i w_i`` (divisor 1 when ``|Σ_i w_i| < 1e-8``).
   * sign consensus (TIES' elect + disjoint merge): the elected sign is ``γ = +1`` where ``Σ_i u_i ≥ 0`` and ``−1``
     elsewhere (a zero sum elects ``+``); model ``i`` agrees where ``sign(u_i) = γ`` (an entry that is zero after
     trimming or dropping never agrees); ``τ = Σ_{agreeing i} u_i``, and with ``normalize`` ``τ / Σ_{agreeing i} w_i``
     (divisor 1 where no model agrees). With unit weights that is the paper's disjoint mean; the weighted mean is
     mergekit's generalisation. A negative weight with ``normalize`` is refused (the signed divisor would undo it).

4. ``θ = θ_pre + λ · τ``, cast to the output dtype.

Sums run in model order, one fp32 addition at a time, so a result is a fixed function of its inputs. Element ``j`` of
the output depends only on element ``j`` of every input and its flat index, except through TIES' per-tensor cut
(:class:`MagnitudeCut`), which the streaming command computes from one model's whole delta at a time and then
applies chunk by chunk; every other method streams in chunks only.

Importing this module loads no torch (the command checks its options with :class:`MergeSpec` before the heavy
imports); the tensor functions import it when called. :mod:`lifelong_delta.delta.merge_words` computes the same
bits on raw F32/BF16 checkpoint words with a compiled kernel, without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "MERGE_METHODS",
    "MagnitudeCut",
    "MergeMethod",
    "MergeMethodName",
    "MergeSpec",
    "combine",
    "magnitude_cut",
    "magnitude_keep",
    "merge_deltas",
    "merge_tensor",
    "non_finite_delta_error",
    "sparsify",
]

MergeMethodName = Literal["task-arithmetic", "ties", "dare-linear", "dare-ties", "darex-q"]


@dataclass(frozen=True)
class MergeMethod:
    """One registry row: the settings that make a merge method (variants are settings, not subclasses).

    Attributes:
        sparsify: ``none`` | ``magnitude`` (TIES' top-k trim of the whole tensor) | ``random`` (the element-wise
            mask of the pruning method ``mask_method``, drawn per model: DARE's by default).
        consensus: TIES' sign election and disjoint merge instead of a plain weighted sum.
        rescale: How ``random`` rescales the kept entries: ``density`` (``1/d_i``, DARE) or ``q`` (``1/q_i``).
        normalize: Divide by the (agreeing) weights by default.
        paper: Where the method comes from.
        mask_method: The pruning method (a row of :data:`lifelong_delta.delta.methods.METHODS` that is
            ``elementwise``, so the merge can stream it chunk by chunk) whose keep-mask ``random`` draws.
    """

    sparsify: Literal["none", "magnitude", "random"]
    consensus: bool
    rescale: Literal["none", "density", "q"]
    normalize: bool
    paper: str
    mask_method: str = "dare"


#: The merge methods users pick by name (``--method``); one row each.
MERGE_METHODS: dict[str, MergeMethod] = {
    "task-arithmetic": MergeMethod("none", False, "none", False, "https://arxiv.org/abs/2212.04089"),
    "ties": MergeMethod("magnitude", True, "none", True, "https://arxiv.org/abs/2306.01708"),
    "dare-linear": MergeMethod("random", False, "density", False, "https://arxiv.org/abs/2311.03099"),
    "dare-ties": MergeMethod("random", True, "density", True, "https://arxiv.org/abs/2311.03099"),
    "darex-q": MergeMethod("random", False, "q", False, "https://arxiv.org/abs/2410.09344"),
}


def _numbers(option: str, values: Sequence[float], n: int | None) -> tuple[float, ...]:
    """``values`` as floats, one per model: a single value is used for all ``n`` models."""
    out = tuple(float(v) for v in values)
    if any(isinstance(v, bool) or not math.isfinite(float(v)) for v in values):
        raise ValueError(f"{option} must be finite numbers, got {list(values)}")
    if n is None:
        return out
    if len(out) == 1:
        return out * n
    if len(out) != n:
        raise ValueError(
            f"{option} has {len(out)} values for {n} models; give one for every model, in the order "
            f"of the models, or one for all"
        )
    return out


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how; checked on construction (a ``ValueError`` names the option to fix).

    Attributes:
        method: One of :data:`MERGE_METHODS`.
        weights: ``w_i``, one per model (their number is the number of models). Any finite values; negative weights
            subtract a task.
        density: ``d_i`` in ``(0, 1]``, the kept fraction of each delta (one value for all models, or one per model).
            Required by every method but task arithmetic, which keeps every entry and takes none.
        q: DAREx-q's ``q_i`` in ``[d_i, 1]`` (one for all, or one per model); kept entries are scaled by ``1/q_i``.
            ``None``: ``q_i = √d_i``, which keeps the delta's expected squared norm (``E‖m ⊙ δ / q‖² = ‖δ‖²``), between
            DARE's ``1/d_i`` (which keeps its mean and inflates its norm by ``1/√d_i``) and no rescale. darex-q only.
        lambda_: ``λ``, the scale of the merged delta.
        normalize: Divide by the (agreeing) weights; ``None``: the method's default (TIES and DARE-TIES: yes).
        seed: Mask seed of the DARE merges; model ``i`` (0-based) draws with ``seed + i``.
    """

    method: MergeMethodName
    weights: tuple[float, ...]
    density: tuple[float, ...] | None = None
    q: tuple[float, ...] | None = None
    lambda_: float = 1.0
    normalize: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(MERGE_METHODS)}")
        row = MERGE_METHODS[self.method]
        weights = _numbers("weights", self.weights, None)
        if not weights:
            raise ValueError("a merge needs at least one model (and one weight per model)")
        n = len(weights)
        object.__setattr__(self, "weights", weights)
        if row.sparsify == "none" and self.density is not None:
            raise ValueError(
                f"{self.method} keeps every delta entry; drop density (or --p), or use ties or a DARE merge"
            )
        if row.sparsify == "random":
            from lifelong_delta.delta.methods import METHODS

            if row.mask_method not in METHODS or not METHODS[row.mask_method].elementwise:
                raise ValueError(
                    f"merge method {self.method!r} draws the mask of pruning method "
                    f"{row.mask_method!r}, which is not a registered element-wise method (one of "
                    f"{', '.join(m for m, r in METHODS.items() if r.elementwise)})"
                )
        if row.sparsify != "none":
            if self.density is None:
                raise ValueError(
                    f"{self.method} needs density, the kept fraction of each delta in (0, 1] "
                    "(--density D, or --p P for the drop rate 1 - D)"
                )
            density = _numbers("density", self.density, n)
            bad = [d for d in density if not 0.0 < d <= 1.0]
            if bad:
                raise ValueError(f"density {bad[0]:g} is outside (0, 1]: density is the kept fraction of each delta")
            object.__setattr__(self, "density", density)
        if self.q is not None:
            if row.rescale != "q":
                raise ValueError(f"q is the rescale of darex-q; {self.method} does not take it")
            q = _numbers("q", self.q, n)
            assert self.density is not None
            for i, (qi, di) in enumerate(zip(q, self.density, strict=True)):
                if not di <= qi <= 1.0:
                    raise ValueError(
                        f"q {qi:g} of model {i + 1} is outside [density, 1] = [{di:g}, 1]: below its "
                        "density it over-amplifies the kept delta, above 1 it shrinks it"
                    )
            object.__setattr__(self, "q", q)
        if row.consensus and self.normalized and any(w < 0 for w in weights):
            raise ValueError(
                f"{self.method} with normalize divides by the signed sum of the agreeing weights "
                "(mergekit's rule), which undoes a negative weight; pass normalize false (--normalize "
                "false) to subtract a task"
            )
        if isinstance(self.lambda_, bool) or not math.isfinite(float(self.lambda_)):
            raise ValueError(f"lambda must be a finite number, got {self.lambda_}")

    @property
    def n_models(self) -> int:
        return len(self.weights)

    @property
    def row(self) -> MergeMethod:
        return MERGE_METHODS[self.method]

    @property
    def normalized(self) -> bool:
        """Whether the merge divides by the (agreeing) weights."""
        return self.row.normalize if self.normalize is None else self.normalize

    def rescale_q(self, i: int) -> float:
        """``q_i`` of a DARE merge: kept entries of model ``i`` are scaled by ``1/q_i``."""
        assert self.density is not None
        if self.row.rescale == "q":
            return self.q[i] if self.q is not None else math.sqrt(self.density[i])
        return self.density[i]

    def mask_seed(self, i: int) -> int:
        """The DARE mask seed of model ``i`` (0-based)."""
        return self.seed + i


@dataclass(frozen=True)
class MagnitudeCut:
    """TIES' trim of one delta tensor, as a rule on (value, flat index): keep an entry iff ``|δ| > value``, or
    ``|δ| == value`` and its flat index is below ``limit``.

    Attributes:
        value: The ``k``-th largest ``|δ|`` (``inf`` when nothing is kept).
        limit: One past the flat index of the last kept entry of magnitude ``value``.
    """

    value: float
    limit: int


def non_finite_delta_error(name: str) -> ValueError:
    """The error for NaN/inf entries of a delta whose inputs are finite (``θ_i − θ_pre`` beyond fp32's range)."""
    return ValueError(f"tensor {name!r} has non-finite delta entries (NaN/inf in the base or a fine-tuned model)")


_SCAN = 1 << 22  # elements per step when looking for the last kept entry among equal magnitudes


def magnitude_cut(delta: torch.Tensor, density: float, *, name: str = "") -> MagnitudeCut:
    """The cut keeping the ``⌊density · n⌋`` largest-magnitude entries of a whole delta tensor (ties by flat index).

    Args:
        delta: The whole delta ``θ_i − θ_pre`` of one tensor, any shape (read as fp32).
        density: Kept fraction in ``(0, 1]``.
        name: Tensor name for error messages.

    Returns:
        A :class:`MagnitudeCut` for :func:`magnitude_keep`.

    Raises:
        ValueError: non-finite entries in ``delta``.
    """
    import torch

    a = delta.detach().reshape(-1).to(torch.float32).abs()
    n = a.numel()
    k = int(density * n)
    if not bool(torch.isfinite(a).all()):
        raise non_finite_delta_error(name)
    if k <= 0:
        return MagnitudeCut(math.inf, 0)
    value = a.kthvalue(n - k + 1).values  # the k-th largest magnitude
    equal_kept = k - int((a > value).sum())
    limit, seen = 0, 0
    for start in range(0, n, _SCAN):
        eq = a[start : start + _SCAN] == value
        count = int(eq.sum())
        if seen + count >= equal_kept:
            limit = start + int(eq.nonzero()[equal_kept - seen - 1]) + 1
            break
        seen += count
    return MagnitudeCut(float(value), limit)


def magnitude_keep(delta: torch.Tensor, cut: MagnitudeCut, *, offset: int = 0) -> torch.Tensor:
    """The keep-mask of ``cut`` on a flat chunk of the delta that starts at flat index ``offset``.

    Returns:
        ``BoolTensor`` of ``delta.shape``.
    """
    import torch

    a = delta.detach().to(torch.float32).abs()
    keep = a > cut.value
    end = offset + a.numel()
    if cut.limit <= offset:
        return keep
    equal = a == cut.value
    if cut.limit < end:
        equal &= (torch.arange(offset, end, device=a.device) < cut.limit).view(a.shape)
    return keep | equal


def sparsify(
    delta: torch.Tensor, spec: MergeSpec, i: int, *, name: str, offset: int = 0, cut: MagnitudeCut | None = None
) -> torch.Tensor:
    """``δ̂_i``: model ``i``'s delta trimmed (TIES), dropped and rescaled (DARE, DAREx-q) or kept (task arithmetic).

    Args:
        delta: fp32 delta of model ``i``: the whole tensor, or a flat chunk starting at flat index ``offset``.
        spec: The merge.
        i: The model's 0-based position.
        name: Tensor name (keys the DARE mask).
        offset: Flat index of ``delta``'s first element in the whole tensor.
        cut: TIES' cut of the whole tensor (:func:`magnitude_cut`); computed from ``delta`` when None, which is
            right only for a whole tensor.

    Returns:
        fp32 tensor of ``delta.shape``.
    """
    import torch

    kind = spec.row.sparsify
    if kind == "none":
        return delta
    assert spec.density is not None
    if kind == "magnitude":
        if cut is None:
            if offset:
                raise ValueError(f"tensor {name!r}: a chunk at offset {offset} needs the whole tensor's cut")
            cut = magnitude_cut(delta, spec.density[i], name=name)
        return torch.where(magnitude_keep(delta, cut, offset=offset), delta, torch.zeros((), device=delta.device))
    from lifelong_delta.delta.methods import PruneSpec, masked_delta

    mask = PruneSpec(spec.row.mask_method, 1.0 - spec.density[i], seed=spec.mask_seed(i), force=True)
    return masked_delta(name, delta, mask, q=spec.rescale_q(i), offset=offset)


def combine(sparse: Sequence[torch.Tensor], spec: MergeSpec) -> torch.Tensor:
    """``τ`` from the sparsified deltas ``δ̂_i`` (all of one shape): weighted sum, or TIES' sign consensus and
    disjoint merge, normalised or not (see the module docstring).

    Returns:
        fp32 tensor of the deltas' shape (``λ`` not applied).
    """
    import torch

    if len(sparse) != spec.n_models:
        raise ValueError(f"{len(sparse)} deltas for {spec.n_models} weights")
    w = torch.tensor(spec.weights, dtype=torch.float32)
    u = [w[i] * d for i, d in enumerate(sparse)]
    total = u[0].clone()
    for x in u[1:]:
        total += x
    if not spec.row.consensus:
        if spec.normalized:
            divisor = sum(spec.weights[1:], torch.tensor(spec.weights[0], dtype=torch.float32))
            total /= divisor if abs(float(divisor)) >= 1e-8 else 1.0
        return total
    elected = torch.where(total >= 0, 1.0, -1.0)
    zero = torch.zeros((), device=total.device)
    mixed = torch.where(u[0].sign() == elected, u[0], zero)
    agreeing = torch.where(u[0].sign() == elected, w[0], zero)
    for i in range(1, len(u)):
        agree = u[i].sign() == elected
        mixed += torch.where(agree, u[i], zero)
        agreeing += torch.where(agree, w[i], zero)
    if spec.normalized:
        mixed /= torch.where(agreeing == 0, 1.0, agreeing)
    return mixed


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    spec: MergeSpec,
    *,
    name: str,
    offset: int = 0,
    cuts: Sequence[MagnitudeCut] | None = None,
) -> torch.Tensor:
    """``λ · τ`` of the fp32 deltas of one tensor (whole, or flat chunks starting at ``offset``).

    Args:
        deltas: ``δ_i`` per model, fp32, one shape.
        spec: The merge.
        name: Tensor name (keys the DARE masks).
        offset: Flat index of the chunks' first element.
        cuts: TIES' per-model cuts of the whole tensor (needed for chunks, see :func:`sparsify`).

    Returns:
        fp32 tensor of the deltas' shape.
    """
    sparse = [
        sparsify(d, spec, i, name=name, offset=offset, cut=cuts[i] if cuts is not None else None)
        for i, d in enumerate(deltas)
    ]
    merged = combine(sparse, spec)
    if spec.lambda_ != 1.0:
        merged *= spec.lambda_
    return merged


def merge_tensor(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    spec: MergeSpec,
    *,
    name: str,
    offset: int = 0,
    cuts: Sequence[MagnitudeCut] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``θ_pre + λ · τ`` for one tensor (or matching flat chunks of it), computed in fp32.

    Args:
        base: ``θ_pre``, any floating dtype.
        finetuned: ``θ_i`` per model, each of ``base``'s shape (dtypes may differ).
        spec: The merge.
        name: Tensor name (keys the DARE masks; named in errors).
        offset: Flat index of the first element when these are chunks of a larger tensor.
        cuts: TIES' per-model cuts of the whole tensor; computed here when None (whole tensors only).
        out_dtype: Output dtype; default ``base.dtype``.

    Returns:
        Tensor of ``base.shape`` in ``out_dtype``.

    Raises:
        ValueError: a shape mismatch, a wrong number of models, or NaN/inf in an input (naming the tensor and model).
    """
    import torch

    from lifelong_delta.delta.stats import check_finite

    if len(finetuned) != spec.n_models:
        raise ValueError(f"tensor {name!r}: {len(finetuned)} fine-tuned tensors for {spec.n_models} weights")
    with torch.no_grad():
        b = base.detach().to(torch.float32)
        check_finite(name, b, "base")
        deltas = []
        for i, f in enumerate(finetuned):
            if f.shape != base.shape:
                raise ValueError(
                    f"tensor {name!r}: fine-tuned #{i + 1} has shape {list(f.shape)}, the base {list(base.shape)}"
                )
            f = f.detach().to(device=b.device, dtype=torch.float32)
            check_finite(name, f, f"fine-tuned #{i + 1}")
            deltas.append(f - b)
        return (b + merge_deltas(deltas, spec, name=name, offset=offset, cuts=cuts)).to(out_dtype or base.dtype)
