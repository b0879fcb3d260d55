"""Streaming safetensors checkpoints: a lazy reader and an atomic, sharded writer.

Layer 2 of the architecture (small stateful objects, no Lightning). Both ends keep memory near one tensor:

* :class:`CheckpointReader` parses the safetensors headers itself and reads one tensor's bytes with a plain
  ``readinto`` into a fresh buffer. Nothing is memory-mapped, so pages of tensors already processed never count
  towards the resident set (a ``safe_open`` mmap keeps every touched page of a shard resident while it is open).
* :class:`ShardedWriter` streams each tensor's bytes to a per-shard body file as soon as it is added; when a shard
  is full it writes the final file as ``header + body`` (a kernel-side copy). All files go to a temporary directory
  next to ``out``, which is renamed into place by :meth:`ShardedWriter.commit`; a killed or failed run leaves
  nothing at ``out`` (the rules for outputs and temporary folders are in :mod:`lifelong_delta.outputs`).

:func:`lifelong_delta.delta.streaming.stream_prune` joins the two with a pruning method.

File layout follows Hugging Face: ``model.safetensors`` or ``model-00001-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from lifelong_delta import outputs

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "copy_non_weight_files",
    "parse_size",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100_000_000
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint (or output path) the user gave cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range (relative to the data section)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int

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
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        info = TensorInfo(path, dtype, shape, begin, end, data_start)
        if info.nbytes != info.numel * dtype.itemsize or data_start + end > size or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} has byte range {begin}..{end} that does not match "
                                  f"its shape {list(shape)} or the file size (truncated file?)")
        infos[name] = info
    return infos, dict(metadata)


class CheckpointReader:
    """Lazy, read-only view of a safetensors checkpoint (a Hugging Face model directory or one file).

    Only the headers are read on construction. :meth:`get` reads one tensor into a fresh CPU tensor. Reads are
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
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard file "
                                      f"names, got {type(weight_map).__name__}")
            for shard in dict.fromkeys(weight_map.values()):
                parts = Path(shard).parts
                if not parts or Path(shard).is_absolute() or ".." in parts or "\\" in shard:
                    raise CheckpointError(f"{index} names shard {shard!r}, which is outside the model folder; "
                                          "shard names must be file names inside it")
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

    def dtype(self, name: str) -> torch.dtype:
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

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. Shape: as stored. A new CPU tensor that owns its memory (no mmap)."""
        info = self.info(name)
        return self.get_flat(name, 0, info.numel).reshape(info.shape)

    def get_flat(self, name: str, start: int, count: int, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read elements ``start .. start + count - 1`` of the flattened tensor. Shape ``(count,)``.

        ``buffer``: a contiguous uint8 tensor of at least ``count`` elements' bytes to read into (the streaming
        prune reuses a few, which saves the page faults of fresh memory); the result is a view of it.
        """
        info = self.info(name)
        if start < 0 or count < 0 or start + count > info.numel:
            raise IndexError(f"elements {start}..{start + count} are outside tensor {name!r} of {info.numel}")
        size = info.dtype.itemsize
        buf = torch.empty(count * size, dtype=torch.uint8) if buffer is None else buffer[: count * size]
        if count:
            fd, view = self._fd(info.file), memoryview(buf.numpy())
            pos, got = info.data_start + info.begin + start * size, 0
            try:
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], pos + got)
                    if n == 0:
                        break
                    got += n
            except OSError as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror or e}") from None
            if got != count * size:
                raise CheckpointError(f"{info.file}: tensor {name!r} is truncated ({got} of {count * size} bytes)")
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


def copy_non_weight_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy config, tokenizer and other non-weight files (and sub-directories) of a model directory.

    Copies are new files whose mode follows the umask (not the source's mode). Weight files (``*.safetensors``, ``*.bin``, their indexes, …) and hidden entries are skipped.

    Returns:
        The relative paths copied.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return []
    copied = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(src)
        for fname in sorted(files):
            if fname.startswith(".") or _is_weight_file(fname):
                continue
            (dst / rel).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / fname, dst / rel / fname)  # a new file: the umask sets its mode
            copied.append(str(rel / fname))
    return copied


def _copy_body(src: IO[bytes], dst: IO[bytes], nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` (from its start) to ``dst``, kernel-side where the OS allows."""
    src.seek(0)
    dst.flush()
    left = nbytes
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                done = os.copy_file_range(src.fileno(), dst.fileno(), left)
                if done == 0:
                    break
                left -= done
            dst.seek(0, os.SEEK_END)
        except OSError:
            dst.seek(0, os.SEEK_END)
    if left:
        src.seek(nbytes - left)
        shutil.copyfileobj(src, dst, length=16 * 2**20)


class ShardedWriter:
    """Write a sharded safetensors checkpoint atomically, holding no more than one tensor in memory.

    Usage::

        with ShardedWriter(out, "2GB") as w:
            for name, t in tensors:
                w.add(name, t)
            w.commit(copy_files_from=finetuned_dir)

    Leaving the ``with`` block without :meth:`commit` (an exception, Ctrl-C) deletes the temporary directory and
    leaves ``out`` untouched.

    Args:
        out_dir: Final output directory.
        max_shard_size: Shard size limit (``"2GB"``, ``"500MB"`` or bytes). A shard is closed before a tensor that
            would push it past the limit; a single larger tensor gets a shard of its own.
        overwrite: Replace an existing ``out_dir`` at commit time, if it is an output folder this tool wrote
            (:func:`lifelong_delta.outputs.check_output_dir`).
        metadata: safetensors ``__metadata__`` of every shard; ``{"format": "pt"}`` by default.
        inputs: ``{option: path}`` of what the caller reads; ``out_dir`` must not be, contain or lie inside any.
        command: The command named in the output folder's marker.
        layout: Every tensor to come, in order, as ``(name, dtype, shape)``. With it the shards are planned up
            front and each tensor's bytes go straight into its final file (written once); the tensors must then be
            added in exactly this order. Without it each shard's data is staged in a body file and copied behind
            its header when the shard is full.

    Raises:
        OutputPathError: ``out_dir`` overlaps an input, exists without ``overwrite``, or is not this tool's output.
        CheckpointError: its parent is not writable.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        max_shard_size: str | int = "2GB",
        *,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
        inputs: outputs.Inputs = {},
        command: str = "write",
        layout: Sequence[tuple[str, torch.dtype, Sequence[int]]] | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.inputs = dict(inputs)
        self.command = command
        outputs.check_output_dir(self.out, overwrite=overwrite, inputs=self.inputs)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = outputs.make_temp_dir(self.out.parent, f".{self.out.name}.tmp-")
        except OSError as e:
            raise CheckpointError(f"cannot create output next to {self.out}: {e.strerror or e}") from None
        self._shards: list[tuple[Path, list[str]]] = []  # finished shards: (temporary file, tensor names)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # open shard: name -> code, shape, range
        self._body: IO[bytes] | None = None
        self._body_bytes = 0
        self._names: set[str] = set()
        self.total_size = 0
        self._done = False
        self._plan: list[list[tuple[str, str, tuple[int, ...], int, int]]] | None = None
        self._next: list[str] = []  # planned names not added yet, last one first
        self._planned_entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._thread: threading.Thread | None = None  # writes queued chunks (see _write)
        self._queue: queue.Queue = queue.Queue()
        self._write_error: BaseException | None = None
        if layout is not None:
            self._plan = self._plan_shards(layout)
            self._next = [name for shard in self._plan for name, *_ in shard][::-1]

    def _plan_shards(self, layout: Sequence[tuple[str, torch.dtype, Sequence[int]]]
                     ) -> list[list[tuple[str, str, tuple[int, ...], int, int]]]:
        """Shards as lists of ``(name, code, shape, begin, end)``, by the same rule as the unplanned path."""
        shards: list[list[tuple[str, str, tuple[int, ...], int, int]]] = [[]]
        used, seen = 0, set()
        for name, dtype, shape in layout:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the layout")
            if dtype not in _CODES:
                raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            seen.add(name)
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and used + nbytes > self.max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, _CODES[dtype], shape, used, used + nbytes))
            used += nbytes
        return shards

    def _header(self, entries: dict[str, tuple[str, tuple[int, ...], int, int]]) -> bytes:
        header: dict[str, object] = {"__metadata__": self.metadata}
        for name, (code, shape, begin, end) in entries.items():
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        return struct.pack("<Q", len(raw)) + raw

    def _open_planned_shard(self) -> None:
        """Open the next planned shard's final file and write its header."""
        assert self._plan is not None
        planned = self._plan[len(self._shards)]
        self._planned_entries = {name: (code, shape, b, e) for name, code, shape, b, e in planned}
        self._body = open(self.tmp / f"shard-{len(self._shards):05d}.safetensors", "wb")  # noqa: SIM115
        self._body.write(self._header(self._planned_entries))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (written to disk immediately; the caller may free it afterwards)."""
        self.add_chunks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_chunks(
        self, name: str, dtype: torch.dtype, shape: Sequence[int], chunks: Iterable[torch.Tensor]
    ) -> None:
        """Append one tensor given as consecutive pieces of its flattened data (each written as it arrives).

        Args:
            name: Tensor name.
            dtype: Its dtype; every chunk must have it.
            shape: Its shape; the chunks must add up to ``prod(shape)`` elements.
            chunks: The pieces, in order (any shapes).
        """
        if self._done:
            raise RuntimeError("ShardedWriter.add() after commit()/abort()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        if dtype not in _CODES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if self._plan is not None:
            if not self._next or self._next[-1] != name:
                expected = f"{self._next[-1]!r}" if self._next else "no more tensors"
                raise ValueError(f"tensor {name!r} is out of the writer's layout order (expected {expected})")
            if self._body is None:
                self._open_planned_shard()
            if self._planned_entries[name][:2] != (_CODES[dtype], shape):
                raise ValueError(f"tensor {name!r} has {dtype} {list(shape)}, but the layout planned "
                                 f"{self._planned_entries[name][0]} {list(self._planned_entries[name][1])}")
            self._next.pop()
        else:
            if self._entries and self._body_bytes + nbytes > self.max_shard_bytes:
                self._finish_shard()
            if self._body is None:
                self._body = open(self.tmp / f"body-{len(self._shards):05d}.bin", "w+b")  # noqa: SIM115
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise TypeError(f"tensor {name!r}: a chunk has dtype {chunk.dtype}, expected {dtype}")
            c = chunk.detach().cpu().contiguous().view(-1)
            if c.numel():
                self._write(c)
            written += c.numel() * dtype.itemsize
        if written != nbytes:
            raise ValueError(f"tensor {name!r}: chunks hold {written} bytes, shape {list(shape)} needs {nbytes}")
        self._entries[name] = (_CODES[dtype], shape, self._body_bytes, self._body_bytes + nbytes)
        self._body_bytes += nbytes
        self._names.add(name)
        self.total_size += nbytes
        if self._plan is not None and len(self._entries) == len(self._planned_entries):
            self._finish_shard()

    #: Chunks a caller's tensors may still be in use for after add_chunks() returned (queued, or being written):
    #: a caller reusing output buffers needs ``PENDING + 1`` of them.
    PENDING = 3

    def _write(self, flat: torch.Tensor) -> None:
        """Queue ``flat``'s bytes for the open file; a helper thread writes them while the caller computes the
        next chunk (at most :attr:`PENDING` chunks wait, so memory stays bounded)."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.PENDING - 1)
            self._thread = threading.Thread(target=self._write_queued, name="lifelong-delta-writer", daemon=True)
            self._thread.start()
        self._check_write_error()
        self._queue.put((self._body, flat))

    def _write_queued(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._write_error is None:
                    f, flat = item
                    f.write(memoryview(flat.view(torch.uint8).numpy()))
            except BaseException as e:  # raised in the caller's thread by _check_write_error
                self._write_error = e
            finally:
                self._queue.task_done()

    def _check_write_error(self) -> None:
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            if isinstance(error, OSError):
                raise CheckpointError(f"cannot write output in {self.tmp}: {error.strerror or error}") from None
            raise error

    def _drain(self) -> None:
        """Wait until every queued chunk is written (and raise a write error)."""
        if self._thread is not None:
            self._queue.join()
        self._check_write_error()

    def _stop_writer(self) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _finish_shard(self) -> None:
        assert self._body is not None
        self._drain()
        if self._plan is not None:  # the header went first; the data is in place
            path = Path(self._body.name)
            self._body.close()
        else:
            path = self.tmp / f"shard-{len(self._shards):05d}.safetensors"
            with open(path, "wb") as f:
                f.write(self._header(self._entries))
                _copy_body(self._body, f, self._body_bytes)
            body_path = Path(self._body.name)
            self._body.close()
            body_path.unlink()
        self._shards.append((path, list(self._entries)))
        self._body, self._entries, self._body_bytes = None, {}, 0

    def commit(self, copy_files_from: str | os.PathLike[str] | None = None) -> Path:
        """Close the last shard, write the index, copy non-weight files and move everything to ``out``.

        Returns:
            The output directory.
        """
        if self._done:
            raise RuntimeError("ShardedWriter.commit() called twice")
        self._drain()
        if self._next:
            raise ValueError(f"{len(self._next)} tensor(s) of the layout were never added, e.g. {self._next[-1]!r}")
        if self._plan is not None and not self._shards:  # an empty layout
            self._plan = None
        if self._entries or not self._shards:
            if self._body is None:  # an empty checkpoint still gets a valid (empty) file
                self._body = open(self.tmp / "body-empty.bin", "w+b")  # noqa: SIM115
            self._finish_shard()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, (path, names) in enumerate(self._shards, start=1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                path.rename(self.tmp / fname)
                weight_map.update({name: fname for name in names})
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if copy_files_from is not None:
            copy_non_weight_files(copy_files_from, self.tmp)
        self._stop_writer()
        outputs.commit_dir(self.tmp, self.out, overwrite=self.overwrite, command=self.command, inputs=self.inputs)
        self._done = True
        return self.out

    def abort(self) -> None:
        """Delete everything written so far; ``out`` is left as it was."""
        self._write_error = self._write_error or RuntimeError("aborted")  # the helper drops what is queued
        self._stop_writer()
        if self._body is not None:
            self._body.close()
            self._body = None
        if not self._done:
            outputs.remove_temp_dir(self.tmp)
        self._done = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._done:
            self.abort()
