"""The numba back end of the DARE mask stream (:mod:`._kernels` defines it): masks, uniforms and merges of flat
arrays, serial for small ranges and parallel (``prange``) for large ones. Imported when first used."""

from __future__ import annotations

import os
import sys
import threading

import numba
import numpy as np
from numba import njit, prange

from lifelong_delta.delta._kernels import MIX1, MIX2, round_key, segments, split_key

NUMBA_CHUNK = 1 << 20  # elements per block when dtypes must be converted around the numba kernel
PAR_BLOCK = 1 << 14  # elements per parallel work item
SERIAL_BELOW = 1 << 16  # smaller ranges run single-threaded (thread wake-ups cost more than they save)


class _PoolGuard:
    """``with _LOCK:`` around numba's parallel kernels: one Python thread at a time in numba's thread pool, and
    torch's thread count as it was. Starting numba's OpenMP pool resets the OpenMP thread count that torch shares
    (1 becomes the CPU count), which would make every later torch op of a one-thread process run threaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._torch_threads: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        torch = sys.modules.get("torch")
        self._torch_threads = torch.get_num_threads() if torch is not None else None

    def __exit__(self, *exc: object) -> None:
        try:
            torch = sys.modules.get("torch")
            if torch is not None and self._torch_threads is not None and torch.get_num_threads() != self._torch_threads:
                torch.set_num_threads(self._torch_threads)
        finally:
            self._lock.release()


_LOCK = _PoolGuard()

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
    if pid != _POOL_PID:
        return False
    torch = sys.modules.get("torch")  # follow torch.set_num_threads where torch is in use; else the CPUs we may use
    wanted = torch.get_num_threads() if torch is not None else len(os.sched_getaffinity(0))
    numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
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
