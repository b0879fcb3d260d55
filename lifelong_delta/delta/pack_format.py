"""The packed-delta format: its manifest, index encoding and word helpers, shared by :mod:`.pack` (writing),
:mod:`.unpack` (rebuilding ``prune``'s output) and :mod:`.bank` (switching fine-tunes in memory).

A pack is a directory (``X.delta``) of three parts:

* ``delta.safetensors``: per fine-tuned tensor, what ``prune`` changed. The values are the *output* words of
  ``prune`` (``θ_pre + rescaled δ`` in the fine-tuned dtype), so that
  :func:`~lifelong_delta.delta.unpack.stream_unpack` rebuilds ``prune``'s output bit for bit by writing them over the
  base.
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
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader

if TYPE_CHECKING:
    from lifelong_delta.delta.methods import PruneSpec

__all__ = [
    "FORMAT",
    "KeptPositions",
    "Manifest",
    "TensorEntry",
    "fingerprint",
    "manifest_for",
    "pack_size",
    "read_manifest",
    "varint_decode",
    "varint_encode",
]

FORMAT = "lifelong-delta-pack"
VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "delta.safetensors"
FILES_DIR = "files"
HEAD_BYTES = 64 << 10  # bytes of each base tensor checked before unpacking starts
CHUNK = 4 << 20  # elements per chunk when unpacking
WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

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
        from lifelong_delta.delta.methods import PruneSpec

        return PruneSpec(
            method=self.method,
            p=self.p,
            q=self.q,
            rescale=self.rescale,  # type: ignore[arg-type]
            structural_axis=self.structural_axis,  # type: ignore[arg-type]
            structural_select=self.structural_select,  # type: ignore[arg-type]
            seed=self.seed,
            exclude=tuple(self.exclude),
            force=True,
        )

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
        raise ValueError(
            f"{pack}: pack version {raw['version']} is newer than this lifelong-delta reads "
            f"({VERSION}); upgrade lifelong-delta"
        )
    raw["tensors"] = [TensorEntry(**t) for t in raw["tensors"]]
    return Manifest(**raw)


def manifest_for(spec: PruneSpec, rf: CheckpointReader, q_per_tensor: Mapping[str, float] | None) -> Manifest:
    """A manifest of the settings and fine-tune metadata (the tensors are filled in by :class:`PackWriter`)."""
    return Manifest(
        method=spec.method,
        p=spec.p,
        q=spec.q,
        rescale=spec.rescale,
        seed=spec.seed,
        structural_axis=spec.structural_axis,
        structural_select=spec.structural_select,
        exclude=list(spec.exclude),
        q_per_tensor=dict(q_per_tensor) if q_per_tensor else None,
        metadata={k: v for k, v in rf.metadata.items() if isinstance(v, str)},
        tensors=[],
        finetuned_bytes=sum(rf.info(n).nbytes for n in rf.names()),
    )


def pack_size(pack: str | os.PathLike[str]) -> int:
    """Bytes of every file of a pack."""
    return sum(f.stat().st_size for f in Path(pack).rglob("*") if f.is_file())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def as_words(data: object, code: str) -> np.ndarray:
    """Raw ``code`` values of a byte buffer as unsigned words of the same size (no copy)."""
    return np.frombuffer(memoryview(data).cast("B"), dtype=WORDS[itemsize(code)])  # type: ignore[arg-type]


def as_code(data: object, src: str, dst: str) -> np.ndarray:
    """Words of ``dst`` holding the ``src`` values of ``data`` cast as ``prune`` casts an unchanged base value
    (through fp32); the same words when the codes agree."""
    if src == dst:
        return as_words(data, src)
    import torch

    from lifelong_delta.delta.dtypes import torch_dtype

    raw = torch.frombuffer(bytearray(memoryview(data).cast("B")), dtype=torch.uint8)  # type: ignore[arg-type]
    cast = raw.view(torch_dtype(src)).to(torch.float32).to(torch_dtype(dst))
    return cast.view(torch.uint8).numpy().view(WORDS[itemsize(dst)])


def read_words(rd: CheckpointReader, key: str, start: int, count: int) -> np.ndarray:
    """Elements ``start .. start + count - 1`` of tensor ``key`` as unsigned words of its size."""
    buf = np.empty(count, dtype=WORDS[rd.info(key).itemsize])
    rd.read_into(key, start, count, buf)
    return buf


def keep_words(count: int, settings: PruneSpec | Manifest, name: str, offset: int) -> np.ndarray:
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


class KeptPositions:
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
            count = min(CHUNK, self.total - self.read)
            block = np.concatenate((self.tail, read_words(self.rd, self.key, self.read, count)))
            self.read += count
            gaps, used = varint_decode(block)
            self.tail = block[used:]
            self.pending = np.cumsum(gaps.astype(np.int64)) + self.last
            if len(self.pending):
                self.last = int(self.pending[-1])
