"""Packed deltas: only what a pruning method keeps, so that many fine-tunes of one base cost little disk.

A pack is a directory (``X.delta``) of three parts:

* ``delta.safetensors``: per fine-tuned tensor, what ``prune`` changed. The values are the *output* words of
  ``prune`` (``θ_pre + rescaled δ`` in the fine-tuned dtype), so that :func:`stream_unpack` rebuilds ``prune``'s
  output bit for bit by writing them over the base.
* ``manifest.json``: the method and its settings, the layout and safetensors metadata of the fine-tune, a
  fingerprint of the base, and per tensor how its kept entries are found (``kind``):

  ``mask``     a method whose row has ``random_mask`` (DARE, DAREx-q): its mask is a pure function of (seed,
               name, index), regenerated on unpack, so only the values under it are stored (``values/NAME``);
  ``rows`` / ``columns``
               a method whose row declares ``lines`` (structural), for tensors of 2 or more dims: the indices of the
               changed rows or columns of the ``[shape[0], -1]`` matrix (``index/NAME``, uint32) and the values of
               those whole rows or columns;
  ``gaps``     any other mask (magnitude, WANDA, 0/1-D tensors of a structural prune): the changed elements' flat
               indices, as LEB128 varints of the gaps between them (``index/NAME``, usually one byte per entry),
               and their values;
  ``copy``     tensors ``prune`` copies from the fine-tune (excluded, non-floating, only in the fine-tune, e.g. a
               task head): the whole tensor (``tensor/NAME``);
  ``base``     tensors a LoRA prune copies from the base: nothing but their CRC.
* ``files/``: the fine-tune's config and tokenizer files that differ from the base's; the identical ones are
  named in the manifest with their SHA-256 and copied from the base on unpack.

The base fingerprint is a CRC-32 of every pruned tensor's base bytes (3.5 GB/s on one core), checked on unpack as
each tensor is read; names, shapes, dtypes and the CRC of each tensor's first 64 KiB are checked before anything
is written, so a wrong base fails at once with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lifelong_delta import outputs
from lifelong_delta.delta import _kernels
from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader, non_weight_files
from lifelong_delta.delta.matching import TensorMatch
from lifelong_delta.delta.methods import PruneSpec
from lifelong_delta.delta.writer import ShardedWriter, _chunk_bytes

if TYPE_CHECKING:
    import torch

    from lifelong_delta.delta.summary import PruneSummary

__all__ = ["FORMAT", "Manifest", "PackWriter", "TensorEntry", "pack_size", "read_manifest", "stream_pack",
           "stream_unpack"]

FORMAT = "lifelong-delta-pack"
VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "delta.safetensors"
FILES_DIR = "files"
HEAD_BYTES = 64 << 10  # bytes of each base tensor checked before unpacking starts
_CHUNK = 4 << 20  # elements per chunk when unpacking
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

Kind = Literal["mask", "gaps", "rows", "columns", "copy", "base"]


@dataclass
class TensorEntry:
    """How one fine-tuned tensor is stored (see the module docstring for ``kind``)."""

    name: str
    dtype: str
    shape: list[int]
    kind: Kind
    base_name: str | None = None
    base_dtype: str | None = None
    base_crc32: int | None = None
    base_head_crc32: int | None = None
    kept: int = 0


@dataclass
class Manifest:
    """Everything but the tensor data of a pack; ``manifest.json``."""

    method: str
    p: float
    q: float | None
    rescale: str | None
    seed: int
    structural_axis: str
    structural_select: str
    exclude: list[str]
    q_per_tensor: dict[str, float] | None
    metadata: dict[str, str]
    tensors: list[TensorEntry]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_fingerprint: str = ""
    finetuned_bytes: int = 0
    format: str = FORMAT
    version: int = VERSION

    def spec(self) -> PruneSpec:
        """The :class:`PruneSpec` the pack was made with."""
        return PruneSpec(method=self.method, p=self.p, q=self.q, rescale=self.rescale,  # type: ignore[arg-type]
                         structural_axis=self.structural_axis,  # type: ignore[arg-type]
                         structural_select=self.structural_select,  # type: ignore[arg-type]
                         seed=self.seed, exclude=tuple(self.exclude), force=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":")) + "\n"


def fingerprint(entries: Iterable[TensorEntry]) -> str:
    """SHA-256 over the base names, dtypes, shapes and CRC-32s of the pruned tensors: equal fingerprints, equal
    bases (up to CRC collisions)."""
    items = [(e.base_name, e.base_dtype, e.shape, e.base_crc32) for e in entries if e.kind != "copy"]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def read_manifest(pack: str | os.PathLike[str]) -> Manifest:
    """The manifest of a pack directory.

    Raises:
        ValueError: not a pack, or one from a newer version.
    """
    path = Path(pack) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{pack}: not a packed delta (no {MANIFEST}; make one with lifelong-delta pack)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{pack}: cannot read {MANIFEST}: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{pack}: {MANIFEST} is not a lifelong-delta pack manifest")
    if raw.get("version", 0) > VERSION:
        raise ValueError(f"{pack}: pack version {raw['version']} is newer than this lifelong-delta reads "
                         f"({VERSION}); upgrade lifelong-delta")
    raw["tensors"] = [TensorEntry(**t) for t in raw["tensors"]]
    return Manifest(**raw)


def _words(data: object, code: str) -> np.ndarray:
    """Raw ``code`` values of a byte buffer as unsigned words of the same size (no copy)."""
    return np.frombuffer(memoryview(data).cast("B"), dtype=_WORDS[itemsize(code)])  # type: ignore[arg-type]


def _as_code(data: object, src: str, dst: str) -> np.ndarray:
    """Words of ``dst`` holding the ``src`` values of ``data`` cast as ``prune`` casts an unchanged base value
    (through fp32); the same words when the codes agree."""
    if src == dst:
        return _words(data, src)
    import torch

    from lifelong_delta.delta.dtypes import torch_dtype

    raw = torch.frombuffer(bytearray(memoryview(data).cast("B")), dtype=torch.uint8)  # type: ignore[arg-type]
    cast = raw.view(torch_dtype(src)).to(torch.float32).to(torch_dtype(dst))
    return cast.view(torch.uint8).numpy().view(_WORDS[itemsize(dst)])


def _read(rd: CheckpointReader, key: str, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start + count - 1`` of tensor ``key`` as unsigned words of its size."""
    buf = np.empty(count, dtype=_WORDS[rd.info(key).itemsize])
    rd.read_into(key, start, count, buf)
    return buf


def _keep(count: int, settings: PruneSpec | Manifest, name: str, offset: int) -> np.ndarray:
    """DARE's keep-mask of ``count`` elements of ``name`` from ``offset``, at the p and seed of ``settings``."""
    from lifelong_delta.delta.masks import keep_mask

    return keep_mask(count, settings.p, seed=settings.seed, name=name, offset=offset).numpy()


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of each value (7 bits a byte, low first; the high bit marks a following byte). uint8."""
    v = np.asarray(values, dtype=np.uint64)
    n = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        n += v >= np.uint64(1) << np.uint64(7 * k)
    starts = np.cumsum(n) - n
    out = np.empty(int(n.sum()), dtype=np.uint8)
    for k in range(int(n.max(initial=0))):
        sel = n > k
        byte = (v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        out[starts[sel] + k] = (byte | np.where(n[sel] > k + 1, 0x80, 0).astype(np.uint64)).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> tuple[np.ndarray, int]:
    """The values of the complete varints in ``data`` (uint64) and how many bytes they took (a varint cut off at
    the end is left for the next call)."""
    b = np.asarray(data, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if not len(ends):
        return np.zeros(0, dtype=np.uint64), 0
    used = int(ends[-1]) + 1
    b = b[:used]
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(len(ends)), np.diff(np.concatenate((starts, [used]))))
    shift = (np.arange(used) - starts[group]) * 7
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts), used


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

    def __init__(self, out: str | os.PathLike[str], rb: CheckpointReader, match: TensorMatch, spec: PruneSpec, *,
                 overwrite: bool = False, inputs: outputs.Inputs = {}, copies_base: bool = False,
                 unmasked: Iterable[str] = ()) -> None:
        self.rb, self.match, self.spec = rb, match, spec
        self._pruned = set(match.pruned)
        self._copies_base = copies_base
        self._unmasked = set(unmasked)
        self._writer = ShardedWriter(out, 1 << 62, overwrite=overwrite, inputs=inputs, command="pack",
                                     file_name=DATA_FILE)
        self.tensors: list[TensorEntry] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_chunks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_chunks(self, name: str, dtype: str | torch.dtype, shape: Sequence[int] | None,
                   chunks: Iterable[object]) -> None:
        from lifelong_delta.delta.dtypes import dtype_code

        code = dtype if isinstance(dtype, str) else dtype_code(dtype)
        assert shape is not None
        entry = TensorEntry(name, code, [int(s) for s in shape], "copy")
        if name not in self._pruned and self._copies_base:
            entry.kind, entry.base_name, entry.base_dtype = "base", name, code
            entry.base_crc32 = 0
            for chunk in chunks:
                entry.base_crc32 = zlib.crc32(_chunk_bytes(name, chunk, code), entry.base_crc32)
            entry.base_head_crc32 = zlib.crc32(self.rb.view(name, 0, min(self.rb.info(name).numel,
                                                                         HEAD_BYTES // itemsize(code))))
        elif name not in self._pruned:
            self._writer.add_chunks(f"tensor/{name}", code, shape, chunks)
        else:
            base_name = self.match.base_name(name)
            entry.base_name, entry.base_dtype = base_name, self.rb.code(base_name)
            head = self.rb.view(base_name, 0, min(self.rb.info(base_name).numel, HEAD_BYTES // itemsize(
                entry.base_dtype)))
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
            words = _words(_chunk_bytes(entry.name, chunk, entry.dtype), entry.dtype)
            assert entry.base_name is not None
            crc = zlib.crc32(self.rb.view(entry.base_name, start, len(words)), crc)
            yield start, words
            start += len(words)
        entry.base_crc32 = crc

    def _base_words(self, entry: TensorEntry, start: int, count: int) -> np.ndarray:
        assert entry.base_name is not None and entry.base_dtype is not None
        return _as_code(self.rb.view(entry.base_name, start, count), entry.base_dtype, entry.dtype)

    def _add_masked(self, entry: TensorEntry, chunks: Iterable[object]) -> None:
        compiled = _kernels.use_words()
        key, thresh = _kernels.tensor_key(self.spec.seed, entry.name), _kernels.drop_threshold(self.spec.p)

        def kept() -> Iterator[np.ndarray]:
            for start, words in self._chunks(entry, chunks):
                if compiled:
                    values = np.empty_like(words)
                    values = values[: _kernels.select_words(words.itemsize, words, values, None, key, start, thresh)]
                else:
                    values = words[_keep(len(words), self.spec, entry.name, start)]
                entry.kept += len(values)
                yield values

        self._writer.add_chunks(f"values/{entry.name}", entry.dtype, None, kept())

    def _add_gaps(self, entry: TensorEntry, chunks: Iterable[object]) -> None:
        index: list[np.ndarray] = []
        last = -1

        def changed() -> Iterator[np.ndarray]:
            nonlocal last
            for start, words in self._chunks(entry, chunks):
                where = np.flatnonzero(words != self._base_words(entry, start, len(words)))
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
        base = self._base_words(entry, 0, out.size).reshape(rows, -1)
        axis = 1 if entry.kind == "rows" else 0
        lines = np.flatnonzero((out != base).any(axis=axis)).astype(np.uint32)
        values = out[lines] if entry.kind == "rows" else out[:, lines]
        entry.kept = int(values.size)
        self._writer.add_chunks(f"values/{entry.name}", entry.dtype, None, [np.ascontiguousarray(values)])
        self._writer.add_chunks(f"index/{entry.name}", "U32", None, [lines])

    def commit(self, manifest: Manifest, files_from: str | os.PathLike[str] | None,
               base_dir: str | os.PathLike[str] | None) -> Path:
        """Write the manifest and the non-weight files, and move the pack into place."""
        manifest.tensors = self.tensors
        manifest.base_fingerprint = fingerprint(self.tensors)
        if files_from is not None:
            for rel in non_weight_files(files_from):
                digest = _sha256(Path(files_from) / rel)
                same = base_dir is not None and (Path(base_dir) / rel).is_file() and \
                    _sha256(Path(base_dir) / rel) == digest
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_base(manifest: Manifest, rb: CheckpointReader, *, base: str | os.PathLike[str], pack: str) -> None:
    """Before unpacking: the base has every pruned tensor with the packed name, dtype and shape, and the same first
    64 KiB of each; and the files to take from it are there, unchanged.

    Raises:
        ValueError: naming the first difference.
    """
    hint = f"--base {base} is not the base {pack} was packed against"
    for e in manifest.tensors:
        if e.kind == "copy":
            continue
        assert e.base_name is not None
        if e.base_name not in rb:
            raise ValueError(f"{hint}: it has no tensor {e.base_name!r}")
        if rb.code(e.base_name) != e.base_dtype or list(rb.shape(e.base_name)) != e.shape:
            raise ValueError(f"{hint}: tensor {e.base_name!r} is {rb.code(e.base_name)} {list(rb.shape(e.base_name))}"
                             f", the pack's base had {e.base_dtype} {e.shape}")
        head = rb.view(e.base_name, 0, min(rb.info(e.base_name).numel, HEAD_BYTES // itemsize(e.base_dtype or "U8")))
        if zlib.crc32(head) != e.base_head_crc32:
            raise ValueError(f"{hint}: tensor {e.base_name!r} has other values")
    for rel, info in manifest.files.items():
        if not info["stored"]:
            path = Path(base) / rel
            if not path.is_file() or _sha256(path) != info["sha256"]:
                raise ValueError(f"{hint}: its file {rel} is missing or differs")


class _Positions:
    """The flat indices of a ``gaps`` tensor, decoded a block of varints at a time."""

    def __init__(self, rd: CheckpointReader, key: str) -> None:
        self.rd, self.key = rd, key
        self.total = rd.info(key).numel if key in rd else 0
        self.read = 0
        self.tail = np.zeros(0, dtype=np.uint8)
        self.pending = np.zeros(0, dtype=np.int64)
        self.last = -1

    def take(self, end: int) -> np.ndarray:
        """Indices below ``end`` not yet taken (ascending)."""
        parts = []
        while True:
            below = int(np.searchsorted(self.pending, end))
            parts.append(self.pending[:below])
            self.pending = self.pending[below:]
            if len(self.pending) or self.read == self.total:
                return np.concatenate(parts)
            count = min(_CHUNK, self.total - self.read)
            block = np.concatenate((self.tail, _read(self.rd, self.key, self.read, count)))
            self.read += count
            gaps, used = varint_decode(block)
            self.tail = block[used:]
            self.pending = np.cumsum(gaps.astype(np.int64)) + self.last
            if len(self.pending):
                self.last = int(self.pending[-1])


def _unpacked_chunks(entry: TensorEntry, rb: CheckpointReader, rd: CheckpointReader, manifest: Manifest
                     ) -> Iterator[np.ndarray]:
    """The output words of one pruned tensor, a chunk at a time: the base, cast to the fine-tuned dtype, with the
    kept entries written over it; the base's CRC checked at the end."""
    assert entry.base_name is not None and entry.base_dtype is not None
    numel, crc, used = math.prod(entry.shape), 0, 0
    values_key = f"values/{entry.name}"
    if entry.kind == "base":
        for start in range(0, numel, _CHUNK):
            raw = rb.view(entry.base_name, start, min(_CHUNK, numel - start))
            crc = zlib.crc32(raw, crc)
            yield _words(raw, entry.dtype)
        _check_crc(entry, crc)
        return
    if entry.kind in ("rows", "columns"):
        raw = rb.view(entry.base_name, 0, numel)
        crc = zlib.crc32(raw)
        out = _as_code(raw, entry.base_dtype, entry.dtype).copy().reshape(entry.shape[0], -1)
        lines = _read(rd, f"index/{entry.name}", 0, rd.info(f"index/{entry.name}").numel)
        values = _read(rd, values_key, 0, entry.kept)
        if entry.kind == "rows":
            out[lines] = values.reshape(len(lines), -1)
        else:
            out[:, lines] = values.reshape(out.shape[0], len(lines))
        _check_crc(entry, crc)
        yield out.reshape(-1)
        return
    positions = _Positions(rd, f"index/{entry.name}") if entry.kind == "gaps" else None
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        raw = rb.view(entry.base_name, start, count)
        crc = zlib.crc32(raw, crc)
        base = _as_code(raw, entry.base_dtype, entry.dtype)
        if positions is None and _kernels.use_words():
            out = np.empty_like(base)
            n = _scatter(base, out, rd, values_key, used, entry, manifest, start)
            yield out
            used += n
            continue
        out = base.copy()
        if positions is None:
            keep = _keep(count, manifest, entry.name, start)
            n = int(np.count_nonzero(keep))
            out[keep] = _read(rd, values_key, used, n)
        else:
            at = positions.take(start + count) - start
            n = len(at)
            out[at] = _read(rd, values_key, used, n)
        used += n
        yield out
    if used != entry.kept:
        raise ValueError(f"tensor {entry.name!r}: the pack holds {entry.kept} values, its mask keeps {used}")
    _check_crc(entry, crc)


def _scatter(base: np.ndarray, out: np.ndarray, rd: CheckpointReader, key: str, used: int, entry: TensorEntry,
             manifest: Manifest, start: int) -> int:
    """``out`` = the words ``base`` of a ``mask`` chunk with the stored values at the kept entries (compiled);
    returns how many values it used. The values are read for the mask's expected count plus a margin, and again in
    the rare chunk that keeps more."""
    k, thresh = _kernels.tensor_key(manifest.seed, entry.name), _kernels.drop_threshold(manifest.p)
    left = entry.kept - used
    want = min(left, int(len(out) * (1 - manifest.p) * 1.05) + 4096)
    values = _read(rd, key, used, want)
    n = _kernels.select_words(out.itemsize, base, out, values, k, start, thresh)
    if n > want:
        values = _read(rd, key, used, min(n, left))
        n = _kernels.select_words(out.itemsize, base, out, values, k, start, thresh)
    return n


def _check_crc(entry: TensorEntry, crc: int) -> None:
    if crc != entry.base_crc32:
        raise ValueError(f"--base is not the base the delta was packed against: tensor {entry.base_name!r} has "
                         "other values (nothing was written)")


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
            summary.tensors.extend(prune_into(writer, rb, rf, match, spec, progress=progress,
                                              input_norms=input_norms, q_per_tensor=q_per_tensor))
            writer.commit(manifest, files_from=finetuned if Path(finetuned).is_dir() else None,
                          base_dir=base if Path(base).is_dir() else None)
    return summary


def stream_unpack(
    base: str | os.PathLike[str],
    pack: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    out_shard_size: str | int = "2GB",
    progress: bool = True,
) -> Path:
    """Rebuild the checkpoint ``prune`` wrote from its base and a pack: the same tensors, shards and files, bit for
    bit, streamed one chunk at a time and written atomically.

    Raises:
        ValueError: not a pack, or the wrong base (naming what differs); nothing is written.
    """
    from lifelong_delta.progress import Progress

    manifest = read_manifest(pack)
    inputs = {"--base": base, "--delta": pack}
    outputs.check_output_dir(out, overwrite=overwrite, inputs=inputs)
    with CheckpointReader(base) as rb, CheckpointReader(Path(pack) / DATA_FILE) as rd:
        check_base(manifest, rb, base=str(base), pack=str(pack))
        layout = [(e.name, e.dtype, e.shape) for e in manifest.tensors]
        total = sum(math.prod(e.shape) * itemsize(e.dtype) for e in manifest.tensors)
        with ShardedWriter(out, out_shard_size, overwrite=overwrite, metadata=manifest.metadata, inputs=inputs,
                           command="unpack", layout=layout) as writer, \
                Progress("unpacking", len(layout), unit="tensors", total_bytes=total, enabled=progress) as bar:
            for e in manifest.tensors:
                bar.update(0, detail=e.name)
                if e.kind == "copy":
                    key = f"tensor/{e.name}"
                    writer.add_chunks(e.name, e.dtype, e.shape, _copied_chunks(rd, key))
                else:
                    writer.add_chunks(e.name, e.dtype, e.shape, _unpacked_chunks(e, rb, rd, manifest))
                bar.update(1, nbytes=math.prod(e.shape) * itemsize(e.dtype))
            for rel, info in manifest.files.items():
                src = Path(pack) / FILES_DIR / rel if info["stored"] else Path(base) / rel
                (writer.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, writer.tmp / rel)
            return writer.commit()


def _copied_chunks(rd: CheckpointReader, key: str) -> Iterator[np.ndarray]:
    info = rd.info(key)
    step = max(1, (8 << 20) // info.itemsize)
    for start in range(0, info.numel, step):
        count = min(step, info.numel - start)
        yield np.frombuffer(rd.read_into(key, start, count, bytearray(count * info.itemsize)), dtype=np.uint8)


def pack_size(pack: str | os.PathLike[str]) -> int:
    """Bytes of every file of a pack."""
    return sum(f.stat().st_size for f in Path(pack).rglob("*") if f.is_file())


def manifest_for(spec: PruneSpec, rf: CheckpointReader, q_per_tensor: Mapping[str, float] | None) -> Manifest:
    """A manifest of the settings and fine-tune metadata (the tensors are filled in by :class:`PackWriter`)."""
    return Manifest(method=spec.method, p=spec.p, q=spec.q, rescale=spec.rescale, seed=spec.seed,
                    structural_axis=spec.structural_axis, structural_select=spec.structural_select,
                    exclude=list(spec.exclude), q_per_tensor=dict(q_per_tensor) if q_per_tensor else None,
                    metadata={k: v for k, v in rf.metadata.items() if isinstance(v, str)}, tensors=[],
                    finetuned_bytes=sum(rf.info(n).nbytes for n in rf.names()))
