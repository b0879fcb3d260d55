"""The torch back end of the DARE mask stream (:mod:`._kernels` defines it), and the numba merge for torch tensors.

``torch_*`` compute the mask words with int32 tensor ops on any device; :func:`nb_merge` adapts torch tensors of any
floating dtype to the numba kernels. Both give the bits of :mod:`._kernels`.

:func:`hash_words` is the hash as a pure function of tensors (the keys and the first counter are 0-dim tensors, so
one compiled graph serves every tensor name and chunk): ``set_backend("compile")`` runs it through
``torch.compile`` (a Triton kernel on GPU, C++ on CPU), with the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from lifelong_delta.delta._kernels import MIX1, MIX2, SEGMENT, round_key, segments, split_key

TORCH_CHUNK = 1 << 15  # elements per torch block on CPU: L2-sized, and at torch's grain size, so each op
# runs on one thread (intra-op thread wake-ups per small op are ruinous on a busy machine)
TORCH_CHUNK_ACCEL = 1 << 24  # elements per block on accelerators (few, large kernel launches)


_M32 = 0xFFFFFFFF


def _s32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >= 1 << 31 else x


_ARANGE: dict[torch.device, torch.Tensor] = {}


def _arange32(n: int, device: torch.device) -> torch.Tensor:
    a = _ARANGE.get(device)
    if a is None or a.numel() < n:
        a = _ARANGE[device] = torch.arange(max(n, TORCH_CHUNK), dtype=torch.int32, device=device)
    return a[:n]


def _lb32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 words (logical shifts emulated with masks); no in-place ops, so it compiles."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _s32(MIX1)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _s32(MIX2)
    return x ^ ((x >> 16) & 0xFFFF)


def hash_words(counter: torch.Tensor, lo0: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """int32 words (bit patterns of the uint32 hash) of counters ``lo0 + counter`` (int32 tensors; the sums wrap
    like uint32), keyed by the round keys ``k0, k1`` (0-dim int32 tensors)."""
    return _lb32(_lb32((counter + lo0) ^ k0) ^ k1)


_compiled: dict[str, object] = {}


def _hash_fn():
    """:func:`hash_words`, compiled when the back end is ``"compile"`` (built on first use)."""
    from lifelong_delta.delta import _kernels

    if _kernels.get_backend() != "compile":
        return hash_words
    if "hash" not in _compiled:
        _compiled["hash"] = torch.compile(hash_words, dynamic=True)
    return _compiled["hash"]


def _torch_words(k0: int, k1: int, lo0: int, n: int, device: torch.device) -> torch.Tensor:
    """int32 words of counters ``lo0 .. lo0 + n - 1`` (same segment)."""

    def scalar(v: int) -> torch.Tensor:
        return torch.tensor(_s32(v), dtype=torch.int32, device=device)

    return _hash_fn()(_arange32(n, device), scalar(lo0), scalar(k0), scalar(k1))


def _torch_blocks(key: int, offset: int, numel: int, device: torch.device):
    """Yield ``(start, stop, words)`` blocks covering ``numel`` elements from ``offset``."""
    k0, k1 = split_key(key)
    chunk = TORCH_CHUNK if device.type == "cpu" else TORCH_CHUNK_ACCEL
    for s0, s1, lo0, hi in segments(offset, numel):
        kr = round_key(k1, hi)
        for s in range(s0, s1, chunk):
            e = min(s1, s + chunk)
            yield s, e, _torch_words(k0, kr, lo0 + (s - s0), e - s, device)


def _keep_of(words: torch.Tensor, thresh: int) -> torch.Tensor:
    # unsigned compare x >= t  <=>  signed compare with the sign bit flipped
    return (words ^ _s32(1 << 31)) >= _s32(thresh ^ (1 << 31))


def torch_keep_mask(numel: int, key: int, offset: int, thresh: int, device: torch.device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for s, e, w in _torch_blocks(key, offset, numel, device):
        out[s:e] = _keep_of(w, thresh)
    return out


def torch_uniform(numel: int, key: int, offset: int, device: torch.device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for s, e, w in _torch_blocks(key, offset, numel, device):
        out[s:e] = ((w >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24
    return out


def torch_merge(
    base: torch.Tensor | None,
    src: torch.Tensor,
    out: torch.Tensor,
    key: int,
    offset: int,
    thresh: int,
    scale: float,
) -> int:
    """Flat fused DARE: ``out = base + keep * (src - base) * scale`` (``base=None``: src is the delta).

    Returns the number of non-finite delta entries.
    """
    nbad = torch.zeros((), dtype=torch.int64, device=out.device)
    zero = torch.zeros((), dtype=torch.float32, device=out.device)
    for s, e, w in _torch_blocks(key, offset, out.numel(), out.device):
        keep = _keep_of(w, thresh)
        f = src[s:e].to(torch.float32)
        if base is None:
            d = f
            res = torch.where(keep, d * scale, zero)
        else:
            b = base[s:e].to(torch.float32)
            d = f - b
            res = torch.where(keep, b + d * scale, b)
        nbad += (d - d).ne(0).sum()
        out[s:e] = res
    return int(nbad)


def nb_merge(
    base: torch.Tensor | None,
    src: torch.Tensor,
    out: torch.Tensor,
    key: int,
    offset: int,
    thresh: int,
    scale: float,
) -> int:
    """numba twin of :func:`torch_merge` for flat contiguous CPU tensors of any floating dtype."""
    from lifelong_delta.delta import _nb_kernels as nb

    t, sc, f32 = np.uint32(thresh), np.float32(scale), torch.float32
    direct = src.dtype == f32 and out.dtype == f32 and (base is None or base.dtype == f32)
    step = SEGMENT if direct else nb.NUMBA_CHUNK
    buf = None if direct else torch.empty(min(out.numel(), nb.NUMBA_CHUNK), dtype=f32)
    nbad = 0
    with nb._LOCK:
        for s0, s1, k0, k1, lo0 in nb._nb_segments(key, offset, out.numel()):
            for s in range(s0, s1, step):
                e = min(s1, s + step)
                lo = np.uint32(int(lo0) + (s - s0))
                o = out[s:e] if out.dtype == f32 else buf[: e - s]
                f = src[s:e].to(f32).numpy()
                par = nb._parallel(e - s)
                if base is None:
                    run = nb._par_dare if par else nb._ser_dare
                    nbad += int(run(f, o.numpy(), k0, k1, lo, t, sc))
                else:
                    run = nb._par_merge if par else nb._ser_merge
                    nbad += int(run(base[s:e].to(f32).numpy(), f, o.numpy(), k0, k1, lo, t, sc))
                if out.dtype != f32:
                    out[s:e] = o
    return nbad
