"""Registry of delta-pruning methods and the per-tensor entry point the streaming engine calls.

Every method maps ``(name, θ_pre, θ_ft, spec)`` to the merged tensor ``θ_pre + pruned δ`` in the
fine-tuned dtype. Users pick a method by string (``PruneSpec.method``); variants are settings.

Importing this module loads no torch (the registry and :class:`PruneSpec` are needed before the streaming prune
knows whether any tensor needs torch); the method functions import their modules when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from lifelong_delta.delta.choices import MethodName, RescaleName, resolve_q
from lifelong_delta.delta.matching import is_excluded

if TYPE_CHECKING:
    import torch

__all__ = ["METHODS", "Method", "PruneSpec", "keep_mask_for", "prune_delta", "prune_tensor"]

_F = TypeVar("_F", bound=Callable[..., object])


def _no_grad(fn: _F) -> _F:
    """``torch.no_grad()`` around ``fn``, importing torch only when ``fn`` runs."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Method:
    """One registry entry.

    Attributes:
        fn: ``fn(name, base, finetuned, spec, input_norms, q) -> merged tensor``; a random-mask method's also takes
            ``offset=`` (where a shard starts in the flattened tensor).
        paper: Where the method comes from.
        default_rescale: Rescale used when ``PruneSpec.rescale`` is None.
        needs_input_norms: The method needs ``‖x_j‖₂`` from calibration activations for 2-D weights.
        random_mask: DARE's counter-based mask with the rescale 1/q: output element i depends on element i and its
            flat index only, so whole checkpoints stream chunk by chunk through the fused DARE kernels (on raw
            bf16/fp32 words, without torch).
        row_local: The mask of each output row of a weight (``shape[0]`` slices of a tensor of 2 or more dims)
            depends on that row alone (top-k per row), so such tensors stream a block of rows at a time. A weight
            stored input-major (GPT-2's ``Conv1D``, WANDA norms of shape ``[in, 1]``), 0/1-D tensors, and methods
            with neither property see one whole tensor at a time.
    """

    fn: Callable[..., torch.Tensor]
    paper: str
    default_rescale: RescaleName
    needs_input_norms: bool = False
    random_mask: bool = False
    row_local: bool = False


@dataclass
class PruneSpec:
    """What to prune and how; validated on construction.

    Attributes:
        method: One of :data:`METHODS`.
        p: Drop rate in ``[0, 1)``.
        q: DAREx-q rescale (kept entries ×1/q). Needed by ``darex-q`` and ``rescale="q"``, either here or
            per tensor via ``prune_tensor(..., q=...)`` (e.g. after a q search).
        rescale: ``"none"`` | ``"dare"`` (1/(1−p)) | ``"q"`` (1/q); default per method
            (dare → dare, darex-q → q, magnitude/wanda → none, structural → q with q=None meaning 1−p).
        structural_axis: ``"rows"`` or ``"columns"`` (structural only).
        structural_select: ``"random"`` or ``"importance"`` (structural only).
        seed: Mask seed.
        exclude: Glob patterns of tensor names left untouched (copied from the fine-tuned model).
        force: Allow ``q`` outside ``[1 − p, 1]``.
    """

    method: MethodName
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
        if self.rescale is None:
            # a q given to an importance method means "rescale by 1/q" (its default is no rescale)
            default = METHODS[self.method].default_rescale
            self.rescale = "q" if self.q is not None and default == "none" else default
        if self.rescale not in ("none", "dare", "q"):
            raise ValueError(f"rescale={self.rescale!r} is not one of 'none', 'dare', 'q'")
        if METHODS[self.method].random_mask and self.rescale != METHODS[self.method].default_rescale:
            raise ValueError(f"rescale={self.rescale!r} does not apply to method={self.method!r} "
                             f"(it always uses {METHODS[self.method].default_rescale!r}); drop the option")
        if self.method == "dare" and self.q is not None:
            raise ValueError("q is set but method='dare' rescales by 1/(1-p); "
                             "use method='darex-q' to rescale by 1/q")
        if self.rescale in ("none", "dare") and self.q is not None:
            raise ValueError(f"q is set but rescale={self.rescale!r}; use rescale='q' or drop q")
        resolve_q(self.p, self.q, force=self.force)  # p in [0, 1); q in [1-p, 1] unless force
        if self.structural_axis not in ("rows", "columns"):
            raise ValueError(f"structural_axis={self.structural_axis!r} is not one of 'rows', 'columns'")
        if self.structural_select not in ("random", "importance"):
            raise ValueError(f"structural_select={self.structural_select!r} is not one of "
                             "'random', 'importance'")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")


@_no_grad
def prune_tensor(
    name: str,
    base: torch.Tensor,
    finetuned: torch.Tensor,
    spec: PruneSpec,
    *,
    input_norms: torch.Tensor | None = None,
    q: float | None = None,
) -> torch.Tensor:
    """Merged tensor ``θ_pre + pruned(θ_ft − θ_pre)`` in ``finetuned.dtype``, for one tensor.

    Non-floating tensors and tensors matched by ``spec.exclude`` are returned as ``finetuned`` unchanged.

    Args:
        name: Tensor name (keys the mask; named in errors).
        base: Pretrained tensor.
        finetuned: Fine-tuned tensor (same shape; dtype may differ, compute is fp32).
        spec: The method and its settings.
        input_norms: ``[in]`` ‖x_j‖₂ for ``wanda`` (and optionally structural columns).
        q: Per-tensor q overriding ``spec.q`` (e.g. from ``analytic_q_per_layer``).

    Raises:
        ValueError: shape mismatch, non-finite delta, missing q or input norms (naming the tensor).
    """
    if base.shape != finetuned.shape:
        raise ValueError(f"tensor {name!r}: base shape {tuple(base.shape)} != fine-tuned shape "
                         f"{tuple(finetuned.shape)}")
    if not (finetuned.is_floating_point() and base.is_floating_point()) or is_excluded(name, spec.exclude):
        return finetuned
    if finetuned.numel() == 0:  # nothing to prune (and no row to take a top-k of)
        return finetuned
    q_eff = spec.q if q is None else q
    if q is not None:
        resolve_q(spec.p, q, force=spec.force, name=name)
    return METHODS[spec.method].fn(name, base, finetuned, spec, input_norms, q_eff)


@_no_grad
def keep_mask_for(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """The element-wise keep-mask that ``spec``'s method applies to ``delta`` (same shape, bool).

    ``prune_tensor`` with any q keeps exactly these entries (and rescales them by its q), so a q search can build
    the mask once (:class:`~lifelong_delta.delta.darex.MaskedDelta`) and try each q with a rescale only.

    Args:
        name: Tensor name (keys random masks).
        delta: fp32 delta ``θ_ft − θ_pre``.
        spec: The method and its settings.
        input_norms: ``[in]`` ‖x_j‖₂ (``wanda``; optional for structural columns).
    """
    from lifelong_delta.delta.importance import importance_keep
    from lifelong_delta.delta.masks import keep_mask
    from lifelong_delta.delta.structural import _as_matrix, structural_keep

    if METHODS[spec.method].random_mask:
        return keep_mask(delta.numel(), spec.p, seed=spec.seed, name=name, device=delta.device).view(delta.shape)
    if spec.method in ("magnitude", "wanda"):
        norms = input_norms if spec.method == "wanda" else None
        return importance_keep(delta, spec.p, score=spec.method, input_norms=norms, name=name).view(delta.shape)
    axis = spec.structural_axis if delta.dim() >= 2 else "rows"
    keep = structural_keep(delta, spec.p, axis=axis, select=spec.structural_select, seed=spec.seed, name=name,
                           input_norms=input_norms)
    mat = _as_matrix(delta)
    return (keep[:, None] if axis == "rows" else keep[None, :]).expand(mat.shape).reshape(delta.shape)


def _delta(name: str, base: torch.Tensor, finetuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    b = base.detach().to(device=finetuned.device, dtype=torch.float32)
    return b, finetuned.detach().to(torch.float32) - b


def _dare(name: str, base: torch.Tensor, ft: torch.Tensor, spec: PruneSpec, norms: torch.Tensor | None,
          q: float | None, offset: int = 0) -> torch.Tensor:
    """``offset``: where ``base`` and ``ft`` start in the flattened tensor (a shard of it), which keys the mask."""
    if spec.method == "darex-q" and q is None:
        raise ValueError(f"method='darex-q' needs q for tensor {name!r}: set q, or choose it with a q search "
                         "and pass prune_tensor(..., q=...)")
    from lifelong_delta.delta.dare import dare_merge

    return dare_merge(base, ft, spec.p, seed=spec.seed, name=name, q=q, offset=offset, force=spec.force)


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
        q: Per-tensor q overriding ``spec.q``.
    """
    from lifelong_delta.delta.dare import dare
    from lifelong_delta.delta.importance import importance_prune
    from lifelong_delta.delta.structural import structural_prune

    q_eff = spec.q if q is None else q
    if q is not None:
        resolve_q(spec.p, q, force=spec.force, name=name)
    if METHODS[spec.method].random_mask:
        if spec.method == "darex-q" and q_eff is None:
            raise ValueError(f"method='darex-q' needs q for tensor {name!r}")
        return dare(delta, spec.p, seed=spec.seed, name=name, q=q_eff if spec.method == "darex-q" else None,
                    force=spec.force)
    if spec.method in ("magnitude", "wanda"):
        return importance_prune(delta, spec.p, score=spec.method, input_norms=input_norms, rescale=spec.rescale,
                                q=q_eff, name=name, force=spec.force)
    q_s = 1.0 if spec.rescale == "none" else None if spec.rescale == "dare" else q_eff
    return structural_prune(delta, spec.p, axis=spec.structural_axis, select=spec.structural_select, seed=spec.seed,
                            name=name, q=q_s, input_norms=input_norms, force=spec.force)


def _importance(name: str, base: torch.Tensor, ft: torch.Tensor, spec: PruneSpec, norms: torch.Tensor | None,
                q: float | None) -> torch.Tensor:
    import torch

    b, d = _delta(name, base, ft)
    pruned = prune_delta(name, d, spec, input_norms=norms, q=q)
    return torch.where(pruned != 0, b + pruned, b).to(ft.dtype)


def _structural(name: str, base: torch.Tensor, ft: torch.Tensor, spec: PruneSpec, norms: torch.Tensor | None,
                q: float | None) -> torch.Tensor:
    import torch

    b, d = _delta(name, base, ft)
    pruned = prune_delta(name, d, spec, input_norms=norms, q=q)
    return torch.where(pruned != 0, b + pruned, b).to(ft.dtype)


# One explicit registry: users pick a method by string.
METHODS: dict[str, Method] = {
    # DARE, Yu et al., "Language Models are Super Mario", https://arxiv.org/abs/2311.03099
    "dare": Method(_dare, "https://arxiv.org/abs/2311.03099", "dare", random_mask=True),
    # DAREx-q, Deng et al., "DARE the Extreme", https://arxiv.org/abs/2410.09344 (§4)
    "darex-q": Method(_dare, "https://arxiv.org/abs/2410.09344", "q", random_mask=True),
    # Magnitude pruning of the delta (importance-based DPP), https://arxiv.org/abs/2410.09344 (§5)
    "magnitude": Method(_importance, "https://arxiv.org/abs/2410.09344", "none", row_local=True),
    # WANDA (Sun et al.) https://arxiv.org/abs/2306.11695, on the delta as in https://arxiv.org/abs/2410.09344
    "wanda": Method(_importance, "https://arxiv.org/abs/2306.11695", "none", needs_input_norms=True,
                    row_local=True),
    # Structural (row/column) delta pruning with DAREx-q rescale, https://arxiv.org/abs/2410.09344 (§5)
    "structural": Method(_structural, "https://arxiv.org/abs/2410.09344", "q"),
}
