"""Private kernels behind :mod:`lifelong_delta.delta.masks`: one hash, two back ends (numba, torch).

The 64-bit tensor key is split into two 32-bit round keys ``k0, k1``. Element ``i`` (flat index) gets
the 32-bit word ``w_i = lb32(lb32(lo ^ k0) ^ k1')`` with ``lo = i mod 2**32``, ``k1' = k1 + (i >> 32) *
0x9E3779B9`` and ``lb32`` the "lowbias32" integer hash; 32-bit lanes vectorise well (AVX2 ``vpmulld``).
An element is dropped iff ``w_i < floor(p * 2**32)``; its uniform is ``(w_i >> 8) * 2**-24``. Both back ends
compute the same bits; fp32 arithmetic is done in the same order (``d = ft - base``;
``out = base + d * scale`` if kept else ``base``), without fused multiply-adds, so results agree bit
for bit.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

try:  # numba is optional: the torch path gives the same bits
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None
    HAVE_NUMBA = False

GOLDEN32 = 0x9E3779B9
MIX1 = 0x7FEB352D  # "lowbias32" constants (C. Wellons, hash-prospector)
MIX2 = 0x846CA68B
SEGMENT = 1 << 32  # the hash counter is 32-bit; longer ranges are split into segments with their own key
TORCH_CHUNK = 1 << 15  # elements per torch block on CPU: L2-sized, and at torch's grain size, so each op
# runs on one thread (intra-op thread wake-ups per small op are ruinous on a busy machine)
TORCH_CHUNK_ACCEL = 1 << 24  # elements per block on accelerators (few, large kernel launches)
NUMBA_CHUNK = 1 << 20  # elements per block when dtypes must be converted around the numba kernel
PAR_BLOCK = 1 << 14  # elements per parallel work item
SERIAL_BELOW = 1 << 16  # smaller ranges run single-threaded (thread wake-ups cost more than they save)

_LOCK = threading.Lock()  # the numba thread pool must not be entered by two Python threads at once


def split_key(key: int) -> tuple[int, int]:
    """The two 32-bit round keys of a 64-bit tensor key."""
    return key & 0xFFFFFFFF, key >> 32


def segments(offset: int, numel: int) -> list[tuple[int, int, int, int]]:
    """Split flat indices ``[offset, offset + numel)`` at multiples of 2**32.

    Returns:
        ``[(start, stop, lo0, hi), ...]`` with positions ``start..stop`` relative to ``offset``, the
        32-bit counter ``lo0`` of the first element and the segment number ``hi``.
    """
    out, s = [], 0
    while s < numel:
        g = offset + s
        stop = min(numel, s + SEGMENT - (g % SEGMENT))
        out.append((s, stop, g % SEGMENT, g // SEGMENT))
        s = stop
    return out


def round_key(k1: int, hi: int) -> int:
    """Second-round key of segment ``hi``."""
    return (k1 + hi * GOLDEN32) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------- torch
_M32 = 0xFFFFFFFF


def _s32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >= 1 << 31 else x


def _lb32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 words in place (logical shifts emulated with masks)."""
    x ^= (x >> 16) & 0xFFFF
    x.mul_(_s32(MIX1))
    x ^= (x >> 15) & 0x1FFFF
    x.mul_(_s32(MIX2))
    x ^= (x >> 16) & 0xFFFF
    return x


_ARANGE: dict[torch.device, torch.Tensor] = {}


def _arange32(n: int, device: torch.device) -> torch.Tensor:
    a = _ARANGE.get(device)
    if a is None or a.numel() < n:
        a = _ARANGE[device] = torch.arange(max(n, TORCH_CHUNK), dtype=torch.int32, device=device)
    return a[:n]


def _torch_words(k0: int, k1: int, lo0: int, n: int, device: torch.device) -> torch.Tensor:
    """int32 words (bit patterns of the uint32 hash) of counters ``lo0 .. lo0 + n - 1`` (same segment)."""
    x = _arange32(n, device).add(_s32(lo0))  # int32 add wraps like uint32
    x ^= _s32(k0)
    x = _lb32_(x)
    x ^= _s32(k1)
    return _lb32_(x)


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


# ----------------------------------------------------------------------------------------------- numba
if HAVE_NUMBA:
    _U32 = np.uint32
    _MIX1, _MIX2 = _U32(MIX1), _U32(MIX2)
    _ZERO = np.float32(0.0)

    @njit(inline="always", cache=True)
    def _lb32(x):  # pragma: no cover - compiled; casts keep LLVM in 32-bit lanes
        x = _U32(x ^ (x >> _U32(16)))
        x = _U32(x * _MIX1)
        x = _U32(x ^ (x >> _U32(15)))
        x = _U32(x * _MIX2)
        return _U32(x ^ (x >> _U32(16)))

    @njit(inline="always", cache=True)
    def _word(k0, k1, lo0, i):  # pragma: no cover - compiled
        return _lb32(_U32(_lb32(_U32(_U32(lo0 + _U32(i)) ^ k0)) ^ k1))

    # Each op is written once over a range [start, stop); the parallel kernels split the tensor into
    # blocks of PAR_BLOCK elements (prange over blocks), the serial ones (small tensors: no thread
    # wake-ups) run the range in one go. Both give the same bits.
    @njit(inline="always", cache=True)
    def _merge_range(base, ft, out, k0, k1, lo0, thresh, scale, start, stop):  # pragma: no cover
        nbad = 0
        for i in range(start, stop):
            b = base[i]
            d = ft[i] - b
            nbad += (d - d) != _ZERO
            out[i] = b + d * scale if _word(k0, k1, lo0, i) >= thresh else b
        return nbad

    @njit(inline="always", cache=True)
    def _dare_range(delta, out, k0, k1, lo0, thresh, scale, start, stop):  # pragma: no cover
        nbad = 0
        for i in range(start, stop):
            d = delta[i]
            nbad += (d - d) != _ZERO
            out[i] = d * scale if _word(k0, k1, lo0, i) >= thresh else _ZERO
        return nbad

    @njit(inline="always", cache=True)
    def _keep_range(out, k0, k1, lo0, thresh, start, stop):  # pragma: no cover
        for i in range(start, stop):
            out[i] = _word(k0, k1, lo0, i) >= thresh

    @njit(inline="always", cache=True)
    def _uniform_range(out, k0, k1, lo0, start, stop):  # pragma: no cover
        for i in range(start, stop):
            out[i] = np.float32(_word(k0, k1, lo0, i) >> _U32(8)) * np.float32(2.0**-24)

    @njit(parallel=True, cache=True, nogil=True)
    def _par_merge(base, ft, out, k0, k1, lo0, thresh, scale):  # pragma: no cover - compiled
        n, nbad = out.size, 0
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s = blk * PAR_BLOCK
            nbad += _merge_range(base, ft, out, k0, k1, lo0, thresh, scale, s, min(n, s + PAR_BLOCK))
        return nbad

    @njit(cache=True, nogil=True)
    def _ser_merge(base, ft, out, k0, k1, lo0, thresh, scale):  # pragma: no cover - compiled
        return _merge_range(base, ft, out, k0, k1, lo0, thresh, scale, 0, out.size)

    @njit(parallel=True, cache=True, nogil=True)
    def _par_dare(delta, out, k0, k1, lo0, thresh, scale):  # pragma: no cover - compiled
        n, nbad = out.size, 0
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s = blk * PAR_BLOCK
            nbad += _dare_range(delta, out, k0, k1, lo0, thresh, scale, s, min(n, s + PAR_BLOCK))
        return nbad

    @njit(cache=True, nogil=True)
    def _ser_dare(delta, out, k0, k1, lo0, thresh, scale):  # pragma: no cover - compiled
        return _dare_range(delta, out, k0, k1, lo0, thresh, scale, 0, out.size)

    @njit(parallel=True, cache=True, nogil=True)
    def _par_keep(out, k0, k1, lo0, thresh):  # pragma: no cover - compiled
        n = out.size
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s = blk * PAR_BLOCK
            _keep_range(out, k0, k1, lo0, thresh, s, min(n, s + PAR_BLOCK))

    @njit(cache=True, nogil=True)
    def _ser_keep(out, k0, k1, lo0, thresh):  # pragma: no cover - compiled
        _keep_range(out, k0, k1, lo0, thresh, 0, out.size)

    @njit(cache=True, nogil=True)
    def _ser_uniform(out, k0, k1, lo0):  # pragma: no cover - compiled
        _uniform_range(out, k0, k1, lo0, 0, out.size)

    @njit(parallel=True, cache=True, nogil=True)
    def _par_uniform(out, k0, k1, lo0):  # pragma: no cover - compiled
        n = out.size
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s = blk * PAR_BLOCK
            _uniform_range(out, k0, k1, lo0, s, min(n, s + PAR_BLOCK))


    # The fused merge with statistics on raw checkpoint words: bf16 arrives and leaves as its uint16 bits (decoded
    # and rounded to nearest even here, as torch does), fp32 as itself. One pass per element gives the merged
    # value and what the prune summary needs, in the output dtype: nnz of the delta before and after, and the
    # fp64 sums of squares of the delta before and after (the "after" delta is the rounded output minus base).
    _U16_SHIFT = _U32(16)
    _HALF = _U32(0x7FFF)

    @intrinsic
    def _as_f32(typingctx, x):  # pragma: no cover - compiled; reinterpret uint32 bits as float32
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _as_u32(typingctx, x):  # pragma: no cover - compiled; reinterpret float32 as its uint32 bits
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_ir.IntType(32))

        return types.uint32(types.float32), codegen

    @njit(inline="always", cache=True)
    def _rne16(u):  # pragma: no cover - compiled; fp32 bits -> bf16 bits, rounded to nearest even (as torch)
        return (u + _HALF + ((u >> _U16_SHIFT) & _U32(1))) >> _U16_SHIFT

    @njit(inline="always", cache=True)
    def _bf16(u16):  # pragma: no cover - compiled; bf16 word -> fp32
        return _as_f32(_U32(u16) << _U16_SHIFT)

    # One kernel per storage dtype (base and fine-tune alike): a dtype test inside the loops keeps LLVM from
    # vectorising them. Per block, one loop merges and one sums the statistics; the statistics functions are not
    # inlined, so their 'reassoc' (which lets the fp64 sums vectorise) cannot touch the merged bits.
    # Statistics of one block (PAR_BLOCK elements): sums of squares in fp32 lanes within the block (fp64 across
    # blocks, finer than one fp32 dot product per 4 M chunk), nnz by comparing words (+0 and -0 are equal).
    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _stats_bf16(base, ft, out, start, stop):  # pragma: no cover - compiled
        base, ft, out = base[start:stop], ft[start:stop], out[start:stop]  # indices from 0 vectorise
        nnz_before = nnz_after = 0
        sq_before = sq_after = np.float32(0.0)
        for i in range(out.size):
            wb, wf, wo = _U32(base[i]), _U32(ft[i]), _U32(out[i])
            b = _as_f32(wb << _U16_SHIFT)
            d = _as_f32(wf << _U16_SHIFT) - b
            dm = _as_f32(wo << _U16_SHIFT) - b
            sq_before += d * d
            sq_after += dm * dm
            nnz_before += (wf != wb) & (((wf | wb) & _HALF) != _U32(0))
            nnz_after += (wo != wb) & (((wo | wb) & _HALF) != _U32(0))
        return nnz_before, nnz_after, np.float64(sq_before), np.float64(sq_after)

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _stats_f32(base, ft, out, start, stop):  # pragma: no cover - compiled
        base, ft, out = base[start:stop], ft[start:stop], out[start:stop]
        nnz_before = nnz_after = 0
        sq_before = sq_after = np.float32(0.0)
        for i in range(out.size):
            b = base[i]
            d = ft[i] - b
            dm = out[i] - b
            sq_before += d * d
            sq_after += dm * dm
            nnz_before += d != _ZERO
            nnz_after += dm != _ZERO
        return nnz_before, nnz_after, np.float64(sq_before), np.float64(sq_after)

    @njit(inline="always", cache=True)
    def _store(part, row, stats):  # pragma: no cover - compiled
        part[row, 1] = stats[0]
        part[row, 2] = stats[1]
        part[row, 3] = stats[2]
        part[row, 4] = stats[3]

    @njit(inline="always", cache=True)
    def _merge_bf16_range(base, ft, out, k0, k1, lo0, thresh, scale, start, stop):  # pragma: no cover
        base, ft, out = base[start:stop], ft[start:stop], out[start:stop]
        nbad = 0
        for i in range(out.size):
            b = _bf16(base[i])
            d = _bf16(ft[i]) - b
            nbad += (d - d) != _ZERO
            kept = np.uint16(_rne16(_as_u32(b + d * scale)))
            out[i] = kept if _word(k0, k1, lo0, start + i) >= thresh else base[i]  # dropped: the base word
        return nbad

    @njit(inline="always", cache=True)
    def _merge_f32_range(base, ft, out, k0, k1, lo0, thresh, scale, start, stop):  # pragma: no cover
        base, ft, out = base[start:stop], ft[start:stop], out[start:stop]
        nbad = 0
        for i in range(out.size):
            b = base[i]
            d = ft[i] - b
            nbad += (d - d) != _ZERO
            out[i] = b + d * scale if _word(k0, k1, lo0, start + i) >= thresh else b
        return nbad

    @njit(parallel=True, cache=True, nogil=True)
    def _par_merge_stats_bf16(base, ft, out, k0, k1, lo0, thresh, scale, part):  # pragma: no cover - compiled
        n = out.size
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s, e = blk * PAR_BLOCK, min(n, blk * PAR_BLOCK + PAR_BLOCK)
            part[blk, 0] = _merge_bf16_range(base, ft, out, k0, k1, lo0, thresh, scale, s, e)
            _store(part, blk, _stats_bf16(base, ft, out, s, e))

    @njit(parallel=True, cache=True, nogil=True)
    def _par_merge_stats_f32(base, ft, out, k0, k1, lo0, thresh, scale, part):  # pragma: no cover - compiled
        n = out.size
        for blk in prange((n + PAR_BLOCK - 1) // PAR_BLOCK):
            s, e = blk * PAR_BLOCK, min(n, blk * PAR_BLOCK + PAR_BLOCK)
            part[blk, 0] = _merge_f32_range(base, ft, out, k0, k1, lo0, thresh, scale, s, e)
            _store(part, blk, _stats_f32(base, ft, out, s, e))

    @njit(cache=True, nogil=True)
    def _ser_merge_stats_bf16(base, ft, out, k0, k1, lo0, thresh, scale, part):  # pragma: no cover - compiled
        part[0, 0] = _merge_bf16_range(base, ft, out, k0, k1, lo0, thresh, scale, 0, out.size)
        _store(part, 0, _stats_bf16(base, ft, out, 0, out.size))

    @njit(cache=True, nogil=True)
    def _ser_merge_stats_f32(base, ft, out, k0, k1, lo0, thresh, scale, part):  # pragma: no cover - compiled
        part[0, 0] = _merge_f32_range(base, ft, out, k0, k1, lo0, thresh, scale, 0, out.size)
        _store(part, 0, _stats_f32(base, ft, out, 0, out.size))


_POOL_PID: int | None = None  # process that started numba's thread pool


def _parallel(n: int) -> bool:
    """Whether to run the parallel kernel for ``n`` elements.

    Small ranges run serially. So does a process forked from one that already started numba's OpenMP
    pool: GNU OpenMP is not fork-safe and numba would abort the child (e.g. a ``ddp_fork`` rank), so
    such a child runs the serial kernels, which give the same bits.
    """
    global _POOL_PID
    if n < SERIAL_BELOW:
        return False
    pid = os.getpid()
    if _POOL_PID is None:
        _POOL_PID = pid
    if _POOL_PID != pid:
        return False
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return True


def _nb_segments(key: int, offset: int, numel: int):
    k0, k1 = split_key(key)
    for s0, s1, lo0, hi in segments(offset, numel):
        yield s0, s1, np.uint32(k0), np.uint32(round_key(k1, hi)), np.uint32(lo0)


def nb_keep_mask(out_u8: np.ndarray, key: int, offset: int, thresh: int) -> None:
    with _LOCK:
        for s0, s1, k0, k1, lo0 in _nb_segments(key, offset, out_u8.size):
            run = _par_keep if _parallel(s1 - s0) else _ser_keep
            run(out_u8[s0:s1], k0, k1, lo0, np.uint32(thresh))


def nb_uniform(out: np.ndarray, key: int, offset: int) -> None:
    with _LOCK:
        for s0, s1, k0, k1, lo0 in _nb_segments(key, offset, out.size):
            run = _par_uniform if _parallel(s1 - s0) else _ser_uniform
            run(out[s0:s1], k0, k1, lo0)


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
    t, sc, f32 = np.uint32(thresh), np.float32(scale), torch.float32
    direct = src.dtype == f32 and out.dtype == f32 and (base is None or base.dtype == f32)
    step = SEGMENT if direct else NUMBA_CHUNK
    buf = None if direct else torch.empty(min(out.numel(), NUMBA_CHUNK), dtype=f32)
    nbad = 0
    with _LOCK:
        for s0, s1, k0, k1, lo0 in _nb_segments(key, offset, out.numel()):
            for s in range(s0, s1, step):
                e = min(s1, s + step)
                lo = np.uint32(int(lo0) + (s - s0))
                o = out[s:e] if out.dtype == f32 else buf[: e - s]
                f = src[s:e].to(f32).numpy()
                par = _parallel(e - s)
                if base is None:
                    run = _par_dare if par else _ser_dare
                    nbad += int(run(f, o.numpy(), k0, k1, lo, t, sc))
                else:
                    run = _par_merge if par else _ser_merge
                    nbad += int(run(base[s:e].to(f32).numpy(), f, o.numpy(), k0, k1, lo, t, sc))
                if out.dtype != f32:
                    out[s:e] = o
    return nbad


def nb_merge_stats(base: np.ndarray, ft: np.ndarray, out: np.ndarray, key: int, offset: int, thresh: int,
                   scale: float) -> tuple[int, int, int, float, float]:
    """Fused DARE merge of raw words with the prune statistics, for flat CPU arrays of one chunk.

    ``base``, ``ft`` and ``out`` are all ``float32``, or all ``uint16`` holding bf16 bits; ``out`` receives the merged
    words (the same bits as :func:`nb_merge` into that dtype).

    Returns:
        ``(non-finite deltas, nnz before, nnz after, Σδ² before, Σδ² after)``, the statistics of
        :class:`~lifelong_delta.delta.stats.PruneStatsAccumulator` (nnz compared, Σ summed in fp64).
    """
    bf16 = out.dtype == np.uint16
    par_kernel, ser_kernel = ((_par_merge_stats_bf16, _ser_merge_stats_bf16) if bf16
                              else (_par_merge_stats_f32, _ser_merge_stats_f32))
    t, sc = np.uint32(thresh), np.float32(scale)
    totals = np.zeros(5, np.float64)
    with _LOCK:
        for s0, s1, k0, k1, lo0 in _nb_segments(key, offset, out.size):
            n = s1 - s0
            par = _parallel(n)
            part = np.zeros(((n + PAR_BLOCK - 1) // PAR_BLOCK if par else 1, 5), np.float64)
            (par_kernel if par else ser_kernel)(base[s0:s1], ft[s0:s1], out[s0:s1], k0, k1, lo0, t, sc, part)
            totals += part.sum(axis=0)
    return int(totals[0]), int(totals[1]), int(totals[2]), float(totals[3]), float(totals[4])
