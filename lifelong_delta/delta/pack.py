"""``lifelong-delta pack``: prune like ``prune``, but keep only what the prune changed (the format:
:mod:`lifelong_delta.delta.pack_format`).

``prune``'s engine (:func:`~lifelong_delta.delta.streaming.prune_into`) hands each output chunk to a
:class:`PackWriter` instead of the checkpoint writer; the writer compares it with the base, or regenerates the
random mask, and stores the kept words as they come.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lifelong_delta import outputs
from lifelong_delta.delta import _kernels
from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader, non_weight_files
from lifelong_delta.delta.matching import TensorMatch
from lifelong_delta.delta.methods import PruneSpec
from lifelong_delta.delta.pack_format import (
    DATA_FILE,
    FILES_DIR,
    HEAD_BYTES,
    MANIFEST,
    Manifest,
    TensorEntry,
    as_code,
    as_words,
    file_sha256,
    fingerprint,
    keep_words,
    manifest_for,
    varint_encode,
)
from lifelong_delta.delta.writer import ShardedWriter, _chunk_bytes

if TYPE_CHECKING:
    import torch

    from lifelong_delta.delta.summary import PruneSummary

__all__ = ["PackWriter", "stream_pack"]


class PackWriter:
    """A :class:`~lifelong_delta.delta.streaming.TensorSink` that keeps only what a prune changed, into a pack.

    Each output tensor of the streaming prune arrives in flat chunks; the writer compares them with the base (or
    regenerates the random mask) and stores the kept entries as described in the module docstring, as they come.

    Args:
        out: The pack directory to write (atomically, on :meth:`commit`).
        rb: Reader of the base checkpoint (read again for the comparison and the fingerprint).
        match: How fine-tuned tensors pair with base tensors.
        spec: The prune's settings.
        overwrite: Replace an existing ``out`` this tool wrote.
        inputs: ``{option: path}`` that ``out`` must not touch.
        copies_base: The tensors not in ``match.pruned`` are the base's own (a LoRA prune), not the fine-tune's.
        unmasked: Pruned tensors whose output is not ``spec``'s mask (a LoRA prune's excluded tensors, merged
            unpruned): stored as ``gaps``.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        rb: CheckpointReader,
        match: TensorMatch,
        spec: PruneSpec,
        *,
        overwrite: bool = False,
        inputs: outputs.Inputs = {},
        copies_base: bool = False,
        unmasked: Iterable[str] = (),
    ) -> None:
        self.rb, self.match, self.spec = rb, match, spec
        self._pruned = set(match.pruned)
        self._copies_base = copies_base
        self._unmasked = set(unmasked)
        self._writer = ShardedWriter(
            out, 1 << 62, overwrite=overwrite, inputs=inputs, command="pack", file_name=DATA_FILE
        )
        self.tensors: list[TensorEntry] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_chunks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_chunks(
        self, name: str, dtype: str | torch.dtype, shape: Sequence[int] | None, chunks: Iterable[object]
    ) -> None:
        from lifelong_delta.delta.dtypes import dtype_code

        code = dtype if isinstance(dtype, str) else dtype_code(dtype)
        assert shape is not None
        entry = TensorEntry(name, code, [int(s) for s in shape], "copy")
        if name not in self._pruned and self._copies_base:
            entry.kind, entry.base_name, entry.base_dtype = "base", name, code
            entry.base_crc32 = 0
            for chunk in chunks:
                entry.base_crc32 = zlib.crc32(_chunk_bytes(name, chunk, code), entry.base_crc32)
            entry.base_head_crc32 = zlib.crc32(
                self.rb.view(name, 0, min(self.rb.info(name).numel, HEAD_BYTES // itemsize(code)))
            )
        elif name not in self._pruned:
            self._writer.add_chunks(f"tensor/{name}", code, shape, chunks)
        else:
            base_name = self.match.base_name(name)
            entry.base_name, entry.base_dtype = base_name, self.rb.code(base_name)
            head = self.rb.view(
                base_name, 0, min(self.rb.info(base_name).numel, HEAD_BYTES // itemsize(entry.base_dtype))
            )
            entry.base_head_crc32 = zlib.crc32(head)
            row = self.spec.row
            if row.random_mask and name not in self._unmasked:
                entry.kind = "mask"
                self._add_masked(entry, chunks)
            elif row.lines is not None and len(shape) >= 2 and name not in self._unmasked:
                entry.kind = row.lines(self.spec)
                self._add_lines(entry, chunks)
            else:
                entry.kind = "gaps"
                self._add_gaps(entry, chunks)
        self.tensors.append(entry)

    def _chunks(self, entry: TensorEntry, chunks: Iterable[object]) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset, output words)`` of each chunk, the base fingerprint updated alongside."""
        crc, start = 0, 0
        for chunk in chunks:
            words = as_words(_chunk_bytes(entry.name, chunk, entry.dtype), entry.dtype)
            assert entry.base_name is not None
            crc = zlib.crc32(self.rb.view(entry.base_name, start, len(words)), crc)
            yield start, words
            start += len(words)
        entry.base_crc32 = crc

    def _basewords(self, entry: TensorEntry, start: int, count: int) -> np.ndarray:
        assert entry.base_name is not None and entry.base_dtype is not None
        return as_code(self.rb.view(entry.base_name, start, count), entry.base_dtype, entry.dtype)

    def _add_masked(self, entry: TensorEntry, chunks: Iterable[object]) -> None:
        compiled = _kernels.use_words()
        key, thresh = _kernels.tensor_key(self.spec.seed, entry.name), _kernels.drop_threshold(self.spec.p)

        def kept() -> Iterator[np.ndarray]:
            for start, words in self._chunks(entry, chunks):
                if compiled:
                    values = np.empty_like(words)
                    values = values[: _kernels.select_words(words.itemsize, words, values, None, key, start, thresh)]
                else:
                    values = words[keep_words(len(words), self.spec, entry.name, start)]
                entry.kept += len(values)
                yield values

        self._writer.add_chunks(f"values/{entry.name}", entry.dtype, None, kept())

    def _add_gaps(self, entry: TensorEntry, chunks: Iterable[object]) -> None:
        index: list[np.ndarray] = []
        last = -1

        def changed() -> Iterator[np.ndarray]:
            nonlocal last
            for start, words in self._chunks(entry, chunks):
                where = np.flatnonzero(words != self._basewords(entry, start, len(words)))
                if len(where):
                    at = where + start
                    index.append(varint_encode(np.diff(at, prepend=last)))
                    last = int(at[-1])
                entry.kept += len(where)
                yield words[where]

        self._writer.add_chunks(f"values/{entry.name}", entry.dtype, None, changed())
        self._writer.add_chunks(f"index/{entry.name}", "U8", None, index)

    def _add_lines(self, entry: TensorEntry, chunks: Iterable[object]) -> None:
        parts = [words.copy() for _, words in self._chunks(entry, chunks)]
        rows = entry.shape[0]
        out = np.concatenate(parts).reshape(rows, -1)
        base = self._basewords(entry, 0, out.size).reshape(rows, -1)
        axis = 1 if entry.kind == "rows" else 0
        lines = np.flatnonzero((out != base).any(axis=axis)).astype(np.uint32)
        values = out[lines] if entry.kind == "rows" else out[:, lines]
        entry.kept = int(values.size)
        self._writer.add_chunks(f"values/{entry.name}", entry.dtype, None, [np.ascontiguousarray(values)])
        self._writer.add_chunks(f"index/{entry.name}", "U32", None, [lines])

    def commit(
        self, manifest: Manifest, files_from: str | os.PathLike[str] | None, base_dir: str | os.PathLike[str] | None
    ) -> Path:
        """Write the manifest and the non-weight files, and move the pack into place."""
        manifest.tensors = self.tensors
        manifest.base_fingerprint = fingerprint(self.tensors)
        if files_from is not None:
            for rel in non_weight_files(files_from):
                digest = file_sha256(Path(files_from) / rel)
                same = (
                    base_dir is not None
                    and (Path(base_dir) / rel).is_file()
                    and file_sha256(Path(base_dir) / rel) == digest
                )
                manifest.files[rel] = {"sha256": digest, "stored": not same}
                if not same:
                    (self._writer.tmp / FILES_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(files_from) / rel, self._writer.tmp / FILES_DIR / rel)
        (self._writer.tmp / MANIFEST).write_text(manifest.to_json())
        return self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.__exit__(*exc)


def stream_pack(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: PruneSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    q_per_tensor: Mapping[str, float] | None = None,
) -> PruneSummary:
    """Prune like :func:`~lifelong_delta.delta.streaming.stream_prune`, but write only what the prune kept, into a
    pack directory (atomically); the arguments are ``stream_prune``'s.

    Returns:
        The prune's summary.
    """
    from lifelong_delta.delta.streaming import match_for_prune, prune_into, prune_summary

    inputs = {"--base": base, "--finetuned": finetuned}
    outputs.check_output_dir(out, overwrite=overwrite, inputs=inputs)
    with CheckpointReader(base) as rb, CheckpointReader(finetuned) as rf:
        match = match_for_prune(rb, rf, spec, input_norms=input_norms, q_per_tensor=q_per_tensor)
        manifest = manifest_for(spec, rf, q_per_tensor)
        summary = prune_summary(spec, match, out, q_per_tensor)
        with PackWriter(out, rb, match, spec, overwrite=overwrite, inputs=inputs) as writer:
            summary.tensors.extend(
                prune_into(
                    writer, rb, rf, match, spec, progress=progress, input_norms=input_norms, q_per_tensor=q_per_tensor
                )
            )
            writer.commit(
                manifest,
                files_from=finetuned if Path(finetuned).is_dir() else None,
                base_dir=base if Path(base).is_dir() else None,
            )
    return summary
