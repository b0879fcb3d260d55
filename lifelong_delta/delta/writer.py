"""The atomic, sharded safetensors writer of the streaming commands (the reader is :mod:`.io`).

:class:`ShardedWriter` streams each tensor's bytes to its shard file as soon as they are added (a helper thread
writes while the caller computes the next chunk). With a layout given up front each byte goes straight into its
final file; without one, a shard's data is staged in a body file and copied behind its header (kernel-side) when the
shard is full. All files go to a temporary directory next to ``out``, which is
renamed into place by :meth:`ShardedWriter.commit`; a killed or failed run leaves nothing at ``out`` (the rules for
outputs and temporary folders are in :mod:`lifelong_delta.outputs`). No torch import: data arrives as raw bytes
(numpy arrays, any buffer) or as torch tensors, which are written as their bytes.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lifelong_delta import outputs
from lifelong_delta.delta.dtypes import dtype_code, itemsize
from lifelong_delta.delta.io import INDEX_FILE, SINGLE_FILE, CheckpointError, copy_non_weight_files, parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedWriter"]


def _chunk_bytes(name: str, chunk: object, code: str) -> memoryview:
    """The bytes of one chunk: a torch tensor of dtype ``code`` (any shape, any device), or a C-contiguous buffer
    holding ``code`` values (a numpy array, ``bytes``, a ``memoryview``)."""
    if hasattr(chunk, "detach"):  # a torch tensor
        import torch

        if dtype_code(chunk.dtype) != code:
            raise TypeError(f"tensor {name!r}: a chunk has dtype {chunk.dtype}, expected {code}")
        flat = chunk.detach().cpu().contiguous().view(-1)
        return memoryview(flat.view(torch.uint8).numpy())
    return memoryview(chunk).cast("B")  # type: ignore[arg-type]


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
        file_name: Name of the file when everything fits one shard.

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
        layout: Sequence[tuple[str, str | torch.dtype, Sequence[int]]] | None = None,
        file_name: str = SINGLE_FILE,
    ) -> None:
        self.out = Path(out_dir)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.inputs = dict(inputs)
        self.command = command
        self.file_name = file_name
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

    def _plan_shards(
        self, layout: Sequence[tuple[str, str | torch.dtype, Sequence[int]]]
    ) -> list[list[tuple[str, str, tuple[int, ...], int, int]]]:
        """Shards as lists of ``(name, code, shape, begin, end)``, by the same rule as the unplanned path."""
        shards: list[list[tuple[str, str, tuple[int, ...], int, int]]] = [[]]
        used, seen = 0, set()
        for name, dtype, shape in layout:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the layout")
            code = _code(name, dtype)
            seen.add(name)
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * itemsize(code)
            if shards[-1] and used + nbytes > self.max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, code, shape, used, used + nbytes))
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
        """Append one torch tensor (its bytes are queued for writing; the caller may free it afterwards)."""
        self.add_chunks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_chunks(
        self, name: str, dtype: str | torch.dtype, shape: Sequence[int] | None, chunks: Iterable[object]
    ) -> None:
        """Append one tensor given as consecutive pieces of its flattened data (each written as it arrives).

        Args:
            name: Tensor name.
            dtype: Its dtype, a safetensors code (``"BF16"``) or a torch dtype; torch chunks must have it.
            shape: Its shape; the chunks must add up to ``prod(shape)`` elements. None (only without a layout): a
                1-D tensor of whatever length the chunks add up to.
            chunks: The pieces, in order: torch tensors (any shapes) or C-contiguous buffers of raw values (numpy
                arrays, ``memoryview``). The writer keeps up to :attr:`PENDING` of them after this returns.
        """
        if self._done:
            raise RuntimeError("ShardedWriter.add() after commit()/abort()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        code = _code(name, dtype)
        if shape is None and self._plan is not None:
            raise ValueError(f"tensor {name!r}: a planned layout needs its shape")
        shape = None if shape is None else tuple(int(s) for s in shape)
        nbytes = None if shape is None else math.prod(shape) * itemsize(code)
        if self._plan is not None:
            if not self._next or self._next[-1] != name:
                expected = f"{self._next[-1]!r}" if self._next else "no more tensors"
                raise ValueError(f"tensor {name!r} is out of the writer's layout order (expected {expected})")
            if self._body is None:
                self._open_planned_shard()
            if self._planned_entries[name][:2] != (code, shape):
                raise ValueError(
                    f"tensor {name!r} has {code} {list(shape)}, but the layout planned "
                    f"{self._planned_entries[name][0]} {list(self._planned_entries[name][1])}"
                )
            self._next.pop()
        else:
            if self._entries and self._body_bytes + (nbytes or 0) > self.max_shard_bytes:
                self._finish_shard()
            if self._body is None:
                self._body = open(self.tmp / f"body-{len(self._shards):05d}.bin", "w+b")  # noqa: SIM115
        written = 0
        for chunk in chunks:
            data = _chunk_bytes(name, chunk, code)
            if len(data):
                self._write(data)
            written += len(data)
        if shape is None:
            if written % itemsize(code):
                raise ValueError(f"tensor {name!r}: chunks hold {written} bytes, not whole {code} values")
            shape, nbytes = (written // itemsize(code),), written
        if written != nbytes:
            raise ValueError(f"tensor {name!r}: chunks hold {written} bytes, shape {list(shape)} needs {nbytes}")
        self._entries[name] = (code, shape, self._body_bytes, self._body_bytes + nbytes)
        self._body_bytes += nbytes
        self._names.add(name)
        self.total_size += nbytes
        if self._plan is not None and len(self._entries) == len(self._planned_entries):
            self._finish_shard()

    #: Chunks a caller's tensors may still be in use for after add_chunks() returned (queued, or being written):
    #: a caller reusing output buffers needs ``PENDING + 1`` of them.
    PENDING = 3

    def _write(self, data: memoryview) -> None:
        """Queue ``data`` for the open file; a helper thread writes them while the caller computes the
        next chunk (at most :attr:`PENDING` chunks wait, so memory stays bounded)."""
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.PENDING - 1)
            thread = threading.Thread(target=self._write_queued, name="lifelong-delta-writer", daemon=True)
            thread.start()  # kept only once started: a signal inside start() leaves no thread for abort() to join
            self._thread = thread
        self._check_write_error()
        self._queue.put((self._body, data))

    def _write_queued(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._write_error is None:
                    f, data = item
                    f.write(data)
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
            self._shards[0][0].rename(self.tmp / self.file_name)
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


def _code(name: str, dtype: object) -> str:
    try:
        return dtype_code(dtype)
    except TypeError:
        raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store") from None
