"""The registry of delta-pruning methods, and the per-tensor entry points every consumer calls.

A method is one ``keep`` function (which delta entries survive) plus one :class:`Method` row declaring what it
needs and how it behaves. Rescaling (``none`` | ``dare`` = 1/(1−p) | ``q`` = 1/q), the merge ``θ_pre + kept δ``,
the streaming layout, packing and the CLI's checks are the engine's, driven by the row; no consumer compares a
method's name. Users pick a method by string (``PruneSpec.method``); variants are settings. Add one with
:func:`register_method` (docs/architecture.md, "How to add a method").

Importing this module loads no torch (the registry and :class:`PruneSpec` are needed before the streaming prune
knows whether any tensor needs torch); the keep functions import their modules when called.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from lifelong_delta.delta.choices import RescaleName, resolve_q
from lifelong_delta.delta.matching import is_excluded

if TYPE_CHECKING:
    import torch

__all__ = [
    "METHODS",
    "KeepFn",
    "Method",
    "PruneSpec",
    "keep_mask_for",
    "masked_delta",
    "prune_delta",
    "prune_tensor",
    "q_alternatives",
    "register_method",
]

_F = TypeVar("_F", bound=Callable[..., object])
Lines = Literal["rows", "columns"]
_RESCALES: tuple[RescaleName, ...] = ("none", "dare", "q")
RESCALE_TEXT = {"none": "1 (no rescale)", "dare": "1/(1-p)", "q": "1/q"}


def _no_grad(fn: _F) -> _F:
    """``torch.no_grad()`` around ``fn``, importing torch only when ``fn`` runs."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class KeepFn(Protocol):
    """``keep(name, delta, spec, *, input_norms, offset) -> BoolTensor`` of ``delta.shape`` (True = keep).

    ``delta`` is fp32 and finite. ``offset`` is the flat index of ``delta``'s first element in the whole tensor: 0
    unless the row is ``elementwise`` and the engine hands over a chunk or a shard. ``input_norms`` is ``[in]``
    ‖x_j‖₂ (or ``None``).
    """

    def __call__(
        self,
        name: str,
        delta: torch.Tensor,
        spec: PruneSpec,
        *,
        input_norms: torch.Tensor | None = None,
        offset: int = 0,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    """One registry row: a method's keep function and the facts every consumer reads.

    Attributes:
        keep: Which delta entries survive (:class:`KeepFn`); the engine rescales and merges them.
        paper: Where the method comes from.
        default_rescale: Rescale used when ``PruneSpec.rescale`` is None.
        rescales: The rescales the method accepts (``PruneSpec.rescale``, ``--rescale``, ``--q_mode``).
        needs_q: With the rescale ``q``, the method needs a q (given, or chosen by ``--q_mode``); ``False``: no q
            means ``q = 1 − p``.
        needs_input_norms: The method needs ``‖x_j‖₂`` from calibration activations for 2-D weights.
        seeded: The mask depends on ``PruneSpec.seed`` (with the default settings); studies repeat such methods
            over seeds.
        elementwise: Whether entry i is kept depends on δ_i, its flat index, the seed and the name only, so a tensor
            streams, merges and prunes FSDP shards in flat chunks (``offset``).
        random_mask: The mask is DARE's counter-based hash of (seed, name, index) at drop rate p
            (:func:`lifelong_delta.delta.masks.keep_mask`; implies ``elementwise``): whole checkpoints then go
            through the fused DARE kernels (on raw bf16/fp32 words, without torch), a pack stores no positions (it
            regenerates the mask), and ``--q_mode analytic`` applies.
        row_local: The mask of each output row of a weight (``shape[0]`` slices of a tensor of 2 or more dims)
            depends on that row alone (top-k per row), so such tensors stream a block of rows at a time. A weight
            stored input-major (GPT-2's ``Conv1D``, WANDA norms of shape ``[in, 1]``), 0/1-D tensors, and methods
            with none of these properties see one whole tensor at a time.
        lines: For a mask of whole rows or columns of the ``[shape[0], -1]`` matrix of a tensor of 2 or more dims:
            ``lines(spec)`` says which, and a pack stores their indices instead of every entry's.
    """

    keep: KeepFn
    paper: str
    default_rescale: RescaleName
    rescales: tuple[RescaleName, ...] = _RESCALES
    needs_q: bool = False
    needs_input_norms: bool = False
    seeded: bool = False
    elementwise: bool = False
    random_mask: bool = False
    row_local: bool = False
    lines: Callable[[PruneSpec], Lines] | None = None

    def __post_init__(self) -> None:
        if not callable(self.keep):
            raise TypeError(
                f"Method(keep={self.keep!r}) must be a function (name, delta, spec, *, input_norms, "
                "offset) -> bool mask"
            )
        bad = [r for r in (self.default_rescale, *self.rescales) if r not in _RESCALES]
        if bad or not self.rescales:
            raise ValueError(
                f"Method(rescales={self.rescales!r}, default_rescale={self.default_rescale!r}): "
                f"each must be one of {', '.join(_RESCALES)}"
            )
        if self.default_rescale not in self.rescales:
            raise ValueError(
                f"Method(default_rescale={self.default_rescale!r}) is not among its rescales {self.rescales!r}"
            )
        if self.random_mask and not self.elementwise:
            raise ValueError("Method(random_mask=True) is DARE's element-wise mask: set elementwise=True too")

    @property
    def takes_q(self) -> bool:
        """The method can rescale by 1/q (so ``--q`` and ``--q_mode`` apply)."""
        return "q" in self.rescales


@dataclass
class PruneSpec:
    """What to prune and how; validated on construction.

    Attributes:
        method: A name in :data:`METHODS`.
        p: Drop rate in ``[0, 1)``.
        q: DAREx-q rescale (kept entries ×1/q). Needed by ``darex-q`` and ``rescale="q"``, either here or
            per tensor via ``prune_tensor(..., q=...)`` (e.g. after a q search).
        rescale: ``"none"`` | ``"dare"`` (1/(1−p)) | ``"q"`` (1/q), among the method's ``rescales``; default the
            method's (dare → dare, darex-q → q, magnitude/wanda → none, or q when q is given, structural → q with
            q=None meaning 1−p).
        structural_axis: ``"rows"`` or ``"columns"`` (structural only).
        structural_select: ``"random"`` or ``"importance"`` (structural only).
        seed: Mask seed.
        exclude: Glob patterns of tensor names left untouched (copied from the fine-tuned model).
        force: Allow ``q`` outside ``[1 − p, 1]``.
    """

    method: str
    p: float
    q: float | None = None
    rescale: RescaleName | None = None
    structural_axis: Literal["rows", "columns"] = "rows"
    structural_select: Literal["random", "importance"] = "random"
    seed: int = 0
    exclude: Sequence[str] = field(default_factory=tuple)
    force: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        row = METHODS[self.method]
        if self.rescale is None:
            # a q given to a method whose default is no rescale means "rescale by 1/q"
            self.rescale = (
                "q" if self.q is not None and row.default_rescale == "none" and row.takes_q else row.default_rescale
            )
        if self.rescale not in _RESCALES:
            raise ValueError(f"rescale={self.rescale!r} is not one of 'none', 'dare', 'q'")
        if self.rescale not in row.rescales:
            how = (
                f"it always uses {row.default_rescale!r}"
                if len(row.rescales) == 1
                else f"it takes {', '.join(map(repr, row.rescales))}"
            )
            raise ValueError(
                f"rescale={self.rescale!r} does not apply to method={self.method!r} ({how}); drop the option"
            )
        if self.q is not None and not row.takes_q:
            instead = " or ".join(f"method={m!r}" for m in q_alternatives(self.method))
            raise ValueError(
                f"q is set but method={self.method!r} rescales by {RESCALE_TEXT[row.default_rescale]}"
                f"; use {instead} to rescale by 1/q"
            )
        if self.rescale in ("none", "dare") and self.q is not None:
            raise ValueError(f"q is set but rescale={self.rescale!r}; use rescale='q' or drop q")
        resolve_q(self.p, self.q, force=self.force)  # p in [0, 1); q in [1-p, 1] unless force
        if self.structural_axis not in ("rows", "columns"):
            raise ValueError(f"structural_axis={self.structural_axis!r} is not one of 'rows', 'columns'")
        if self.structural_select not in ("random", "importance"):
            raise ValueError(f"structural_select={self.structural_select!r} is not one of 'random', 'importance'")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")

    @property
    def row(self) -> Method:
        """The registry row of :attr:`method`."""
        return METHODS[self.method]

    @property
    def lacks_q(self) -> bool:
        """The spec rescales by 1/q, its method needs a q, and none is set (a per-tensor q must come instead)."""
        return self.rescale == "q" and self.q is None and self.row.needs_q


def q_alternatives(method: str) -> list[str]:
    """Methods that rescale by 1/q to suggest instead of ``method``: those sharing its keep function (DAREx-q for
    DARE), else every one that takes q."""
    keep = METHODS[method].keep
    same = [m for m, r in METHODS.items() if r.keep is keep and r.takes_q]
    return same or [m for m, r in METHODS.items() if r.takes_q]


def register_method(name: str, method: Method, *, replace: bool = False) -> Method:
    """Add a pruning method to :data:`METHODS`, so ``PruneSpec``, ``prune``/``pack``, ``DeltaPruning`` and the
    element-wise merges accept it by name. Remove it with ``METHODS.pop(name)``.

    Args:
        name: The method's name (letters, digits, ``-`` and ``_``; what ``--method`` takes).
        method: Its row.
        replace: Allow replacing a registered method of that name.

    Returns:
        ``method``.

    Raises:
        ValueError: a bad name, or a name already taken (without ``replace``).
        TypeError: ``method`` is not a :class:`Method`.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method({name!r}, ...) takes a Method row, got {type(method).__name__}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"register_method: name {name!r} must be letters, digits, '-' and '_'")
    if name in METHODS and not replace:
        raise ValueError(f"register_method: method {name!r} is already registered; pass replace=True")
    METHODS[name] = method
    return method


def _q_divisor(name: str, spec: PruneSpec, q: float | None) -> float | None:
    """The q the kept entries are divided by: 1 (``none``), ``None`` for 1 − p (``dare``, or ``q`` without a q for
    a method that defaults it), or the per-tensor / spec q (``q``).

    Raises:
        ValueError: the rescale is ``q``, the method needs a q and none is given (naming the tensor).
    """
    if spec.rescale == "none":
        return 1.0
    if spec.rescale == "dare":
        return None
    q_eff = spec.q if q is None else q
    if q_eff is None and spec.row.needs_q:
        raise ValueError(
            f"method={spec.method!r} needs q for tensor {name!r}: set q, or choose it with a q search "
            "and pass prune_tensor(..., q=...)"
        )
    return q_eff


def _check_offset(name: str, spec: PruneSpec, offset: int) -> None:
    if offset and not spec.row.elementwise:
        raise ValueError(
            f"method {spec.method!r} is not element-wise, so it cannot prune a part of tensor {name!r} "
            f"(offset {offset}) on its own"
        )


@_no_grad
def prune_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    spec: PruneSpec,
    *,
    input_norms: torch.Tensor | None = None,
    q: float | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Merged tensor ``θ_pre + pruned(θ_ft − θ_pre)`` in ``finetuned.dtype``, for one tensor.

    Non-floating tensors and tensors matched by ``spec.exclude`` are returned as ``finetuned`` unchanged. Entries
    whose rescaled delta is zero are exactly ``base``; a ``random_mask`` method runs the fused DARE kernel, whose
    kept entries are ``base + δ·(1/q)`` in fp32 (the same bits as its streaming prune).

    Args:
        name: Tensor name (keys the mask; named in errors).
        base: Pretrained tensor.
        finetuned: Fine-tuned tensor (same shape; dtype may differ, compute is fp32).
        spec: The method and its settings.
        input_norms: ``[in]`` ‖x_j‖₂ for ``wanda`` (and optionally structural columns).
        q: Per-tensor q overriding ``spec.q`` (e.g. from ``analytic_q_per_layer``); used by the rescale ``q``.
        offset: Flat index of the first element when ``base`` and ``finetuned`` are a chunk or shard of a larger
            tensor (element-wise methods only).

    Raises:
        ValueError: shape mismatch, non-finite delta, missing q or input norms (naming the tensor).
    """
    import torch

    if base.shape != finetuned.shape:
        raise ValueError(
            f"tensor {name!r}: base shape {tuple(base.shape)} != fine-tuned shape {tuple(finetuned.shape)}"
        )
    if not (finetuned.is_floating_point() and base.is_floating_point()) or is_excluded(name, spec.exclude):
        return finetuned
    if finetuned.numel() == 0:  # nothing to prune (and no row to take a top-k of)
        return finetuned
    if q is not None:
        resolve_q(spec.p, q, force=spec.force, name=name)
    _check_offset(name, spec, offset)
    divisor = _q_divisor(name, spec, q)
    if spec.row.random_mask:
        from lifelong_delta.delta.dare import dare_merge

        return dare_merge(
            base, finetuned, spec.p, seed=spec.seed, name=name, q=divisor, offset=offset, force=spec.force
        )
    b = base.detach().to(device=finetuned.device, dtype=torch.float32)
    d = finetuned.detach().to(torch.float32) - b
    pruned = masked_delta(name, d, spec, q=divisor, input_norms=input_norms, offset=offset)
    return torch.where(pruned != 0, b + pruned, b).to(finetuned.dtype)


@_no_grad
def keep_mask_for(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """The element-wise keep-mask that ``spec``'s method applies to ``delta`` (same shape, bool): its row's
    ``keep``.

    ``prune_tensor`` with any q keeps exactly these entries (and rescales them by its q), so a q search can build
    the mask once (:class:`~lifelong_delta.delta.darex.MaskedDelta`) and try each q with a rescale only.

    Args:
        name: Tensor name (keys random masks).
        delta: fp32 delta ``θ_ft − θ_pre``.
        spec: The method and its settings.
        input_norms: ``[in]`` ‖x_j‖₂ (``wanda``; optional for structural columns).
        offset: Flat index of ``delta``'s first element in the whole tensor (element-wise methods only).
    """
    _check_offset(name, spec, offset)
    return spec.row.keep(name, delta, spec, input_norms=input_norms, offset=offset).view(delta.shape)


@_no_grad
def masked_delta(
    name: str,
    delta: torch.Tensor,
    spec: PruneSpec,
    *,
    q: float | None,
    input_norms: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """fp32 ``δ ⊙ keep / q`` of one tensor: ``spec``'s mask (its seed and p) with an explicit divisor.

    The rescale policy of the spec is not consulted (:func:`prune_delta` applies it), so a caller with its own
    rescale, such as the DARE merges' ``1/d_i``, uses the method's mask unchanged.

    Args:
        name: Tensor name (keys the mask; named in errors).
        delta: Delta (any floating dtype, read as fp32): a whole tensor, or for an element-wise method a flat chunk.
        spec: The method and its settings.
        q: Divisor of the kept entries (``None``: ``1 − p``; 1: kept as they are).
        input_norms: ``[in]`` ‖x_j‖₂ for ``wanda`` (and optionally structural columns).
        offset: Flat index of ``delta``'s first element in the whole tensor (element-wise methods only).

    Raises:
        ValueError: bad q, non-finite delta, missing input norms (naming the tensor).
    """
    import torch

    from lifelong_delta.delta.choices import scale_of

    _check_offset(name, spec, offset)
    if spec.row.random_mask:
        from lifelong_delta.delta.dare import dare

        return dare(delta, spec.p, seed=spec.seed, name=name, q=q, offset=offset, force=spec.force)
    scale = scale_of(resolve_q(spec.p, q, force=spec.force, name=name))
    d = delta.detach().to(torch.float32)
    if not torch.isfinite(d).all():
        raise ValueError(f"tensor {name!r} has non-finite delta entries (NaN/inf in base or fine-tuned)")
    keep = keep_mask_for(name, d, spec, input_norms=input_norms, offset=offset)
    return torch.where(keep, d * scale if scale != 1.0 else d, torch.zeros((), device=d.device))


@_no_grad
def prune_delta(
    name: str,
    delta: torch.Tensor,
    spec: PruneSpec,
    *,
    input_norms: torch.Tensor | None = None,
    q: float | None = None,
) -> torch.Tensor:
    """fp32 pruned (and rescaled) delta for one tensor: the method of ``spec`` applied to a given delta.

    The merge ``θ_pre + pruned`` is the caller's (e.g. a LoRA product ``scaling · B A`` or a LoRA factor, which have
    no fine-tuned tensor to subtract from). Exclusion patterns are not applied here.

    Args:
        name: Tensor name (keys the mask; named in errors).
        delta: Delta tensor (any floating dtype).
        spec: The method and its settings.
        input_norms: ``[in]`` ‖x_j‖₂ for ``wanda`` (and optionally structural columns).
        q: Per-tensor q overriding ``spec.q``; used by the rescale ``q``.
    """
    if q is not None:
        resolve_q(spec.p, q, force=spec.force, name=name)
    return masked_delta(name, delta, spec, q=_q_divisor(name, spec, q), input_norms=input_norms)


# ---------------------------------------------------------------------------------------- the built-in keep functions
def _dare_keep(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """DARE's Bernoulli(1 − p) keep-mask, a hash of (seed, name, flat index)."""
    from lifelong_delta.delta.masks import keep_mask

    return keep_mask(delta.numel(), spec.p, seed=spec.seed, name=name, offset=offset, device=delta.device).view(
        delta.shape
    )


def _magnitude_keep(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """The top ``round((1 − p)·n)`` |δ| of each output row."""
    from lifelong_delta.delta.importance import importance_keep

    return importance_keep(delta, spec.p, score="magnitude", name=name).view(delta.shape)


def _wanda_keep(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """The top ``round((1 − p)·n)`` |δ_ij|·‖x_j‖₂ of each output row."""
    from lifelong_delta.delta.importance import importance_keep

    return importance_keep(delta, spec.p, score="wanda", input_norms=input_norms, name=name).view(delta.shape)


def _structural_keep(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Whole rows or columns of the ``[shape[0], -1]`` matrix (0/1-D tensors: single elements)."""
    from lifelong_delta.delta.structural import _as_matrix, structural_keep

    axis = spec.structural_axis if delta.dim() >= 2 else "rows"
    keep = structural_keep(
        delta, spec.p, axis=axis, select=spec.structural_select, seed=spec.seed, name=name, input_norms=input_norms
    )
    mat = _as_matrix(delta)
    return (keep[:, None] if axis == "rows" else keep[None, :]).expand(mat.shape).reshape(delta.shape)


def _structural_lines(spec: PruneSpec) -> Lines:
    return spec.structural_axis


# One explicit registry: users pick a method by string.
METHODS: dict[str, Method] = {
    # DARE, Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
    "dare": Method(
        _dare_keep,
        "https://arxiv.org/abs/2311.03099",
        "dare",
        rescales=("dare",),
        seeded=True,
        elementwise=True,
        random_mask=True,
    ),
    # DAREx-q, Deng et al., "DARE the Extreme", https://arxiv.org/abs/2410.09344 (§4): DARE's mask, rescale 1/q
    "darex-q": Method(
        _dare_keep,
        "https://arxiv.org/abs/2410.09344",
        "q",
        rescales=("q",),
        needs_q=True,
        seeded=True,
        elementwise=True,
        random_mask=True,
    ),
    # Magnitude pruning of the delta (importance-based DPP), https://arxiv.org/abs/2410.09344 (§5)
    "magnitude": Method(_magnitude_keep, "https://arxiv.org/abs/2410.09344", "none", needs_q=True, row_local=True),
    # WANDA (Sun et al.) https://arxiv.org/abs/2306.11695, on the delta as in https://arxiv.org/abs/2410.09344
    "wanda": Method(
        _wanda_keep, "https://arxiv.org/abs/2306.11695", "none", needs_q=True, needs_input_norms=True, row_local=True
    ),
    # Structural (row/column) delta pruning with DAREx-q rescale, https://arxiv.org/abs/2410.09344 (§5)
    "structural": Method(
        _structural_keep, "https://arxiv.org/abs/2410.09344", "q", seeded=True, lines=_structural_lines
    ),
}
