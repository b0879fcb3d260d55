"""``lifelong-delta unpack``: rebuild ``prune``'s output from the base and a pack, bit for bit (the format:
:mod:`lifelong_delta.delta.pack_format`).

Each tensor streams a chunk at a time: the base's words, cast to the fine-tuned dtype as ``prune`` casts an unchanged
value, with the stored words written over the kept entries. The base is checked against the pack's fingerprint
before anything is written (names, dtypes, shapes, each tensor's first 64 KiB) and as each tensor is read (its
CRC-32); a mismatch leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lifelong_delta import outputs
from lifelong_delta.delta import _kernels
from lifelong_delta.delta.dtypes import itemsize
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.pack_format import (
    CHUNK,
    DATA_FILE,
    FILES_DIR,
    HEAD_BYTES,
    KeptPositions,
    Manifest,
    TensorEntry,
    as_code,
    as_words,
    file_sha256,
    keep_words,
    read_manifest,
    read_words,
)
from lifelong_delta.delta.writer import ShardedWriter

__all__ = ["check_base", "stream_unpack"]


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
            raise ValueError(
                f"{hint}: tensor {e.base_name!r} is {rb.code(e.base_name)} {list(rb.shape(e.base_name))}"
                f", the pack's base had {e.base_dtype} {e.shape}"
            )
        head = rb.view(e.base_name, 0, min(rb.info(e.base_name).numel, HEAD_BYTES // itemsize(e.base_dtype or "U8")))
        if zlib.crc32(head) != e.base_head_crc32:
            raise ValueError(f"{hint}: tensor {e.base_name!r} has other values")
    for rel, info in manifest.files.items():
        if not info["stored"]:
            path = Path(base) / rel
            if not path.is_file() or file_sha256(path) != info["sha256"]:
                raise ValueError(f"{hint}: its file {rel} is missing or differs")


def _unpacked_chunks(
    entry: TensorEntry, rb: CheckpointReader, rd: CheckpointReader, manifest: Manifest
) -> Iterator[np.ndarray]:
    """The output words of one pruned tensor, a chunk at a time: the base, cast to the fine-tuned dtype, with the
    kept entries written over it; the base's CRC checked at the end."""
    assert entry.base_name is not None and entry.base_dtype is not None
    numel, crc, used = math.prod(entry.shape), 0, 0
    values_key = f"values/{entry.name}"
    if entry.kind == "base":
        for start in range(0, numel, CHUNK):
            raw = rb.view(entry.base_name, start, min(CHUNK, numel - start))
            crc = zlib.crc32(raw, crc)
            yield as_words(raw, entry.dtype)
        _check_crc(entry, crc)
        return
    if entry.kind in ("rows", "columns"):
        raw = rb.view(entry.base_name, 0, numel)
        crc = zlib.crc32(raw)
        out = as_code(raw, entry.base_dtype, entry.dtype).copy().reshape(entry.shape[0], -1)
        lines = read_words(rd, f"index/{entry.name}", 0, rd.info(f"index/{entry.name}").numel)
        values = read_words(rd, values_key, 0, entry.kept)
        if entry.kind == "rows":
            out[lines] = values.reshape(len(lines), -1)
        else:
            out[:, lines] = values.reshape(out.shape[0], len(lines))
        _check_crc(entry, crc)
        yield out.reshape(-1)
        return
    positions = KeptPositions(rd, f"index/{entry.name}") if entry.kind == "gaps" else None
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        raw = rb.view(entry.base_name, start, count)
        crc = zlib.crc32(raw, crc)
        base = as_code(raw, entry.base_dtype, entry.dtype)
        if positions is None and _kernels.use_words():
            out = np.empty_like(base)
            n = _scatter(base, out, rd, values_key, used, entry, manifest, start)
            yield out
            used += n
            continue
        out = base.copy()
        if positions is None:
            keep = keep_words(count, manifest, entry.name, start)
            n = int(np.count_nonzero(keep))
            out[keep] = read_words(rd, values_key, used, n)
        else:
            at = positions.take(start + count) - start
            n = len(at)
            out[at] = read_words(rd, values_key, used, n)
        used += n
        yield out
    if used != entry.kept:
        raise ValueError(f"tensor {entry.name!r}: the pack holds {entry.kept} values, its mask keeps {used}")
    _check_crc(entry, crc)


def _scatter(
    base: np.ndarray,
    out: np.ndarray,
    rd: CheckpointReader,
    key: str,
    used: int,
    entry: TensorEntry,
    manifest: Manifest,
    start: int,
) -> int:
    """``out`` = the words ``base`` of a ``mask`` chunk with the stored values at the kept entries (compiled);
    returns how many values it used. The values are read for the mask's expected count plus a margin, and again in
    the rare chunk that keeps more."""
    k, thresh = _kernels.tensor_key(manifest.seed, entry.name), _kernels.drop_threshold(manifest.p)
    left = entry.kept - used
    want = min(left, int(len(out) * (1 - manifest.p) * 1.05) + 4096)
    values = read_words(rd, key, used, want)
    n = _kernels.select_words(out.itemsize, base, out, values, k, start, thresh)
    if n > want:
        values = read_words(rd, key, used, min(n, left))
        n = _kernels.select_words(out.itemsize, base, out, values, k, start, thresh)
    return n


def _check_crc(entry: TensorEntry, crc: int) -> None:
    if crc != entry.base_crc32:
        raise ValueError(
            f"--base is not the base the delta was packed against: tensor {entry.base_name!r} has "
            "other values (nothing was written)"
        )


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
        with (
            ShardedWriter(
                out,
                out_shard_size,
                overwrite=overwrite,
                metadata=manifest.metadata,
                inputs=inputs,
                command="unpack",
                layout=layout,
            ) as writer,
            Progress("unpacking", len(layout), unit="tensors", total_bytes=total, enabled=progress) as bar,
        ):
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
