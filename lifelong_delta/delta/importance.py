"""Importance-based delta pruning: magnitude |δ| and WANDA |δ_ij|·‖x_j‖₂ (arXiv 2410.09344, §5).

Both variants are one top-k within each output row over different scores ("variants are settings").
WANDA on the delta follows Sun et al., arXiv 2306.11695. Input norms come from :func:`collect_input_stats`
(forward hooks on ``nn.Linear`` over calibration batches), which DAREx-q's analytic per-layer q shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "InputRecorder",
    "InputStats",
    "collect_input_stats",
    "importance_keep",
    "importance_prune",
    "importance_scores",
    "linear_modules",
    "n_keep",
]

Score = Literal["magnitude", "wanda"]
Rescale = Literal["none", "dare", "q"]


@dataclass
class InputStats:
    """Statistics of the inputs x of one ``nn.Linear`` over calibration tokens.

    Attributes:
        mean: ``[in_features]`` mean of x_j over tokens (fp32).
        sq_norm: ``[in_features]`` Σ_tokens x_j² (fp32); ``sq_norm.sqrt()`` is WANDA's ‖x_j‖₂.
        count: Number of tokens seen.
    """

    mean: torch.Tensor
    sq_norm: torch.Tensor
    count: int

    @property
    def norm(self) -> torch.Tensor:
        """``[in_features]`` ‖x_j‖₂ over the calibration tokens."""
        return self.sq_norm.sqrt()


def is_input_major(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map that stores its weight ``[in, out]`` (transformers' GPT-2 ``Conv1D``)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


class InputRecorder:
    """Forward hooks that add up the input statistics of linear modules, over as many forward passes as it sees.

    ``with recorder.attached({name: module, ...}):`` hooks the given modules for the calls inside the block; sums
    of one name accumulate across blocks, so a model run in parts (one layer at a time) gives the sums of one
    whole pass. Tokens are all leading dims of the input flattened; sums are fp32, in call order.
    """

    def __init__(self) -> None:
        self._sums: dict[str, list[Any]] = {}

    @contextmanager
    def attached(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str) -> Callable[..., None]:
        acc = self._sums.setdefault(name, [None, None, 0])

        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s1, s2 = x.sum(0), (x * x).sum(0)
            acc[0] = s1 if acc[0] is None else acc[0] + s1
            acc[1] = s2 if acc[1] is None else acc[1] + s2
            acc[2] += x.shape[0]

        return fn

    def stats(self, names: Iterable[str]) -> dict[str, InputStats]:
        """``{name: InputStats}`` of ``names``.

        Raises:
            ValueError: no input reached one of them.
        """
        out: dict[str, InputStats] = {}
        for n in names:
            s1, s2, count = self._sums.get(n, (None, None, 0))
            if count == 0:
                raise ValueError(f"batches: no calibration input reached {n!r}; pass at least one batch")
            out[n] = InputStats(mean=(s1 / count).cpu(), sq_norm=s2.cpu(), count=count)
        return out


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<module path>.weight": module}`` of every ``nn.Linear`` (and GPT-2 ``Conv1D``) of ``model``."""
    return {
        f"{path}.weight" if path else "weight": m
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) or is_input_major(m)
    }


def collect_input_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, InputStats]:
    """Mean and squared norm of every ``nn.Linear``'s (and GPT-2 ``Conv1D``'s) inputs, via forward hooks.

    Args:
        model: Model holding the weights whose inputs are measured (hooks are removed afterwards).
        batches: Calibration batches.
        forward_fn: ``forward_fn(model, batch)`` runs one forward pass; default ``model(batch)``.
        names: Weight names to collect (``"<module path>.weight"``); default: every ``nn.Linear``.

    Returns:
        ``{"<module path>.weight": InputStats}``; tokens are all leading dims of the input flattened.

    Raises:
        ValueError: a requested name is not the weight of an ``nn.Linear``, or no batch was seen.
    """
    linears = linear_modules(model)
    wanted = list(linears) if names is None else list(names)
    missing = [n for n in wanted if n not in linears]
    if missing:
        raise ValueError(
            f"names: {missing[0]!r} is not the weight of an nn.Linear in the model ({len(missing)} such names)"
        )
    recorder = InputRecorder()
    run = forward_fn or (lambda m, b: m(b))
    with recorder.attached({n: linears[n] for n in wanted}), torch.no_grad():
        for batch in batches:
            run(model, batch)
    return recorder.stats(wanted)


def n_keep(n: int, p: float) -> int:
    """Entries kept out of ``n`` at drop rate ``p``: ``round((1 - p) * n)`` (Python rounding)."""
    return round((1.0 - p) * n)


def importance_scores(
    delta: torch.Tensor, score: Score, input_norms: torch.Tensor | None = None, *, name: str = ""
) -> torch.Tensor:
    """fp32 importance of each delta entry: ``|δ|`` or ``|δ_ij|·‖x_j‖₂`` (``input_norms`` is ``[in]``).

    Args:
        delta: Delta of shape ``[out, in]`` (``wanda``) or any shape (``magnitude``).
        score: ``"magnitude"`` or ``"wanda"``.
        input_norms: ``[in]`` ‖x_j‖₂ (``wanda`` only).
        name: Tensor name for error messages.

    Returns:
        fp32 tensor of ``delta.shape``.
    """
    mag = delta.detach().to(torch.float32).abs()
    if score == "magnitude":
        return mag
    if score != "wanda":
        raise ValueError(f"score={score!r} is not one of 'magnitude', 'wanda'")
    if input_norms is None:
        raise ValueError(f"score='wanda' needs input_norms for tensor {name!r} (collect them with collect_input_stats)")
    if delta.dim() != 2 or input_norms.shape != (delta.shape[1],):
        raise ValueError(
            f"input_norms for tensor {name!r} has shape {tuple(input_norms.shape)}; "
            f"wanda needs a 2-D weight [out, in] and norms of shape [in]={delta.shape[-1]}"
        )
    return mag * input_norms.to(device=mag.device, dtype=torch.float32)


@torch.no_grad()
def importance_prune(
    delta: torch.Tensor,
    p: float,
    *,
    score: Score = "magnitude",
    input_norms: torch.Tensor | None = None,
    rescale: Rescale = "none",
    q: float | None = None,
    name: str = "",
    force: bool = False,
) -> torch.Tensor:
    """Keep the top ``round((1-p)·n)`` entries of each output row by importance.

    * 2-D ``[out, in]`` (and N-D, viewed as ``[shape[0], -1]``): top-k within each row, for both
      ``magnitude`` and ``wanda`` (per-row, as in WANDA; documented choice for magnitude too).
    * 0/1-D tensors (biases, norms): magnitude top-k over the whole tensor (``wanda`` falls back to it).

    Args:
        delta: Delta tensor (any floating dtype).
        p: Drop rate in ``[0, 1)``.
        score: ``"magnitude"`` (|δ|) or ``"wanda"`` (|δ_ij|·‖x_j‖₂).
        input_norms: ``[in]`` ‖x_j‖₂, required for ``wanda`` on 2-D tensors.
        rescale: ``"none"`` (×1), ``"dare"`` (×1/(1−p)) or ``"q"`` (×1/q).
        q: Rescale for ``rescale="q"``.
        name: Tensor name for error messages.
        force: Allow ``q`` outside ``[1 - p, 1]``.

    Returns:
        fp32 pruned (and rescaled) delta of ``delta.shape``.

    Raises:
        ValueError: bad ``p``, ``rescale``, missing ``q``/``input_norms``, or non-finite delta.
    """
    scale = _rescale_factor(p, rescale, q, force=force, name=name)
    d = delta.detach().to(torch.float32)
    keep = importance_keep(d, p, score=score, input_norms=input_norms, name=name)
    flat = d.reshape(keep.shape)
    out = torch.where(keep, flat * scale if scale != 1.0 else flat, torch.zeros((), device=flat.device))
    return out.view(delta.shape)


@torch.no_grad()
def importance_keep(
    delta: torch.Tensor,
    p: float,
    *,
    score: Score = "magnitude",
    input_norms: torch.Tensor | None = None,
    name: str = "",
) -> torch.Tensor:
    """Bool keep-mask of :func:`importance_prune`: the top ``round((1-p)·n)`` entries of each output row.

    ``input_norms`` of shape ``[in, 1]`` (instead of ``[in]``) says the weight is stored input-major, ``[in, out]``
    (GPT-2's ``Conv1D``): WANDA then ranks within each output column.

    Returns:
        ``BoolTensor`` of shape ``[shape[0], numel / shape[0]]`` (``[1, numel]`` for 0/1-D tensors); reshape it to
        ``delta.shape`` to use it element-wise.

    Raises:
        ValueError: bad ``p``, non-finite delta, missing or mis-shaped ``input_norms`` for ``wanda``.
    """
    from lifelong_delta.delta.dare import resolve_q

    resolve_q(p, None, name=name)
    d = delta.detach().to(torch.float32)
    if not torch.isfinite(d).all():
        raise ValueError(f"tensor {name!r} has non-finite delta entries (NaN/inf in base or fine-tuned)")
    if score == "wanda" and input_norms is not None and input_norms.dim() == 2:
        # norms of shape [in, 1] mark a weight stored input-major ([in, out], GPT-2's Conv1D): rank within each
        # output column, as WANDA ranks within each output row of an [out, in] weight
        if d.dim() != 2 or input_norms.shape != (d.shape[0], 1):
            raise ValueError(
                f"input_norms for tensor {name!r} has shape {tuple(input_norms.shape)}; an input-major "
                f"weight [in, out] of shape {tuple(d.shape)} needs norms of shape [{d.shape[0]}, 1]"
            )
        return importance_keep(d.T, p, score="wanda", input_norms=input_norms[:, 0], name=name).T.contiguous()
    if d.dim() < 2:
        flat = d.reshape(1, -1)
        scores = importance_scores(flat, "magnitude")
    else:
        flat = d.reshape(d.shape[0], -1)
        scores = importance_scores(flat, score, input_norms if score == "wanda" else None, name=name)
    k = n_keep(flat.shape[1], p)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, scores.topk(k, dim=1, sorted=False).indices, True)
    return keep


def _rescale_factor(p: float, rescale: str, q: float | None, *, force: bool, name: str) -> float:
    """Multiplier of the kept entries for ``rescale`` in {none, dare, q} (fp32-rounded)."""
    from lifelong_delta.delta.dare import resolve_q, scale_of

    resolve_q(p, None, name=name)  # validates p
    if rescale == "none":
        return 1.0
    if rescale == "dare":
        return scale_of(1.0 - p)
    if rescale == "q":
        if q is None:
            raise ValueError(f"rescale='q' needs q (tensor {name!r})")
        return scale_of(resolve_q(p, q, force=force, name=name))
    raise ValueError(f"rescale={rescale!r} is not one of 'none', 'dare', 'q'")
