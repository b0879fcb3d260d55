"""Streaming safetensors checkpoints: a lazy reader (here) and an atomic, sharded writer (:mod:`.writer`).

Layer 2 of the architecture (small stateful objects, no Lightning). Both ends keep memory near one tensor, and
neither imports torch: dtypes are safetensors codes (``"BF16"``, ``"F32"``, ...) and data moves as raw bytes, so
the streaming prune of bf16/fp32 checkpoints runs without torch or numpy. The torch-facing methods
(:meth:`CheckpointReader.get`, :meth:`CheckpointReader.dtype`, ``ShardedWriter.add`` of a tensor) import torch when
called.

* :class:`CheckpointReader` parses the safetensors headers itself and reads a tensor's bytes with positional reads
  (``preadv``) into a caller's buffer, or maps just one chunk's range (:meth:`CheckpointReader.view`) and unmaps it
  when the chunk is done. Whole shards are never mapped, so pages of tensors already processed never count towards
  the resident set (a ``safe_open`` mmap keeps every touched page of a shard resident while it is open).
* :class:`lifelong_delta.delta.writer.ShardedWriter` streams each tensor's bytes into its shard and renames the
  finished folder into place (atomic output).

:func:`lifelong_delta.delta.streaming.stream_prune` joins the two with a pruning method.

File layout follows Hugging Face: ``model.safetensors`` or ``model-00001-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lifelong_delta.delta.dtypes import itemsize, torch_dtype, valid_code

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "TensorInfo",
    "copy_non_weight_files",
    "is_adapter_dir",
    "parse_size",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100_000_000
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_WEIGHT_INDEXES = (
    INDEX_FILE,
    "pytorch_model.bin.index.json",
    "tf_model.h5.index.json",
    "flax_model.msgpack.index.json",
)


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


class CheckpointError(ValueError):
    """A checkpoint (or output path) the user gave cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype (a safetensors code), shape and byte range (relative to the data
    section)."""

    file: Path
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int

    @property
    def itemsize(self) -> int:
        return itemsize(self.code)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return torch_dtype(self.code)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_size(size: str | int) -> int:
    """Parse a byte size: an int, or a string such as ``"2GB"``, ``"500MB"``, ``"1GiB"``, ``"4096"``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000 (as in Hugging Face ``max_shard_size``), ``KiB``… powers of 1024.
    """
    if isinstance(size, bool):
        raise TypeError(f"out_shard_size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"out_shard_size={size!r} is not a size; use e.g. '2GB', '500MB' or a byte count")
        unit = (match.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        base = 1024 if "I" in unit else 1000
        value = int(float(match.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"out_shard_size must be positive, got {size!r}")
    return value


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header without touching its tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header_bytes = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code = str(entry["dtype"])
            if not valid_code(code):
                raise KeyError(code)
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        info = TensorInfo(path, code, shape, begin, end, data_start)
        if info.nbytes != info.numel * info.itemsize or data_start + end > size or begin > end:
            raise CheckpointError(
                f"{path}: tensor {name!r} has byte range {begin}..{end} that does not match "
                f"its shape {list(shape)} or the file size (truncated file?)"
            )
        infos[name] = info
    return infos, dict(metadata)


class CheckpointReader:
    """Lazy, read-only view of a safetensors checkpoint (a Hugging Face model directory or one file).

    Only the headers are read on construction. :meth:`read_into` reads raw bytes into a caller's buffer (no torch);
    :meth:`get` reads one tensor into a fresh CPU tensor. Reads are
    positional (``preadv``), so threads may read at once (the streaming prune reads the next chunk while the
    current one is computed); each shard file stays open until :meth:`close`.

    Args:
        path: A directory holding ``model.safetensors`` or ``model.safetensors.index.json`` with its shards
            (or exactly one ``*.safetensors`` file), or the path of a single ``.safetensors`` file.

    Raises:
        CheckpointError: if the path is missing, holds no safetensors weights, or a file is unreadable or corrupt.
            The message names the path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fds: dict[Path, int] = {}  # open shards; reads are positional (pread), so threads may share them
        self._lock = threading.Lock()
        self.path = Path(path)
        self.files = self._weight_files(self.path)
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            infos, metadata = _read_header(file)
            self.metadata.update(metadata)
            for name, info in infos.items():
                if name in self._infos:
                    raise CheckpointError(f"{file}: tensor {name!r} also appears in {self._infos[name].file}")
                self._infos[name] = info

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_file():
            return [path]
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(
                    f"{index}: 'weight_map' must be an object mapping tensor names to shard file "
                    f"names, got {type(weight_map).__name__}"
                )
            for shard in dict.fromkeys(weight_map.values()):
                parts = Path(shard).parts
                if not parts or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
                    raise CheckpointError(
                        f"{index} names shard {shard!r}, which is outside the model folder; "
                        "shard names must be file names inside it"
                    )
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index} lists {file.name}, which is missing from {path}")
            return files
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        raise CheckpointError(
            f"{path}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE}"
            + (f"; found {len(found)} *.safetensors files without an index)" if found else ")")
        )

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, then by offset), the cheapest order to read them in."""
        return sorted(self._infos, key=lambda n: (self.files.index(self._infos[n].file), self._infos[n].begin))

    def info(self, name: str) -> TensorInfo:
        """Header information of one tensor."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def code(self, name: str) -> str:
        """The safetensors dtype code of one tensor (``"BF16"``, ``"F32"``, ...)."""
        return self.info(name).code

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of one tensor (imports torch)."""
        return self.info(name).dtype

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None
            return fd

    def _range(self, name: str, start: int, count: int) -> tuple[TensorInfo, int, int]:
        """``(info, file position, byte count)`` of elements ``start .. start + count - 1`` of tensor ``name``."""
        info = self.info(name)
        if start < 0 or count < 0 or start + count > info.numel:
            raise IndexError(f"elements {start}..{start + count} are outside tensor {name!r} of {info.numel}")
        return info, info.data_start + info.begin + start * info.itemsize, count * info.itemsize

    def read_into(self, name: str, start: int, count: int, buffer: object) -> memoryview:
        """Read the raw bytes of elements ``start .. start + count - 1`` of the flattened tensor into ``buffer``.

        Args:
            buffer: A writable, C-contiguous buffer (``bytearray``, numpy array, ...) of at least
                ``count * itemsize`` bytes. The streaming prune reuses a few, which saves the page faults of fresh
                memory.

        Returns:
            A byte view of the part of ``buffer`` that was filled.
        """
        info, pos, nbytes = self._range(name, start, count)
        view = memoryview(buffer).cast("B")[:nbytes]  # type: ignore[arg-type]
        if len(view) != nbytes:
            raise ValueError(f"buffer of {len(view)} bytes is too small for {count} elements of {name!r}")
        if count:
            fd, got = self._fd(info.file), 0
            try:
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], pos + got)
                    if n == 0:
                        break
                    got += n
            except OSError as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror or e}") from None
            if got != nbytes:
                raise CheckpointError(f"{info.file}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
        return view

    def view(self, name: str, start: int, count: int) -> memoryview:
        """A read-only view of the raw bytes of elements ``start .. start + count - 1``, without copying them.

        The range alone is mapped (its pages populated at once from the page cache) and unmapped when the returned
        view is freed, so the resident set holds only the chunks in use. The file must not be truncated while a
        view of it is alive (reading a vanished page kills the process, as with any memory map).
        """
        import mmap

        info, pos, nbytes = self._range(name, start, count)
        if nbytes == 0:
            return memoryview(b"")
        aligned = pos - pos % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(
                self._fd(info.file),
                pos - aligned + nbytes,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ,
                offset=aligned,
            )
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror or e}") from None
        return memoryview(mm)[pos - aligned : pos - aligned + nbytes]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. Shape: as stored. A new CPU tensor that owns its memory (no mmap)."""
        info = self.info(name)
        return self.get_flat(name, 0, info.numel).reshape(info.shape)

    def get_flat(self, name: str, start: int, count: int, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read elements ``start .. start + count - 1`` of the flattened tensor. Shape ``(count,)``.

        ``buffer``: a contiguous uint8 tensor of at least ``count`` elements' bytes to read into; the result is a
        view of it.
        """
        import torch

        info = self.info(name)
        nbytes = max(count, 0) * info.itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        self.read_into(name, start, count, buf.numpy())
        return buf.view(info.dtype)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in file order, one tensor in memory at a time."""
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()


def _is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES


def non_weight_files(src: str | os.PathLike[str]) -> list[str]:
    """Relative paths of the config, tokenizer and other non-weight files of a model directory (sub-directories
    included; weight files, their indexes and hidden entries left out), sorted; empty for a single file."""
    src = Path(src)
    if not src.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(src)
        found += [str(rel / f) for f in sorted(files) if not f.startswith(".") and not _is_weight_file(f)]
    return found


def copy_non_weight_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy config, tokenizer and other non-weight files (and sub-directories) of a model directory.

    Copies are new files whose mode follows the umask (not the source's mode). Weight files (``*.safetensors``,
    ``*.bin``, their indexes, …) and hidden entries are skipped.

    Returns:
        The relative paths copied.
    """
    src, dst = Path(src), Path(dst)
    copied = non_weight_files(src)
    for rel in copied:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)  # a new file: the umask sets its mode
    return copied
