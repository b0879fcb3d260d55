"""Counter-based, reproducible DARE masks.

A mask is a pure function of ``(seed, tensor name, flat element index)``: the key
``tensor_key(seed, name)`` is a 64-bit BLAKE2b hash, and element ``i`` gets a 32-bit word ``w_i`` from
two rounds of the "lowbias32" integer hash keyed by the two halves of the key (see ``_kernels``).
The element is dropped iff ``w_i < floor(p * 2**32)``, so the mask does not depend on the device, on
chunking (``offset``), on tensor order or on the world size, and two tensors with different names get
independent masks.

Two back ends compute the same bits:

* ``numba`` (if importable): a fused, parallel kernel over the flat tensor; this is the fast CPU path.
* ``torch``: the same hash in chunked int64 tensor ops; used on GPU tensors, when numba is missing,
  or when ``LIFELONG_DELTA_BACKEND=torch``.

``set_backend("torch" | "numba" | "auto")`` switches explicitly (tests compare both bit for bit).
"""

from __future__ import annotations

import hashlib
import os
from typing import Literal

import torch

from lifelong_delta.delta import _kernels

__all__ = [
    "MASK_BITS",
    "tensor_key",
    "drop_threshold",
    "keep_mask",
    "uniform",
    "get_backend",
    "set_backend",
    "numba_available",
]

MASK_BITS = 32
"""Number of hash bits compared against the drop threshold."""

Backend = Literal["auto", "numba", "torch"]
_backend: Backend = "auto"


def tensor_key(seed: int, name: str) -> int:
    """64-bit key of one tensor's mask stream.

    Args:
        seed: User seed (any Python int; negative values are allowed).
        name: Tensor name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

    Returns:
        An int in ``[0, 2**64)``; a BLAKE2b-64 hash of ``(seed, name)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (the tensor name), got {type(name).__name__}")
    payload = f"{int(seed)}\x00{name}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def drop_threshold(p: float) -> int:
    """Integer threshold ``floor(p * 2**32)``: an element is dropped iff its 32-bit hash word is below it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p={p} is outside [0, 1): p is the drop rate")
    return int(float(p) * float(1 << MASK_BITS))


def numba_available() -> bool:
    """Whether the numba kernels can be used."""
    return _kernels.HAVE_NUMBA


def set_backend(backend: Backend) -> None:
    """Choose the mask back end: ``"auto"`` (numba on CPU if importable), ``"numba"`` or ``"torch"``."""
    global _backend
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'numba', 'torch'")
    if backend == "numba" and not _kernels.HAVE_NUMBA:
        raise ValueError("backend='numba' needs numba installed (pip install numba); use 'auto' or 'torch'")
    _backend = backend


def get_backend() -> Backend:
    """The back end chosen by :func:`set_backend` (``"auto"`` by default)."""
    return _backend


def _use_numba(device: torch.device) -> bool:
    if device.type != "cpu" or not _kernels.HAVE_NUMBA:
        return False
    if _backend == "torch":
        return False
    if _backend == "auto" and os.environ.get("LIFELONG_DELTA_BACKEND", "auto") == "torch":
        return False
    return True


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
        _kernels.nb_keep_mask(out.numpy().view("uint8"), key, offset, thresh)
        return out
    return _kernels.torch_keep_mask(numel, key, offset, thresh, device)


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
        _kernels.nb_uniform(out.numpy(), key, offset)
        return out
    return _kernels.torch_uniform(numel, key, offset, device)
