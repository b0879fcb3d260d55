"""DARE: drop delta entries with probability p and rescale the kept ones (Yu et al., arXiv 2311.03099).

DAREx-q (Deng et al., "DARE the Extreme", arXiv 2410.09344) is the same operation with the rescale
``1/q`` instead of ``1/(1-p)``; ``q=None`` means ``q = 1 - p`` (plain DARE). The mask comes from
:mod:`lifelong_delta.delta.masks`, so it is a pure function of ``(seed, name, element index)``.
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong_delta.delta import _kernels, _torch_kernels
from lifelong_delta.delta.choices import resolve_q, scale_of
from lifelong_delta.delta.dtypes import dtype_code
from lifelong_delta.delta.masks import _use_numba, drop_threshold, tensor_key

__all__ = ["dare", "dare_merge", "resolve_q", "scale_of"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1)


def _check_finite(nbad: int, name: str) -> None:
    if nbad:
        raise ValueError(f"tensor {name!r} has {nbad} non-finite delta entries (NaN/inf in base or fine-tuned)")


@torch.no_grad()
def dare(
    delta: torch.Tensor,
    p: float,
    *,
    seed: int,
    name: str,
    q: float | None = None,
    offset: int = 0,
    force: bool = False,
) -> torch.Tensor:
    """Drop-and-rescale one delta tensor.

    Args:
        delta: Delta ``θ_ft − θ_pre`` of any shape and floating dtype.
        p: Drop rate in ``[0, 1)``.
        seed: Mask seed.
        name: Tensor name (keys the mask).
        q: DAREx-q rescale; kept entries are multiplied by ``1/q``. ``None`` → ``1 - p``.
        offset: Flat index of ``delta[0]`` in the full tensor (for chunked processing).
        force: Allow ``q`` outside ``[1 - p, 1]``.

    Returns:
        fp32 tensor of ``delta.shape``: ``delta * keep / q``.

    Raises:
        ValueError: bad ``p``/``q``, or non-finite entries in ``delta`` (naming the tensor).
    """
    if not delta.is_floating_point():
        raise TypeError(f"tensor {name!r} has dtype {delta.dtype}; DARE needs a floating tensor")
    q = resolve_q(p, q, force=force, name=name)
    key, thresh, scale = tensor_key(seed, name), drop_threshold(p), scale_of(q)
    src = _flat(delta)
    out = torch.empty(src.numel(), dtype=torch.float32, device=src.device)
    run = _torch_kernels.nb_merge if _use_numba(src.device) else _torch_kernels.torch_merge
    _check_finite(run(None, src, out, key, offset, thresh, scale), name)
    return out.view(delta.shape)


@torch.no_grad()
def dare_merge(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    p: float,
    *,
    seed: int,
    name: str,
    q: float | None = None,
    out_dtype: torch.dtype | None = None,
    offset: int = 0,
    force: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``θ_pre + dare(θ_ft − θ_pre)`` in one pass (fp32 compute).

    Dropped entries are exactly ``base`` (converted to ``out_dtype``); kept entries are
    ``base + (ft − base) / q`` computed in fp32. CPU tensors of one dtype, fp32 or bf16, go through the compiled
    kernel of the streaming prune; others through numba or torch, with the same bits.

    Args:
        base: Pretrained tensor ``θ_pre``.
        finetuned: Fine-tuned tensor ``θ_ft`` of the same shape (its dtype may differ).
        p: Drop rate in ``[0, 1)``.
        seed: Mask seed.
        name: Tensor name (keys the mask; named in errors).
        q: DAREx-q rescale (``None`` → ``1 - p``).
        out_dtype: Output dtype; default: ``finetuned.dtype``.
        offset: Flat index of the first element (chunked processing).
        force: Allow ``q`` outside ``[1 - p, 1]``.
        out: Optional contiguous buffer of ``finetuned.numel()`` elements to write into (its dtype wins
            over ``out_dtype``); lets a streaming caller reuse one buffer.

    Returns:
        Merged tensor of ``finetuned.shape`` in ``out_dtype`` (``out`` viewed to that shape if given).

    Raises:
        ValueError: shape mismatch, bad ``p``/``q``, or non-finite delta (naming the tensor).
    """
    if base.shape != finetuned.shape:
        raise ValueError(
            f"tensor {name!r}: base shape {tuple(base.shape)} != fine-tuned shape {tuple(finetuned.shape)}"
        )
    if not (base.is_floating_point() and finetuned.is_floating_point()):
        raise TypeError(f"tensor {name!r} is not floating ({base.dtype}, {finetuned.dtype}); copy it instead")
    q = resolve_q(p, q, force=force, name=name)
    out_dtype = out_dtype or finetuned.dtype
    key, thresh, scale = tensor_key(seed, name), drop_threshold(p), scale_of(q)
    b, f = _flat(base), _flat(finetuned)
    if b.device != f.device:
        b = b.to(f.device)
    if out is None:
        out = torch.empty(f.numel(), dtype=out_dtype, device=f.device)
    elif out.numel() != f.numel() or not out.is_contiguous() or out.device != f.device:
        raise ValueError(
            f"out for tensor {name!r} must be a contiguous tensor of {f.numel()} elements on "
            f"{f.device}, got {tuple(out.shape)} on {out.device}"
        )
    flat_out = out.view(-1)
    code = dtype_code(f.dtype)
    if (
        f.device.type == "cpu"
        and b.dtype == f.dtype == flat_out.dtype
        and code in _kernels.WORD_CODES
        and _kernels.use_words()
    ):
        nbad = _kernels.merge_words(code, _words(b), _words(f), _words(flat_out), key, offset, thresh, scale)[0]
    else:
        run = _torch_kernels.nb_merge if _use_numba(f.device) else _torch_kernels.torch_merge
        nbad = run(b, f, flat_out, key, offset, thresh, scale)
    _check_finite(nbad, name)
    return flat_out.view(finetuned.shape)


def _words(t: torch.Tensor) -> np.ndarray:
    """The raw words of a contiguous CPU tensor: fp32 as itself, bf16 as its uint16 bits."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)
