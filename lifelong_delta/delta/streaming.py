"""Whole checkpoints, one tensor at a time: prune the delta into a sharded copy, or measure its statistics.

Layer 2 (no Lightning). Tensors are read a chunk at a time (a mapped range, or a plain read into a reused buffer)
and written as they are produced (see :mod:`lifelong_delta.delta.io` and :mod:`lifelong_delta.delta.writer`). The
method's registry row (:class:`~lifelong_delta.delta.methods.Method`) picks the layout: element-wise methods (DARE,
DAREx-q), whose masks are a function of the flat element index, run chunk by chunk, and row-local ones (magnitude,
WANDA: a top-k within each output row) a block of rows at a time, so memory stays at a few 8 MB chunks whatever the
tensor size; any other method (structural), and 0/1-D or input-major tensors, hold one tensor's base, fine-tuned
and output values at a time.

Importing this module loads no torch, and a DARE/DAREx-q prune of bf16 or fp32 checkpoints never does: each chunk's
raw words go from the reader through the compiled fused kernel (:func:`lifelong_delta.delta._kernels.merge_words`)
to the writer, and copied tensors are copied as bytes. Any other tensor (fp16, mixed dtypes, another method, the
torch back end, a build without the C extension) takes the torch path, which gives the same bits where both apply
(tested).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from lifelong_delta import outputs
from lifelong_delta.delta import _kernels
from lifelong_delta.delta.choices import resolve_q, scale_of
from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader, parse_size
from lifelong_delta.delta.matching import TensorMatch, match_tensors, non_finite_error
from lifelong_delta.delta.methods import METHODS, PruneSpec
from lifelong_delta.delta.summary import PruneStatsAccumulator, PruneSummary, TensorPruneStats
from lifelong_delta.delta.writer import ShardedWriter
from lifelong_delta.progress import Progress

if TYPE_CHECKING:
    import torch

    from lifelong_delta.delta.stats import DeltaStats

__all__ = ["match_for_prune", "prune_into", "prune_summary", "stream_delta_stats", "stream_prune"]

_T = TypeVar("_T")

_CHUNK_BYTES = 8 << 20  # bytes of the fine-tuned tensor per chunk (bench/prune_command.py: 8 MB ran fastest and
# steadiest on 2 cores, for bf16 and fp32 alike; 16 MB chunks often ran 2x slower after the machine had idled)


def _chunk(itemsize: int) -> int:
    """Elements per chunk of a tensor whose fine-tuned elements take ``itemsize`` bytes."""
    return max(1, _CHUNK_BYTES // itemsize)


class _Ring:
    """``n`` reusable byte buffers handed out in turn: slot ``k % n`` is reused once ``n`` newer ones were taken, so
    ``n`` must exceed the number of chunks still in use when a new one is taken."""

    def __init__(self, n: int) -> None:
        self._bufs: list[memoryview | None] = [None] * n
        self._next = 0

    def take(self, nbytes: int) -> memoryview:
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        buf = self._bufs[i]
        if buf is None or len(buf) < nbytes:
            buf = self._bufs[i] = memoryview(bytearray(nbytes))
        return buf[:nbytes]


@dataclass
class _Buffers:
    """Chunk buffers reused across a whole prune: reads (the chunk in the kernel, the one queued by the read-ahead
    thread, the one it is reading) and outputs (the writer's pending chunks and the one being computed)."""

    base: _Ring = field(default_factory=lambda: _Ring(3))
    finetuned: _Ring = field(default_factory=lambda: _Ring(3))
    out: _Ring = field(default_factory=lambda: _Ring(ShardedWriter.PENDING + 1))


class TensorSink(Protocol):
    """Where :func:`prune_into` puts each output tensor: a :class:`ShardedWriter`, or a writer that keeps only part
    of it (:class:`lifelong_delta.delta.pack.PackWriter`)."""

    def add(self, name: str, tensor: torch.Tensor) -> None: ...

    def add_chunks(
        self, name: str, dtype: str | torch.dtype, shape: Sequence[int] | None, chunks: Iterable[object]
    ) -> None: ...


def _words_apply(spec: PruneSpec, rb: CheckpointReader, rf: CheckpointReader, name: str, base_name: str) -> bool:
    """Whether tensor ``name`` takes the compiled kernel on raw words: a random-mask method, base and fine-tune of
    one dtype the kernel reads (bf16, fp32), and the kernel built and not switched off."""
    code = rf.code(name)
    return spec.row.random_mask and code in _kernels.WORD_CODES and rb.code(base_name) == code and _kernels.use_words()


def _count_non_finite(code: str, data: memoryview) -> int:
    """NaN/inf values among raw bf16 or fp32 words (for the error message only)."""
    import numpy as np

    words = np.frombuffer(data, np.uint16 if code == "BF16" else np.float32)
    values = (words.astype(np.uint32) << 16).view(np.float32) if code == "BF16" else words
    return int(np.count_nonzero(~np.isfinite(values)))


def _chunk_reads(
    name: str, rb: CheckpointReader, rf: CheckpointReader, base_name: str, bufs: _Buffers | None
) -> Iterator[tuple[int, int, memoryview, memoryview]]:
    """``(start, count, base bytes, fine-tuned bytes)`` of consecutive chunks of one tensor: read into reused
    buffers, or with ``bufs=None`` read-only views of the files (no copy; see :meth:`CheckpointReader.view`)."""
    numel = math.prod(rf.shape(name))
    b_size, f_size = rb.info(base_name).itemsize, rf.info(name).itemsize
    step = _chunk(f_size)
    for start in range(0, numel, step):
        count = min(step, numel - start)
        if bufs is None:
            yield start, count, rb.view(base_name, start, count), rf.view(name, start, count)
            continue
        b, f = bufs.base.take(count * b_size), bufs.finetuned.take(count * f_size)
        rb.read_into(base_name, start, count, b)
        rf.read_into(name, start, count, f)
        yield start, count, b, f


def _prune_words(
    name: str,
    rb: CheckpointReader,
    rf: CheckpointReader,
    writer: TensorSink,
    spec: PruneSpec,
    q: float | None,
    base_name: str,
    bufs: _Buffers,
) -> TensorPruneStats:
    """DARE / DAREx-q of one bf16 or fp32 tensor, chunk by chunk on raw words, statistics included; no torch.

    The merged words equal ``prune_tensor(name, base, finetuned, spec, q=q)`` cast to the stored dtype (tested).
    """
    q_eff = resolve_q(spec.p, spec.q if q is None else q, force=spec.force, name=name)
    key, thresh, scale = _kernels.tensor_key(spec.seed, name), _kernels.drop_threshold(spec.p), scale_of(q_eff)
    code = rf.code(name)
    size = itemsize(code)
    acc = PruneStatsAccumulator(name)

    def chunks() -> Iterator[memoryview]:
        for start, count, b, f in _read_ahead(_chunk_reads(name, rb, rf, base_name, None)):
            out = bufs.out.take(count * size)
            nbad, *counts = _kernels.merge_words(code, b, f, out, key, start, thresh, scale)
            if nbad:
                for which, data in (("base", b), ("fine-tuned", f)):  # say which model holds the NaN/inf
                    bad = _count_non_finite(code, data)
                    if bad:
                        raise non_finite_error(name, which, bad)
            acc.add_counts(count, *counts)
            yield out

    writer.add_chunks(name, code, rf.shape(name), chunks())
    return acc.result()


def _copy(name: str, rf: CheckpointReader, writer: TensorSink, bufs: _Buffers) -> None:
    """Copy one tensor's bytes unchanged, chunk by chunk."""
    info = rf.info(name)

    def chunks() -> Iterator[memoryview]:
        step = _chunk(info.itemsize)
        for start in range(0, info.numel, step):
            count = min(step, info.numel - start)
            yield rf.read_into(name, start, count, bufs.out.take(count * info.itemsize))

    writer.add_chunks(name, info.code, info.shape, chunks())


def _prune_whole(
    name: str,
    rb: CheckpointReader,
    rf: CheckpointReader,
    writer: TensorSink,
    spec: PruneSpec,
    q: float | None,
    norms: torch.Tensor | None,
    base_name: str,
) -> TensorPruneStats:
    """Methods that need the whole tensor (top-k per row, structural): base, fine-tuned and output in memory."""
    from lifelong_delta.delta.methods import prune_tensor
    from lifelong_delta.delta.stats import check_finite, tensor_prune_stats

    b, f = rb.get(base_name), rf.get(name)
    check_finite(name, b, "base")
    check_finite(name, f, "fine-tuned")
    merged = prune_tensor(name, b, f, spec, input_norms=norms, q=q)
    writer.add(name, merged)
    return tensor_prune_stats(name, b, f, merged)


def _prune_rows(
    name: str,
    rb: CheckpointReader,
    rf: CheckpointReader,
    writer: TensorSink,
    spec: PruneSpec,
    q: float | None,
    norms: torch.Tensor | None,
    base_name: str,
) -> TensorPruneStats:
    """A row-local method (top-k within each output row) a block of rows at a time, about one chunk each: the
    blocks concatenate to exactly ``prune_tensor(name, base, finetuned, spec, ...)`` of the whole tensor (tested),
    and memory holds one block's base, fine-tuned and output values, not the tensor's."""
    from lifelong_delta.delta.methods import prune_tensor
    from lifelong_delta.delta.stats import check_finite

    shape = rf.shape(name)
    cols = math.prod(shape[1:])
    step = max(1, _chunk(rf.info(name).itemsize) // max(cols, 1))
    acc = PruneStatsAccumulator(name)

    def chunks() -> Iterator[torch.Tensor]:
        for row in range(0, shape[0], step):
            rows = min(step, shape[0] - row)
            b = rb.get_flat(base_name, row * cols, rows * cols).view(rows, *shape[1:])
            f = rf.get_flat(name, row * cols, rows * cols).view(rows, *shape[1:])
            check_finite(name, b, "base")
            check_finite(name, f, "fine-tuned")
            merged = prune_tensor(name, b, f, spec, input_norms=norms, q=q)
            acc.add(b, f, merged)
            yield merged

    writer.add_chunks(name, rf.dtype(name), shape, chunks())
    return acc.result()


def _prune_chunked(
    name: str,
    rb: CheckpointReader,
    rf: CheckpointReader,
    writer: TensorSink,
    spec: PruneSpec,
    q: float | None,
    base_name: str,
    bufs: _Buffers,
) -> TensorPruneStats:
    """An element-wise method chunk by chunk with torch: DARE / DAREx-q where :func:`_prune_words` does not take
    them (fp16, mixed dtypes, the torch back end), any other element-wise method always. Masks are a function of
    the flat element index (``offset``), so the chunks concatenate to exactly
    ``prune_tensor(name, base, finetuned, spec, q=q)`` (tested against it)."""
    import torch

    from lifelong_delta.delta.dare import dare_merge
    from lifelong_delta.delta.methods import prune_tensor
    from lifelong_delta.delta.stats import check_finite

    q_eff = spec.q if q is None else q
    acc = PruneStatsAccumulator(name)
    b_dtype, f_dtype = rb.dtype(base_name), rf.dtype(name)

    def chunks() -> Iterator[torch.Tensor]:
        for start, count, b_bytes, f_bytes in _read_ahead(_chunk_reads(name, rb, rf, base_name, bufs)):
            b = torch.frombuffer(b_bytes, dtype=torch.uint8).view(b_dtype)
            f = torch.frombuffer(f_bytes, dtype=torch.uint8).view(f_dtype)
            try:
                if spec.row.random_mask:
                    out = torch.frombuffer(bufs.out.take(count * f_dtype.itemsize), dtype=torch.uint8).view(f_dtype)
                    merged = dare_merge(
                        b, f, spec.p, seed=spec.seed, name=name, q=q_eff, offset=start, force=spec.force, out=out
                    )
                else:
                    merged = prune_tensor(name, b, f, spec, q=q, offset=start)
            except ValueError:
                check_finite(name, b, "base")  # say which model holds the NaN/inf
                check_finite(name, f, "fine-tuned")
                raise
            acc.add(b, f, merged)
            yield merged

    writer.add_chunks(name, f_dtype, rf.shape(name), chunks())
    return acc.result()


def _read_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """``items``, produced one step ahead by a helper thread: the next chunk is read while this one is computed
    and written (reads, the kernel and writes all release the GIL). An exception in the thread is raised here;
    closing the generator stops the thread."""
    done = object()
    box: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as e:  # handed to the consumer
            box.put((done, e))

    thread = threading.Thread(target=produce, name="lifelong-delta-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _mapping_note(match: TensorMatch) -> str | None:
    if match.prefix is None:
        return None
    pb, pf = match.prefix
    return f"base '{pb}X' = fine-tuned '{pf}X'"


def prune_summary(
    spec: PruneSpec, match: TensorMatch, out: str | os.PathLike[str], q_per_tensor: Mapping[str, float] | None = None
) -> PruneSummary:
    """An empty :class:`PruneSummary` of a prune (its per-tensor statistics are added as tensors are pruned)."""
    q_shown = "per tensor" if q_per_tensor else spec.q
    return PruneSummary(
        spec.method,
        spec.p,
        q_shown,
        copied=list(match.copied),
        out=str(out),
        finetuned_only=list(match.finetuned_only),
        name_mapping=_mapping_note(match),
        q_per_tensor=dict(q_per_tensor) if q_per_tensor else None,
    )


def match_for_prune(
    rb: CheckpointReader,
    rf: CheckpointReader,
    spec: PruneSpec,
    *,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    q_per_tensor: Mapping[str, float] | None = None,
) -> TensorMatch:
    """The tensors to prune, checked against everything ``spec``'s method needs, before any tensor is read.

    Raises:
        ValueError: missing/extra tensors, shape mismatch, missing input norms or q.
    """
    match = match_tensors(rb, rf, spec.exclude)
    if spec.row.needs_input_norms:
        missing = [n for n in match.pruned if len(rf.shape(n)) == 2 and n not in (input_norms or {})]
        if missing:
            free = [m for m, row in METHODS.items() if row.row_local and not row.needs_input_norms]
            raise ValueError(
                f"--method {spec.method} needs calibration input norms, which are missing for "
                f"{len(missing)} weight matrices, e.g. {missing[0]!r}; pass --calib_data, exclude "
                "them with --exclude" + (f", or use --method {free[0]}" if free else "")
            )
    if spec.lacks_q and not q_per_tensor:
        raise ValueError(
            f"--method {spec.method}{'' if spec.row.rescales == ('q',) else ' with --rescale q'} "
            "needs q: pass --q Q or --q_mode"
        )
    return match


def stream_prune(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: PruneSpec,
    *,
    overwrite: bool = False,
    out_shard_size: str | int = "2GB",
    progress: bool = True,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    q_per_tensor: Mapping[str, float] | None = None,
) -> PruneSummary:
    """Prune the delta of a fine-tuned checkpoint against its base, one tensor at a time, into a new checkpoint.

    Every check that does not need tensor data runs before anything is written: the spec, the output path, that both
    checkpoints are readable, and that their floating tensors match by name and shape (``spec.exclude`` patterns are
    copied unchanged from ``finetuned``; so are non-floating tensors). Each pruned tensor is computed in fp32 as
    :func:`lifelong_delta.delta.methods.prune_tensor` does and written in the fine-tuned dtype. Config, tokenizer and
    other non-weight files of ``finetuned`` are copied. The output appears at ``out`` only when everything succeeded.

    Args:
        base: Pretrained checkpoint θ_pre (HF model directory or ``.safetensors`` file).
        finetuned: Fine-tuned checkpoint θ_ft.
        out: Output directory.
        spec: What to prune and how.
        overwrite: Replace an existing ``out``.
        out_shard_size: Output shard size limit, e.g. ``"2GB"``.
        progress: Show progress on stderr (a bar on a terminal, a line every 10 s elsewhere, see
            :class:`lifelong_delta.progress.Progress`).
        input_norms: Per-tensor input activation norms ‖x_j‖₂ for WANDA, keyed by tensor name.
        q_per_tensor: Per-tensor q overriding ``spec.q`` (e.g. DAREx-q's analytic per-layer q).

    Returns:
        A :class:`~lifelong_delta.delta.summary.PruneSummary`.

    Raises:
        CheckpointError: unreadable/corrupt checkpoint, or ``out`` exists without ``overwrite``.
        ValueError: bad spec, missing/extra tensors, shape mismatch, non-finite values (naming the tensor).
    """
    out = Path(out)
    inputs = {"--base": base, "--finetuned": finetuned}
    outputs.check_output_dir(out, overwrite=overwrite, inputs=inputs)
    parse_size(out_shard_size)
    with CheckpointReader(base) as rb, CheckpointReader(finetuned) as rf:
        match = match_for_prune(rb, rf, spec, input_norms=input_norms, q_per_tensor=q_per_tensor)
        summary = prune_summary(spec, match, out, q_per_tensor)
        metadata = {k: v for k, v in rf.metadata.items() if isinstance(v, str)}
        layout = [(name, rf.code(name), rf.shape(name)) for name in rf.names()]  # every output keeps its dtype
        with ShardedWriter(
            out, out_shard_size, overwrite=overwrite, metadata=metadata, inputs=inputs, command="prune", layout=layout
        ) as writer:
            summary.tensors.extend(
                prune_into(
                    writer, rb, rf, match, spec, progress=progress, input_norms=input_norms, q_per_tensor=q_per_tensor
                )
            )
            writer.commit(copy_files_from=finetuned if Path(finetuned).is_dir() else None)
    return summary


def prune_into(
    writer: TensorSink,
    rb: CheckpointReader,
    rf: CheckpointReader,
    match: TensorMatch,
    spec: PruneSpec,
    *,
    progress: bool = True,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    q_per_tensor: Mapping[str, float] | None = None,
) -> list[TensorPruneStats]:
    """Add every tensor of ``rf`` to ``writer`` in file order, pruned (the tensors of ``match.pruned``) or copied.

    The engine of :func:`stream_prune`, for callers that checked the inputs and own the writer; each output chunk is
    handed to ``writer`` as it is produced, in flat order.

    Returns:
        The statistics of each pruned tensor.
    """
    pruned = set(match.pruned)
    names = rf.names()
    nbytes = {name: rf.info(name).nbytes for name in names}
    bufs = _Buffers()
    stats = []
    with Progress("pruning", len(names), unit="tensors", total_bytes=sum(nbytes.values()), enabled=progress) as bar:
        for name in names:
            bar.update(0, detail=name)
            base_name = match.base_name(name)
            q = q_per_tensor.get(name) if q_per_tensor else None
            if name not in pruned:
                _copy(name, rf, writer, bufs)
            elif _words_apply(spec, rb, rf, name, base_name):
                stats.append(_prune_words(name, rb, rf, writer, spec, q, base_name, bufs))
            elif spec.row.elementwise:
                stats.append(_prune_chunked(name, rb, rf, writer, spec, q, base_name, bufs))
            else:
                norms = input_norms.get(name) if input_norms else None
                if spec.row.row_local and len(rf.shape(name)) >= 2 and (norms is None or norms.dim() == 1):
                    stats.append(_prune_rows(name, rb, rf, writer, spec, q, norms, base_name))
                else:
                    stats.append(_prune_whole(name, rb, rf, writer, spec, q, norms, base_name))
            bar.update(1, nbytes=nbytes[name])
    return stats


def stream_delta_stats(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    exclude: Sequence[str] = (),
    *,
    progress: bool = False,
) -> DeltaStats:
    """Per-tensor delta statistics of two checkpoints, one tensor at a time.

    Raises:
        CheckpointError: unreadable checkpoint.
        ValueError: missing/extra tensors, shape mismatch, non-finite values (naming the tensor).
    """
    from dataclasses import replace

    import torch

    from lifelong_delta.delta.stats import DeltaStats, check_finite, layer_stats

    layers = []
    with CheckpointReader(base) as rb, CheckpointReader(finetuned) as rf:
        match = match_tensors(rb, rf, exclude)
        nbytes = {name: rf.info(name).nbytes for name in match.pruned}
        with Progress(
            "reading", len(match.pruned), unit="tensors", total_bytes=sum(nbytes.values()), enabled=progress
        ) as bar:
            for name in match.pruned:
                bar.update(0, detail=name)
                numel, parts = math.prod(rf.shape(name)), []
                step = _chunk(rf.info(name).itemsize)
                for start in range(0, numel, step):
                    count = min(step, numel - start)
                    b, f = rb.get_flat(match.base_name(name), start, count), rf.get_flat(name, start, count)
                    check_finite(name, b, "base")
                    check_finite(name, f, "fine-tuned")
                    parts.append(layer_stats(name, b, f))
                pooled = DeltaStats.pool(parts, name) if parts else layer_stats(name, torch.zeros(0), torch.zeros(0))
                layers.append(replace(pooled, shape=rf.shape(name)))
                bar.update(1, nbytes=nbytes[name])
    return DeltaStats(tuple(layers))
