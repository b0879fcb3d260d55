"""The merges of :mod:`lifelong_delta.delta.merge` on raw F32/BF16 checkpoint words, without torch.

:func:`merge_chunk` is :func:`~lifelong_delta.delta.merge.merge_tensor` on one chunk of raw words and
:func:`magnitude_cut_words` is :func:`~lifelong_delta.delta.merge.magnitude_cut` of a whole tensor's words: the
same output bits, the same cut and the same one-line errors (tests/delta/test_merge_words.py holds them equal).
:func:`merged_chunks` streams one tensor of ``lifelong-delta merge`` through them. The arithmetic is the compiled
kernel of :mod:`lifelong_delta.delta._kernels` (``_words.c``); :func:`applies` says when it serves a tensor. Importing
this module, and running it, loads neither torch nor numpy.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence

from lifelong_delta.delta import _kernels
from lifelong_delta.delta.choices import scale_of
from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.matching import non_finite_error
from lifelong_delta.delta.merge import MagnitudeCut, MergeSpec, non_finite_delta_error
from lifelong_delta.delta.streaming import _Ring
from lifelong_delta.delta.writer import ShardedWriter

__all__ = ["applies", "magnitude_cut_words", "merge_chunk", "merged_chunks"]


def applies(spec: MergeSpec, codes: Iterable[str]) -> bool:
    """Whether a tensor whose inputs and output have dtypes ``codes`` merges on raw words: the kernel is built and
    not switched off (:func:`~lifelong_delta.delta._kernels.use_words`), every dtype is F32 or BF16, and a random
    mask, if the method draws one, is DARE's."""
    row = spec.row
    return (
        _kernels.use_words()
        and (row.sparsify != "random" or row.mask_method == "dare")
        and all(c in _kernels.WORD_CODES for c in codes)
    )


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _numel(code: str, words: object) -> int:
    return memoryview(words).nbytes // itemsize(code)  # type: ignore[arg-type]


def _check_words(name: str, code: str, words: object, which: str) -> None:
    bad = _kernels.count_nonfinite_words(code, words)
    if bad:
        raise non_finite_error(name, which, bad)


def magnitude_cut_words(
    base_code: str, base: object, ft_code: str, ft: object, density: float, *, name: str = ""
) -> MagnitudeCut:
    """:func:`~lifelong_delta.delta.merge.magnitude_cut` of the delta ``ft − base`` of a whole tensor's raw words.

    Args:
        base_code, base: The base's dtype (``"F32"``, ``"BF16"``) and words.
        ft_code, ft: The fine-tune's dtype and words (as many).
        density: Kept fraction in ``(0, 1]``.
        name: Tensor name for error messages.

    Raises:
        ValueError: NaN/inf in the delta (magnitude_cut's message).
    """
    k = int(density * _numel(ft_code, ft))
    return _cut(name, k, _kernels.magnitude_cut_words(base_code, base, [(ft_code, ft, max(k, 0))])[0])


def _cut(name: str, k: int, found: tuple[int, int, int]) -> MagnitudeCut:
    bad, bits, limit = found
    if bad:
        raise non_finite_delta_error(name)
    if k <= 0:
        return MagnitudeCut(math.inf, 0)
    return MagnitudeCut(struct.unpack("<f", struct.pack("<I", bits))[0], limit)


def merge_chunk(
    out_code: str,
    out: object,
    base_code: str,
    base: object,
    finetuned: Sequence[tuple[str, object]],
    spec: MergeSpec,
    *,
    name: str,
    offset: int = 0,
    cuts: Sequence[MagnitudeCut] | None = None,
) -> None:
    """``merge_tensor(base, finetuned, spec, name=name, offset=offset, cuts=cuts)`` on raw words, written to ``out``.

    Args:
        out_code, out: The output dtype and a writable buffer of the chunk's length.
        base_code, base: The base's dtype and words.
        finetuned: ``(dtype, words)`` per model, in model order.
        spec: The merge (a random mask must be DARE's, see :func:`applies`).
        name: Tensor name (keys the DARE masks; named in errors).
        offset: Flat index of the chunk's first element in the whole tensor.
        cuts: TIES' per-model cuts of the whole tensor; computed here when None (whole tensors only).

    Raises:
        ValueError: NaN/inf in an input or (DARE merges, TIES' cut) a delta, with merge_tensor's message.
    """
    if len(finetuned) != spec.n_models:
        raise ValueError(f"tensor {name!r}: {len(finetuned)} fine-tuned tensors for {spec.n_models} weights")
    row = spec.row
    if row.sparsify == "magnitude" and cuts is None:
        if offset:
            raise ValueError(f"tensor {name!r}: a chunk at offset {offset} needs the whole tensor's cut")
        cuts = _cuts(name, base_code, base, finetuned, spec)
    models = []
    for i, (code, words) in enumerate(finetuned):
        cut = mask = None
        if row.sparsify == "magnitude":
            assert cuts is not None
            cut = (_bits(cuts[i].value), cuts[i].limit)
        elif row.sparsify == "random":
            assert spec.density is not None
            mask = (
                _kernels.tensor_key(spec.mask_seed(i), name),
                _kernels.drop_threshold(1.0 - spec.density[i]),
                scale_of(spec.rescale_q(i)),
            )
        models.append(_kernels.ModelWords(code, words, spec.weights[i], cut, mask))
    bad_base, bad_models, bad_deltas = _kernels.merge_models_words(
        out_code,
        out,
        base_code,
        base,
        models,
        consensus=row.consensus,
        normalize=spec.normalized,
        lambda_=spec.lambda_,
        offset=offset,
    )
    if bad_base:
        raise non_finite_error(name, "base", bad_base)
    for i, bad in enumerate(bad_models):
        if bad:
            raise non_finite_error(name, f"fine-tuned #{i + 1}", bad)
    if row.sparsify == "random":
        for bad in bad_deltas:
            if bad:  # dare.dare's message: the DARE merges mask each delta through it
                raise ValueError(f"tensor {name!r} has {bad} non-finite delta entries (NaN/inf in base or fine-tuned)")


def _cuts(
    name: str, base_code: str, base: object, finetuned: Sequence[tuple[str, object]], spec: MergeSpec, *, first: int = 0
) -> list[MagnitudeCut]:
    """TIES' cut of each model's whole delta, with the errors of the torch command in its order (base, then each
    model's words, then its delta). Finite deltas have finite inputs, so the inputs are counted only after a cut
    met a NaN/inf delta. ``finetuned`` holds the models from position ``first`` on."""
    assert spec.density is not None
    density = spec.density[first : first + len(finetuned)]
    ks = [max(int(d * _numel(code, words)), 0) for d, (code, words) in zip(density, finetuned, strict=True)]
    found = _kernels.magnitude_cut_words(base_code, base, [(c, w, k) for (c, w), k in zip(finetuned, ks)])
    cuts = []
    for i, ((code, words), k, got) in enumerate(zip(finetuned, ks, found)):
        if got[0]:
            _check_words(name, base_code, base, "base")
            _check_words(name, code, words, f"fine-tuned #{first + i + 1}")
        cuts.append(_cut(name, k, got))
    return cuts


def merged_chunks(
    name: str,
    base_name: str,
    out_code: str,
    rb: CheckpointReader,
    readers: Sequence[CheckpointReader],
    spec: MergeSpec,
    chunk_elements: int,
    outs: _Ring | None = None,
) -> Iterator[memoryview]:
    """One merged tensor of ``lifelong-delta merge`` as consecutive chunks of output words.

    TIES first reads the base and each model's whole tensor (mapped, not copied), two models at a time, for its cut;
    every method then merges ``chunk_elements`` of every model at a time.

    Args:
        name: The tensor's name in the fine-tunes (and the output).
        base_name: Its name in the base.
        out_code: The output dtype.
        rb, readers: The base's and the fine-tunes' readers.
        spec: The merge.
        chunk_elements: Elements per chunk.
        outs: Output buffers to reuse, at least ``ShardedWriter.PENDING + 1`` (fresh pages cost a page fault each);
            default: a ring for this tensor.
    """
    numel = rb.info(base_name).numel
    base_code, codes = rb.code(base_name), [r.code(name) for r in readers]
    cuts = None
    if spec.row.sparsify == "magnitude" and numel:
        base = rb.view(base_name, 0, numel)
        cuts = []
        for i in range(0, len(readers), 2):  # two whole tensors mapped at a time, cut in parallel
            pair = [(c, r.view(name, 0, numel)) for c, r in zip(codes[i : i + 2], readers[i : i + 2], strict=True)]
            cuts += _cuts(name, base_code, base, pair, spec, first=i)
        del base
    size = itemsize(out_code)
    outs = outs or _Ring(ShardedWriter.PENDING + 1)
    for start in range(0, numel, chunk_elements):
        count = min(chunk_elements, numel - start)
        out = outs.take(count * size)
        merge_chunk(
            out_code,
            out,
            base_code,
            rb.view(base_name, start, count),
            [(c, r.view(name, start, count)) for c, r in zip(codes, readers, strict=True)],
            spec,
            name=name,
            offset=start,
            cuts=cuts,
        )
        yield out
