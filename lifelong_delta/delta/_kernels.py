"""The DARE mask stream: its definition, the back-end choice, and the compiled merge of raw words; no torch.

A mask is a pure function of ``(seed, tensor name, flat element index)``. The tensor key ``tensor_key(seed, name)``
is a 64-bit BLAKE2b hash, split into two 32-bit round keys ``k0, k1``. Element ``i`` gets the 32-bit word
``w_i = lb32(lb32(lo ^ k0) ^ k1')`` with ``lo = i mod 2**32``, ``k1' = k1 + (i >> 32) * 0x9E3779B9`` and ``lb32`` the
"lowbias32" integer hash; 32-bit lanes vectorise well (AVX2 ``vpmulld``). An element is dropped iff
``w_i < floor(p * 2**32)``; its uniform is ``(w_i >> 8) * 2**-24``. fp32 arithmetic is done in the same order
(``d = ft - base``; ``out = base + d * scale`` if kept else ``base``), without fused multiply-adds.

Three implementations compute the same bits: the numba kernels of ``_nb_kernels`` (masks and merges of torch
tensors' data, imported when first used), the torch ops of ``_torch_kernels`` (any device), and the compiled C
kernel ``_words.c`` behind :func:`merge_words`, which merges raw bf16/fp32 checkpoint words with the prune
statistics. The same extension merges N models (:func:`merge_models_words`, :func:`magnitude_cut_words`: the
formulas of :mod:`lifelong_delta.delta.merge`). This module imports nothing heavy, so the streaming prune and merge
of bf16/fp32 checkpoints start in a tenth of a second and load neither torch nor numpy.
:mod:`lifelong_delta.delta.masks` is the public interface of the mask.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

try:  # the compiled kernel on raw words (setup.py builds it where a C compiler is found)
    from lifelong_delta.delta import _words
except ImportError:  # pragma: no cover - exercised only without the extension
    _words = None
HAVE_WORDS = _words is not None
HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # its kernels are in _nb_kernels, imported when used

MASK_BITS = 32
"""Number of hash bits compared against the drop threshold."""
GOLDEN32 = 0x9E3779B9
MIX1 = 0x7FEB352D  # "lowbias32" constants (C. Wellons, hash-prospector)
MIX2 = 0x846CA68B
SEGMENT = 1 << 32  # the hash counter is 32-bit; longer ranges are split into segments with their own key

Backend = Literal["auto", "numba", "torch", "compile"]
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
    payload = f"{int(seed)}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def drop_threshold(p: float) -> int:
    """Integer threshold ``floor(p * 2**32)``: an element is dropped iff its 32-bit hash word is below it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p={p} is outside [0, 1): p is the drop rate")
    return int(float(p) * float(1 << MASK_BITS))


def set_backend(backend: Backend) -> None:
    """Choose the mask back end: ``"auto"`` (the compiled C kernel or numba on CPU where available, else torch),
    ``"numba"``, ``"torch"`` (eager tensor ops) or ``"compile"`` (the torch ops through ``torch.compile``)."""
    global _backend
    if backend not in ("auto", "numba", "torch", "compile"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'numba', 'torch', 'compile'")
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("backend='numba' needs numba installed (pip install numba); use 'auto' or 'torch'")
    _backend = backend


def get_backend() -> Backend:
    """The back end chosen by :func:`set_backend` (``"auto"`` by default)."""
    return _backend


def _torch_chosen() -> bool:
    """Whether :func:`set_backend` (``"torch"``, ``"compile"``) or, under ``"auto"``, ``LIFELONG_DELTA_BACKEND=torch``
    chose the torch ops over the CPU kernels."""
    if _backend in ("torch", "compile"):
        return True
    return _backend == "auto" and os.environ.get("LIFELONG_DELTA_BACKEND", "auto") == "torch"


def use_numba(device_type: str = "cpu") -> bool:
    """Whether the numba kernels serve tensors on ``device_type``: CPU only, numba installed, torch not chosen."""
    return device_type == "cpu" and HAVE_NUMBA and not _torch_chosen()


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


# -------------------------------------------------------------------------------------- compiled raw words
WORD_CODES = {"BF16": 1, "F32": 0}  # the dtypes merge_words reads and writes as raw words -> the kernel's kind


def use_words() -> bool:
    """Whether raw bf16/fp32 words go through the compiled kernel :func:`merge_words`: it was built, and torch was
    not chosen."""
    return _words is not None and not _torch_chosen()


def store_at(addresses: object, values: object, width: int, gather: bool = False) -> None:
    """Store ``values[i]`` (``width``-byte words) at the byte address ``addresses[i]`` (int64), or with ``gather``
    load them from there, in one call of the compiled kernel (:func:`use_words` must hold). The addresses must
    point into live, writable memory: :class:`~lifelong_delta.delta.bank.DeltaBank` builds them from its tensors."""
    assert _words is not None
    _words.store_at(addresses, values, width, gather)


_SPLIT_FROM = 1 << 18  # ranges this long are split between two threads
_pool: tuple[int, object] | None = None  # (pid, ThreadPoolExecutor): a forked child makes its own


def _workers():
    """A kernel thread beside the caller's (the compiled kernel releases the GIL), created on first use in each
    process."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lifelong-delta-kernel"))
    return _pool[1]


def _halves(n: int) -> list[tuple[int, int]]:
    """``[0, n)`` as one range, or two split at a multiple of the kernel's block when there are CPUs for both."""
    if n < _SPLIT_FROM or len(os.sched_getaffinity(0)) < 2:
        return [(0, n)]
    h = n // 2 // _words.BLOCK * _words.BLOCK
    return [(0, h), (h, n)]


def merge_words(
    code: str, base: object, ft: object, out: object, key: int, offset: int, thresh: int, scale: float
) -> tuple[int, int, int, float, float]:
    """Fused DARE merge of raw words with the prune statistics, for the flat data of one chunk.

    The compiled twin (``_words.c``) of the numba and torch merges: the same mask words and the same fp32 arithmetic,
    so the same output bits. A long range is split between two threads (the kernel releases the GIL); the sums
    are then added in a fixed order, so results do not depend on timing.

    Args:
        code: ``"F32"`` or ``"BF16"``, the dtype of all three.
        base, ft, out: C-contiguous buffers of equal length (numpy arrays, ``memoryview``, ``mmap``, ...); ``out``
            is writable and receives the merged words (bf16 rounded to nearest even, as torch casts).
        key, offset, thresh, scale: The tensor key, flat index of element 0, drop threshold and rescale.

    Returns:
        ``(non-finite deltas, nnz before, nnz after, Σδ² before, Σδ² after)``, the statistics of
        :class:`~lifelong_delta.delta.summary.PruneStatsAccumulator`. When the first count is not 0 the others and
        ``out`` are meaningless.

    Raises:
        RuntimeError: the extension was not built (see :func:`use_words`).
    """
    if _words is None:
        raise RuntimeError("the compiled kernel lifelong_delta.delta._words is missing; reinstall with a C compiler")
    kind = WORD_CODES[code]
    size = 2 if kind else 4
    b, f, o = (memoryview(x).cast("B") for x in (base, ft, out))  # type: ignore[arg-type]
    k0, k1 = split_key(key)
    ranges = [
        (s0 + a, min(s1, s0 + z), k0, round_key(k1, hi), (lo0 + a) & 0xFFFFFFFF)
        for s0, s1, lo0, hi in segments(offset, len(o) // size)
        for a, z in _halves(s1 - s0)
    ]

    def run(r: tuple[int, int, int, int, int]) -> tuple[int, int, float, float]:
        s, e, k0, k1, lo = r
        s, e = s * size, e * size
        return _words.merge(kind, b[s:e], f[s:e], o[s:e], k0, k1, lo, thresh, scale)

    later = [_workers().submit(run, r) for r in ranges[1:]]  # this thread runs the first range itself
    parts = [run(ranges[0]), *(f.result() for f in later)] if ranges else []
    totals = [sum(p[i] for p in parts) for i in range(4)]
    nbad = 0
    if not math.isfinite(totals[2]):  # a NaN/inf delta, or squares beyond fp32's range: count exactly
        nbad = _words.count_nonfinite(kind, b, f)
    return nbad, int(totals[0]), int(totals[1]), float(totals[2]), float(totals[3])


def select_words(size: int, src: object, dst: object, values: object | None, key: int, offset: int, thresh: int) -> int:
    """The DARE mask over raw words of ``size`` bytes, without computing anything else (compiled).

    Gather (``values`` None): the kept words of ``src`` go, in order, to the front of ``dst``. Scatter: ``dst``
    becomes ``src`` with the kept words replaced, in order, by those of ``values``.

    Args:
        size: Bytes per word (1, 2, 4 or 8).
        src: The range's words (any C-contiguous buffer).
        dst: A writable buffer of at least ``src``'s bytes.
        values: For a scatter, the kept words.
        key, offset, thresh: The tensor key, flat index of element 0 and drop threshold.

    Returns:
        How many words the mask keeps in the range.

    Raises:
        RuntimeError: the extension was not built (see :func:`use_words`).
    """
    if _words is None:
        raise RuntimeError("the compiled kernel lifelong_delta.delta._words is missing; reinstall with a C compiler")
    s, d = memoryview(src).cast("B"), memoryview(dst).cast("B")  # type: ignore[arg-type]
    v = None if values is None else memoryview(values).cast("B")  # type: ignore[arg-type]
    k0, k1 = split_key(key)
    kept = 0
    for a, z, lo0, hi in segments(offset, len(s) // size):
        src_part = s[a * size : z * size]
        if v is None:
            got = _words.select(size, src_part, d[kept * size :], None, k0, round_key(k1, hi), lo0, thresh)
        else:
            got = _words.select(
                size, src_part, d[a * size : z * size], v[kept * size :], k0, round_key(k1, hi), lo0, thresh
            )
        kept += got
    return kept


@dataclass(frozen=True)
class ModelWords:
    """One fine-tune's input to :func:`merge_models_words`: its raw words, weight and sparsification.

    Attributes:
        code: ``"F32"`` or ``"BF16"``.
        words: C-contiguous buffer of the chunk's words.
        weight: ``w_i`` (used as fp32).
        cut: TIES' trim as ``(bits of the cut magnitude, limit)``, the limit a flat index of the whole tensor (see
            :class:`lifelong_delta.delta.merge.MagnitudeCut`); None: no trim.
        mask: DARE's mask as ``(tensor key, drop threshold, rescale)``; None: no mask. At most one of the two.
    """

    code: str
    words: object
    weight: float
    cut: tuple[int, int] | None = None
    mask: tuple[int, int, float] | None = None


def merge_models_words(
    out_code: str,
    out: object,
    base_code: str,
    base: object,
    models: Sequence[ModelWords],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    offset: int,
) -> tuple[int, list[int], list[int]]:
    """``θ_pre + λ · τ`` of :mod:`lifelong_delta.delta.merge` on one chunk of raw words (compiled, GIL released).

    Element ``j`` is computed in fp32 with the operations of ``merge.merge_tensor`` in its order, so the output
    words are its bits (the kernel's source states the order). A long chunk is split between two threads.

    Args:
        out_code, out: The output dtype (``"F32"``, ``"BF16"``) and a writable buffer of the chunk's length.
        base_code, base: The base's dtype and words.
        models: One :class:`ModelWords` per fine-tune, in model order.
        consensus: TIES' sign election and disjoint merge instead of the weighted sum.
        normalize: Divide by the sum of the (agreeing) weights.
        lambda_: ``λ``; the merged delta is multiplied by it (as fp32) unless it is 1.
        offset: Flat index of the chunk's first element in the whole tensor (keys the masks, places the cuts).

    Returns:
        ``(NaN/inf words of the base, of each fine-tune, NaN/inf deltas of each fine-tune)``; when any is not 0,
        ``out`` is meaningless.
    """
    if _words is None:
        raise RuntimeError("the compiled kernel lifelong_delta.delta._words is missing; reinstall with a C compiler")
    o = memoryview(out).cast("B")  # type: ignore[arg-type]
    b = memoryview(base).cast("B")  # type: ignore[arg-type]
    ms = [(WORD_CODES[m.code], memoryview(m.words).cast("B"), m) for m in models]  # type: ignore[arg-type]
    osize, bsize = (2 if WORD_CODES[out_code] else 4), (2 if WORD_CODES[base_code] else 4)
    ranges = [
        (s0 + a, min(s1, s0 + z), lo0 + a, hi)
        for s0, s1, lo0, hi in segments(offset, len(o) // osize)
        for a, z in _halves(s1 - s0)
    ]

    def run(r: tuple[int, int, int, int]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        s, e, lo, hi = r
        args = []
        for kind, words, m in ms:
            size = 2 if kind else 4
            cut, limit, k0, k1, thresh, scale, how = 0, 0, 0, 0, 0, 1.0, 0
            if m.cut is not None:
                how, (cut, limit) = 1, m.cut
                limit = min(max(limit - (offset + s), 0), e - s)
            elif m.mask is not None:
                how, (key, thresh, scale) = 2, m.mask
                k0, k1 = split_key(key)
                k1 = round_key(k1, hi)
            args.append(
                (kind, words[s * size : e * size], m.weight, how, cut, limit, k0, k1, lo & 0xFFFFFFFF, thresh, scale)
            )
        return _words.merge_models(
            WORD_CODES[out_code],
            o[s * osize : e * osize],
            WORD_CODES[base_code],
            b[s * bsize : e * bsize],
            tuple(args),
            consensus,
            normalize,
            lambda_,
            lambda_ != 1.0,
        )

    later = [_workers().submit(run, r) for r in ranges[1:]]  # this thread runs the first range itself
    parts = [run(ranges[0]), *(f.result() for f in later)] if ranges else []
    n = len(models)
    return (
        sum(p[0] for p in parts),
        [sum(p[1][i] for p in parts) for i in range(n)],
        [sum(p[2][i] for p in parts) for i in range(n)],
    )


def magnitude_cut_words(
    base_code: str, base: object, models: Sequence[tuple[str, object, int]]
) -> list[tuple[int, int, int]]:
    """TIES' cuts keeping the ``k`` largest ``|ft − base|`` (fp32) of each fine-tune's whole tensor of raw words
    (compiled; with two CPUs, two models at a time).

    Args:
        base_code, base: The base's dtype and words.
        models: ``(dtype, words, k)`` per fine-tune.

    Returns:
        Per model ``(NaN/inf deltas, bits of the k-th largest magnitude, limit)``: keep an entry iff its magnitude is
        above the cut, or equal to it at a flat index below ``limit``. ``k = 0`` gives ``(·, bits of inf, 0)``; with
        NaN/inf deltas the other two are meaningless.
    """
    if _words is None:
        raise RuntimeError("the compiled kernel lifelong_delta.delta._words is missing; reinstall with a C compiler")

    def run(m: tuple[str, object, int]) -> tuple[int, int, int]:
        return _words.magnitude_cut(WORD_CODES[base_code], base, WORD_CODES[m[0]], m[1], m[2])

    if len(models) < 2 or len(os.sched_getaffinity(0)) < 2:
        return [run(m) for m in models]
    later = [_workers().submit(run, m) for m in models[1::2]]  # the kernel releases the GIL
    mine = [run(m) for m in models[0::2]]
    theirs = [f.result() for f in later]
    return [mine[i // 2] if i % 2 == 0 else theirs[i // 2] for i in range(len(models))]


def count_nonfinite_words(code: str, words: object) -> int:
    """NaN/inf values among raw F32 or BF16 words (compiled)."""
    return _words.count_nonfinite_words(WORD_CODES[code], words)


def convert_words(src_code: str, src: object, dst_code: str, dst: object) -> None:
    """Cast raw F32/BF16 words into ``dst`` as torch casts them (bf16 rounded to nearest even; compiled)."""
    _words.convert(WORD_CODES[src_code], src, WORD_CODES[dst_code], dst)
