"""Diagonal Fisher information estimators (pure functions; no Lightning).

EWC (Kirkpatrick et al., 2017, https://arxiv.org/abs/1612.00796) weights the anchor by the diagonal of the
Fisher F = E_x E_{y} [ (∂ log p(y|x) / ∂θ)² ]. The options follow the usual practice:

* ``estimator="per_sample"``: the mean of squared per-sample gradients, with ``torch.func.vmap(grad(...))``
  (the "empirical"/"true" Fisher depending on ``label``);
* ``estimator="batch"``: the mean over mini-batches of the squared gradient of the mini-batch mean loss, as
  the reference code of many CL papers computes it (cheap, biased toward zero);
* ``label``: ``"true"`` (the given targets, the empirical Fisher), ``"argmax"`` (the model's prediction) or
  ``"sampled"`` (y drawn from the model's predictive distribution: the true Fisher);
* ``head``: ``"softmax"`` (cross-entropy) or ``"bce"`` (sum over outputs of sigmoid binary cross-entropy).

Under ``torch.distributed`` the Fisher sum and the sample count are all-reduced, so with the same total data
the result equals the single-process value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["LogitsFn", "diagonal_fisher", "fisher_targets", "head_loss"]

LogitsFn = Callable[[nn.Module, Tensor], Tensor]
Head = Literal["bce", "softmax"]
Label = Literal["true", "argmax", "sampled"]
Estimator = Literal["per_sample", "batch"]

_HEADS = ("bce", "softmax")
_LABELS = ("true", "argmax", "sampled")
_ESTIMATORS = ("per_sample", "batch")
_CHUNK_BYTES = 1 << 30
_MAX_CHUNK = 64


def _default_logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def head_loss(logits: Tensor, target: Tensor, head: Head) -> Tensor:
    """Per-sample negative log-likelihood of the head.

    Args:
        logits: ``[B, C]``.
        target: class indices ``[B]`` (long), or for ``head="bce"`` also float targets ``[B, C]``.
        head: ``"softmax"``: cross-entropy; ``"bce"``: Σ_c BCE-with-logits against the one-hot (or given)
            targets.

    Returns:
        ``[B]`` losses. Works under ``torch.func.vmap``.
    """
    if head == "softmax":
        return -logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if not target.is_floating_point():
        classes = torch.arange(logits.shape[-1], device=logits.device)
        target = (classes == target.unsqueeze(-1)).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)


@torch.no_grad()
def fisher_targets(
    logits: Tensor, y: Tensor, *, head: Head, label: Label, generator: torch.Generator | None = None
) -> Tensor:
    """The targets whose log-likelihood gradient enters the Fisher.

    Args:
        logits: ``[B, C]`` model outputs (only read).
        y: ``[B]`` true class indices (or ``[B, C]`` float targets for the BCE head); used by
            ``label="true"``.
        head: ``"softmax"`` or ``"bce"``.
        label: ``"true"`` → ``y``; ``"argmax"`` → ``logits.argmax(-1)``; ``"sampled"`` →
            y ~ Categorical(softmax) for the softmax head, or independent y_c ~ Bernoulli(sigmoid) per output
            for the BCE head.
        generator: the source of randomness for ``"sampled"`` (uniforms are drawn on its device, so the
            labels do not depend on where the model runs).

    Returns:
        ``[B]`` long class indices, or ``[B, C]`` float targets (BCE head with ``label="sampled"`` or float
        ``y``).
    """
    if label == "true":
        return y.to(logits.device)
    if label == "argmax":
        return logits.argmax(-1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if head == "softmax":
        u = torch.rand(logits.shape[0], 1, generator=generator, device=gen_device).to(logits.device)
        cdf = logits.float().softmax(-1).cumsum(-1)
        return (cdf < u).sum(-1).clamp_max(logits.shape[-1] - 1)
    u = torch.rand(logits.shape, generator=generator, device=gen_device).to(logits.device)
    return (u < logits.float().sigmoid()).to(logits.dtype)


def _check_options(head: str, label: str, estimator: str) -> None:
    for value, choices, option in (
        (head, _HEADS, "head"),
        (label, _LABELS, "label"),
        (estimator, _ESTIMATORS, "estimator"),
    ):
        if value not in choices:
            raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}")


def _batches_capped(batches: Iterable[Sequence[Tensor]], cap: int | None) -> Iterable[tuple[Tensor, Tensor]]:
    seen = 0
    for batch in batches:
        if not isinstance(batch, Sequence) or len(batch) < 2:
            raise ValueError("batches must yield (x, y) pairs, e.g. a DataLoader over a labelled dataset")
        x, y = batch[0], batch[1]
        if cap is not None:
            if seen >= cap:
                return
            x, y = x[: cap - seen], y[: cap - seen]
        seen += len(x)
        yield x, y


class _LogitsModule(nn.Module):
    """``logits_fn(model, x)`` as a module, so ``functional_call`` can swap the parameters of ``model``."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn) -> None:
        super().__init__()
        self.model = model
        self.logits_fn = logits_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_fn(self.model, x)


def diagonal_fisher(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Sequence[Tensor]],
    *,
    logits_fn: LogitsFn | None = None,
    head: Head = "softmax",
    label: Label = "true",
    estimator: Estimator = "per_sample",
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher of the named parameters of ``model``.

    The model runs in eval mode (dropout off); each module's ``training`` flag is restored afterwards.

    Args:
        model: the network; its parameters are not modified.
        names: parameter names (from ``model.named_parameters()``) to estimate the Fisher for.
        batches: iterable of ``(x, y)`` (e.g. a DataLoader) with ``x`` ``[B, ...]`` and ``y`` ``[B]`` class
            indices (only read by ``label="true"``); both are moved to the parameters' device.
        logits_fn: ``logits_fn(model, x) -> [B, C]``, e.g. to keep only the current task's classes; default
            ``model(x)``. ``y`` indexes the columns it returns.
        head: ``"softmax"`` (cross-entropy) or ``"bce"`` (Σ_c sigmoid BCE).
        label: ``"true"``, ``"argmax"`` or ``"sampled"`` (see :func:`fisher_targets`).
        estimator: ``"per_sample"`` (mean of squared per-sample gradients) or ``"batch"`` (mean over
            batches of the squared gradient of the batch-mean loss).
        n_samples: use at most this many samples in total (split evenly over processes under DDP); ``None``:
            all.
        generator: randomness for ``label="sampled"``.
        chunk_size: samples per ``vmap`` call of the per-sample estimator; the per-sample gradients take
            ``chunk_size × #parameters`` floats. ``None``: as many as fit in about 1 GiB, at most 64.

    Returns:
        ``{name: F}`` in fp32 with each parameter's shape, on the parameter's device.

    Raises:
        ValueError: for an unknown option, an unknown name, or when ``batches`` yields no sample.
    """
    _check_options(head, label, estimator)
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer or None, got {n_samples!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    named = dict(model.named_parameters())
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"names {unknown[:3]} are not parameters of the model")
    params = {n: named[n] for n in names}
    if chunk_size is None:
        numel = sum(p.numel() for p in params.values())
        chunk_size = max(1, min(_MAX_CHUNK, _CHUNK_BYTES // max(1, 8 * numel)))  # fp32 grads + their squares
    logits_fn = logits_fn or _default_logits
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    cap = None if n_samples is None else math.ceil(n_samples / world)

    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    count = 0  # samples (per_sample) or batches (batch)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        wrapper = _LogitsModule(model, logits_fn)
        device = next(iter(params.values())).device if params else None
        for x, y in _batches_capped(batches, cap):
            if len(x) == 0:
                continue
            if device is not None:
                x, y = x.to(device), y.to(device)
            if estimator == "batch":
                count += _batch_step_(wrapper, params, x, y, head, label, generator, total)
            else:
                count += _per_sample_step_(wrapper, params, x, y, head, label, generator, chunk_size, total)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return _finish(total, count, distributed)


def _batch_step_(wrapper, params, x, y, head, label, generator, total) -> int:
    """Adds (∇ batch-mean loss)² to ``total`` in place; returns 1 (one batch)."""
    from torch.func import functional_call, grad

    def loss_batch(p: dict[str, Tensor]) -> Tensor:
        logits = functional_call(wrapper, p, (x,))
        target = fisher_targets(logits.detach(), y, head=head, label=label, generator=generator)
        return head_loss(logits, target, head).mean()

    grads = grad(loss_batch)({"model." + n: p.detach() for n, p in params.items()})
    for name in params:
        total[name].add_(grads["model." + name].float().square())
    return 1


def _per_sample_step_(wrapper, params, x, y, head, label, generator, chunk_size, total) -> int:
    """Adds Σ_samples (∇ loss_i)² to ``total`` in place with vmap(grad); returns the number of samples."""
    from torch.func import functional_call, grad, vmap

    detached = {"model." + n: p.detach() for n, p in params.items()}
    if label == "true":
        targets = y.to(x.device)
    else:
        with torch.no_grad():
            targets = fisher_targets(wrapper(x), y, head=head, label=label, generator=generator)

    def loss_one(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        logits = functional_call(wrapper, p, (xi.unsqueeze(0),))
        return head_loss(logits, ti.unsqueeze(0), head).sum()

    per_sample_grad = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    # fused attention kernels have no vmap batching rule (a slow per-sample fallback); the math one batches
    with sdpa_kernel([SDPBackend.MATH]):
        for start in range(0, len(x), chunk_size):
            grads = per_sample_grad(detached, x[start : start + chunk_size], targets[start : start + chunk_size])
            for name in params:
                total[name].add_(grads["model." + name].float().square().sum(0))
    return len(x)


def _finish(total: dict[str, Tensor], count: int, distributed: bool) -> dict[str, Tensor]:
    """Divide by the (all-reduced) count; under DDP all-reduce sums and count in one flat buffer."""
    if distributed:
        tensors = list(total.values())
        device = tensors[0].device if tensors else torch.device("cpu")
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor([float(count)], device=device)])
        torch.distributed.all_reduce(flat)
        count = round(flat[-1].item())
        offset = 0
        for name, t in total.items():
            total[name] = flat[offset : offset + t.numel()].view_as(t).clone()
            offset += t.numel()
    if count == 0:
        raise ValueError("batches yielded no sample; pass the data of the task to estimate the Fisher on")
    return {name: t.div_(count) for name, t in total.items()}
