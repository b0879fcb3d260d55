"""Counter-based, reproducible DARE masks.

A mask is a pure function of ``(seed, tensor name, flat element index)``: the key
``tensor_key(seed, name)`` is a 64-bit BLAKE2b hash, and element ``i`` gets a 32-bit word ``w_i`` from
two rounds of the "lowbias32" integer hash keyed by the two halves of the key (defined in ``_kernels``).
The element is dropped iff ``w_i < floor(p * 2**32)``, so the mask does not depend on the device, on
chunking (``offset``), on tensor order or on the world size, and two tensors with different names get
independent masks.

Two back ends compute the same bits:

* ``numba`` (if importable): a fused, parallel kernel over the flat tensor; this is the fast CPU path.
* ``torch``: the same hash in chunked int32 tensor ops; used on GPU tensors, when numba is missing,
  or when ``LIFELONG_DELTA_BACKEND=torch``.

``set_backend("torch" | "numba" | "auto")`` switches explicitly (tests compare both bit for bit).
"""

from __future__ import annotations

import torch

from lifelong_delta.delta import _kernels, _torch_kernels
from lifelong_delta.delta._kernels import MASK_BITS, Backend, drop_threshold, get_backend, set_backend, tensor_key

__all__ = [
    "MASK_BITS",
    "Backend",
    "drop_threshold",
    "get_backend",
    "keep_mask",
    "numba_available",
    "set_backend",
    "tensor_key",
    "uniform",
]


def numba_available() -> bool:
    """Whether the numba kernels can be used."""
    return _kernels.HAVE_NUMBA


def _use_numba(device: torch.device) -> bool:
    return _kernels.use_numba(device.type)


def _check_counts(numel: int, offset: int) -> None:
    if numel < 0:
        raise ValueError(f"numel={numel} must be >= 0")
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0")


def keep_mask(
    numel: int,
    p: float,
    *,
    seed: int,
    name: str,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Flat DARE keep-mask of elements ``offset .. offset + numel - 1`` of tensor ``name``.

    Args:
        numel: Number of elements to generate.
        p: Drop rate in ``[0, 1)``.
        seed: User seed.
        name: Tensor name (different names give independent masks).
        offset: Flat index of the first element, so that chunks concatenate to the whole mask.
        device: Where to build the mask; the bits are the same on every device.

    Returns:
        ``BoolTensor[numel]``, True = keep (probability ``1 - p``).
    """
    _check_counts(numel, offset)
    key = tensor_key(seed, name)
    thresh = drop_threshold(p)
    device = torch.device(device)
    if _use_numba(device):
        out = torch.empty(numel, dtype=torch.bool)
        from lifelong_delta.delta._nb_kernels import nb_keep_mask

        nb_keep_mask(out.numpy().view("uint8"), key, offset, thresh)
        return out
    return _torch_kernels.torch_keep_mask(numel, key, offset, thresh, device)


def uniform(
    numel: int,
    *,
    seed: int,
    name: str,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Counter-based uniforms from the same stream as :func:`keep_mask`.

    Element ``i`` is ``(w_i >> 8) * 2**-24`` (the top 24 of the 32 mask bits), so
    ``uniform(...) < p`` agrees with the drop decision up to the 2**-24 resolution.

    Returns:
        ``FloatTensor[numel]`` (float32) with values in ``[0, 1)``.
    """
    _check_counts(numel, offset)
    key = tensor_key(seed, name)
    device = torch.device(device)
    if _use_numba(device):
        out = torch.empty(numel, dtype=torch.float32)
        from lifelong_delta.delta._nb_kernels import nb_uniform

        nb_uniform(out.numpy(), key, offset)
        return out
    return _torch_kernels.torch_uniform(numel, key, offset, device)
