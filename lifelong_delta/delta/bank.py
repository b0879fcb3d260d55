"""``DeltaBank``: serve several fine-tunes of one base from one model in memory, switched by their packed deltas.

One model holds the base weights. Each pack (``lifelong-delta pack``, :mod:`lifelong_delta.delta.pack`) is read
once into memory as, per tensor, the flat positions it changes and the values ``prune`` wrote there. Activating a
fine-tune stashes the base values at those positions and writes the pack's values over them, in place; reverting
writes the stash back. Only kept entries are touched, and of those only the ones where a pack's value differs from
the base (a fine-tune leaves most word-embedding rows as they were); no second copy of the model is made, and the
reverted base is bit-identical to the original however many switches came before::

    bank = DeltaBank(model)                  # model: the base the packs were made against
    bank.add("trec", "trec.delta")
    bank.add("vader", "vader.delta")
    with bank.use("trec"):
        logits = model(**batch).logits       # prune's output for trec, bit for bit
    bank.activate("vader")                   # or switch and stay
    bank.deactivate()                        # the base again

Tensors a pack stores whole (``copy``: an excluded tensor such as a task head, or a tensor only in the fine-tune)
are swapped in whole when the model has a tensor of that name and shape; the others, e.g. a classifier of another
label count, wait in :meth:`DeltaBank.extra` for the caller to apply.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lifelong_delta.delta import _kernels
from lifelong_delta.delta.dtypes import dtype_name, torch_dtype
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.pack_format import (
    CHUNK,
    DATA_FILE,
    KeptPositions,
    Manifest,
    TensorEntry,
    keep_words,
    read_manifest,
)

__all__ = ["DeltaBank"]


@dataclass(eq=False)
class _Positions:
    """The flat positions that one or more packs keep in a tensor (``kept``, int64) and the ones the bank writes:
    ``index = kept[written]``, where at least one of these packs holds other bits than the base. Packs of one mask
    (DARE packs of one seed and p) share one :class:`_Positions`, so a switch between them writes values only."""

    kept: torch.Tensor
    written: torch.Tensor
    index: torch.Tensor


@dataclass
class _Write:
    """One in-place write of a pack into the model's tensor ``key``: ``values`` go to ``index`` along ``dim`` of
    ``view`` (the flat tensor for element-wise masks, its ``[rows, -1]`` matrix for structural ones); ``index``
    None replaces the whole tensor. An element-wise write's ``positions`` say which of its kept entries it
    writes."""

    key: str
    tensor: torch.Tensor
    view: torch.Tensor
    dim: int
    index: torch.Tensor | None
    values: torch.Tensor
    positions: _Positions | None = None

    def apply_(self) -> torch.Tensor:
        """Write the values into the model's tensor (in place); returns what they replaced."""
        old = self.view.clone() if self.index is None else self.view.index_select(self.dim, self.index)
        self.put_(self.values)
        return old

    def put_(self, src: torch.Tensor) -> None:
        """Write ``src`` (the values, or what :meth:`apply_` returned) at the positions (in place)."""
        view = self.view
        if self.index is None:
            view.copy_(src)
        elif view.dim() == 1:  # scatter_ is 3x faster than index_copy_/index_put_ on CPU
            view.scatter_(0, self.index, src)
        else:
            view.index_copy_(self.dim, self.index, src)

    def same_positions(self, other: _Write) -> bool:
        """Whether ``other`` writes exactly this write's positions (one shared index, or both whole)."""
        return other.key == self.key and other.index is self.index and other.dim == self.dim

    def check(self) -> None:
        """Raises ValueError if the model's tensor no longer lives where :attr:`view` points."""
        if self.view.data_ptr() != self.tensor.data_ptr():
            raise ValueError(
                f"tensor {self.key!r} of the model moved after bank.add (model.to(...) or .data = ...); "
                "make the bank after moving the model"
            )


@dataclass(eq=False)
class _Flat:
    """A pack's element-wise writes into CPU tensors as one call of the compiled kernel
    (:func:`~lifelong_delta.delta._kernels.store_at`) instead of a ``scatter_`` per tensor: the byte address of
    every written entry, write after write (shared by the packs of the same :class:`_Positions`), and the values as
    integers of their width (each write's ``values`` are views into them)."""

    writes: list[_Write]
    keys: frozenset[str]
    addresses: np.ndarray
    values: np.ndarray
    pointers: list[int]  # each write's view.data_ptr() when the addresses were made

    def check(self) -> None:
        """Raises ValueError if a tensor moved (also in place, e.g. a storage resized) since the addresses."""
        for write, pointer in zip(self.writes, self.pointers, strict=True):
            write.check()
            if write.view.data_ptr() != pointer:
                raise ValueError(
                    f"tensor {write.key!r} of the model moved after bank.add (its storage was reallocated); "
                    "make the bank after moving the model"
                )

    def store(self, values: np.ndarray) -> None:
        _kernels.store_at(self.addresses, values, values.itemsize)

    def gather(self) -> np.ndarray:
        out = np.empty_like(self.values)
        _kernels.store_at(self.addresses, out, out.itemsize, gather=True)
        return out


@dataclass
class _Pack:
    writes: dict[str, _Write]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    flat: _Flat | None = None
    flat_ready: bool = False  # flat is built (None: the writes are not for one call)

    def tensors(self) -> list[torch.Tensor | np.ndarray]:
        """What the bank holds for this pack."""
        held: list[torch.Tensor | np.ndarray] = [w.values for w in self.writes.values()]
        held += list(self.extra.values()) + [w.index for w in self.writes.values() if w.index is not None]
        held += [t for w in self.writes.values() if w.positions for t in (w.positions.kept, w.positions.written)]
        return held + ([self.flat.addresses] if self.flat else [])


class DeltaBank:
    """Several fine-tunes of one base, served from one model by applying and reverting their packed deltas in place.

    The model must hold the base the packs were made against (checked per tensor with the pack's CRC-32 of the base
    bytes); its weights must change only through the bank while packs are in it (the base CRCs are computed once),
    and it must not move to another device or dtype after :meth:`add`. The bank is meant for inference: switching
    writes the parameters under ``torch.no_grad()``, not thread-safely.

    The active model holds ``lifelong-delta unpack``'s output bit for bit when its tensors have the pack's dtypes.
    Otherwise the values are cast to the model's dtype at :meth:`add` (the base's CRC is checked on the model's
    tensor cast to the base's dtype): a bf16 pack on its bf16 base loaded in fp32 gives unpack's output in fp32;
    a fine-tune saved in another dtype than its base differs from unpack's output at the unchanged entries, which
    keep the model's base values. The reverted base is bit-identical in every case.

    Memory: the base plus, per pack, its kept values and their positions (int64, the index type of ``scatter_``,
    which a switch would otherwise convert each time, and one byte per kept entry saying whether it is written; a
    structural pack keeps only its row or column numbers) and its whole tensors, plus the base values under the
    active pack. Nothing else is copied. Packs whose positions agree share them: DARE packs of one seed (the
    default) keep the same entries of every tensor, so the bank holds their positions once, and switching between
    them writes the new values over the old in one pass, the stashed base values staying put. A kept entry where
    every pack sharing it holds the base's bits (a word-embedding row no fine-tuning text used, with weight decay 0)
    is never written, and its values are not held.

    Args:
        model: The base model (any ``torch.nn.Module``); its ``state_dict(keep_vars=True)`` names the tensors.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._packs: dict[str, _Pack] = {}
        self._active: str | None = None
        self._applied: dict[str, tuple[_Write, torch.Tensor]] = {}  # model key -> (write, base values it replaced)
        self._flat_applied: tuple[_Flat, np.ndarray] | None = None  # (flat, base values it replaced)
        self._addresses: dict[tuple[_Positions, ...], np.ndarray] = {}
        self._base_crc: dict[tuple[str, str], int] = {}

    @property
    def active(self) -> str | None:
        """The name of the active fine-tune, or None when the model holds the base."""
        return self._active

    @property
    def names(self) -> list[str]:
        """The names of the packs in the bank, in the order they were added."""
        return list(self._packs)

    def __contains__(self, name: object) -> bool:
        return name in self._packs

    def add(self, name: str, path: str | os.PathLike[str]) -> None:
        """Read a pack into the bank under ``name`` (the model is left as it was).

        Raises:
            ValueError: ``name`` is taken, ``path`` is not a pack, or the model is not the pack's base (one line
                naming the tensor).
        """
        if name in self._packs:
            raise ValueError(f"the bank already has a pack named {name!r}; remove it first or add under another name")
        manifest = read_manifest(path)
        with self._base_state():
            pack = _load(Path(path), manifest, self.model.state_dict(keep_vars=True), self._base_crc)
            for write in pack.writes.values():
                self._share(write)
            for other in self._packs.values():  # values may have moved to new tensors: build the calls again
                other.flat, other.flat_ready = None, False
            self._addresses.clear()
        self._packs[name] = pack

    def remove(self, name: str) -> None:
        """Drop a pack from the bank (reverting the model first if it is active)."""
        self._pack(name)
        if self._active == name:
            self.deactivate()
        del self._packs[name]
        used = {id(p.flat.addresses) for p in self._packs.values() if p.flat is not None}
        self._addresses = {g: a for g, a in self._addresses.items() if id(a) in used}

    @torch.no_grad()
    def activate(self, name: str) -> None:
        """Make the model the fine-tune ``name``, in place: revert the active pack's entries, then write ``name``'s
        kept entries and whole tensors (where both write the same positions, only the values are written). A
        no-op if ``name`` is active; on an error the model is left at the base."""
        pack = self._pack(name)
        if self._active == name:
            return
        flat = self._flat(pack)
        self._check(pack)
        try:
            if self._flat_applied is not None and (
                flat is None or flat.addresses is not self._flat_applied[0].addresses
            ):
                self._flat_applied[0].store(self._flat_applied[1])
                self._flat_applied = None
            for key in reversed(list(self._applied)):
                write, old = self._applied[key]
                if (
                    key not in pack.writes
                    or (flat is not None and key in flat.keys)
                    or not write.same_positions(pack.writes[key])
                ):
                    write.put_(old)
                    del self._applied[key]
            if flat is not None:
                stash = self._flat_applied[1] if self._flat_applied is not None else flat.gather()
                flat.store(flat.values)
                self._flat_applied = (flat, stash)
            for key, write in pack.writes.items():
                if flat is not None and key in flat.keys:
                    continue
                if key in self._applied:
                    write.put_(write.values)
                    self._applied[key] = (write, self._applied[key][1])
                else:
                    self._applied[key] = (write, write.apply_())
        except BaseException:
            self.deactivate()
            raise
        self._active = name

    @torch.no_grad()
    def deactivate(self) -> None:
        """Write the base values back under the active pack, in place (a no-op when none is active)."""
        self._check()
        if self._flat_applied is not None:
            self._flat_applied[0].store(self._flat_applied[1])
        for write, old in reversed(self._applied.values()):
            write.put_(old)
        self._active, self._applied, self._flat_applied = None, {}, None

    def _check(self, pack: _Pack | None = None) -> None:
        """Raises ValueError if a tensor that the applied writes or ``pack``'s writes go to has moved."""
        for write, _ in self._applied.values():
            write.check()
        if self._flat_applied is not None:
            self._flat_applied[0].check()
        if pack is None:
            return
        for write in pack.writes.values():
            if pack.flat is None or write.key not in pack.flat.keys:  # the flat checks its own writes
                write.check()
        if pack.flat is not None:
            pack.flat.check()

    def _flat(self, pack: _Pack) -> _Flat | None:
        """``pack``'s element-wise writes as one call, built on first use; None when the compiled kernel is off
        (LIFELONG_DELTA_BACKEND=torch, or not built), or they are not all CPU tensors of one width."""
        if pack.flat_ready:
            return pack.flat
        pack.flat_ready = True
        writes = [w for w in pack.writes.values() if w.positions is not None]
        widths = {w.values.element_size() for w in writes}
        if not writes or not _kernels.use_words() or any(w.view.device.type != "cpu" for w in writes):
            return None
        if len(widths) != 1 or not widths <= {2, 4, 8}:
            return None
        groups = tuple(w.positions for w in writes if w.positions is not None)
        if groups not in self._addresses:
            self._addresses[groups] = np.concatenate(
                [(w.view.data_ptr() + w.index.cpu() * w.view.element_size()).numpy() for w in writes]
            )
        as_int = _INT_OF_WIDTH[widths.pop()]
        values = torch.cat([w.values.view(as_int) for w in writes])
        offset = 0
        for w in writes:
            w.values = values[offset : offset + w.values.numel()].view(w.values.dtype)
            offset += w.values.numel()
        pack.flat = _Flat(
            writes,
            frozenset(w.key for w in writes),
            self._addresses[groups],
            values.numpy(),
            [w.view.data_ptr() for w in writes],
        )
        return pack.flat

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[torch.nn.Module]:
        """Activate ``name`` for a ``with`` block, then restore what was active before (also on an exception).

        Yields:
            The model.
        """
        previous = self._active
        self.activate(name)
        try:
            yield self.model
        finally:
            if previous is None:
                self.deactivate()
            else:
                self.activate(previous)

    def extra(self, name: str) -> dict[str, torch.Tensor]:
        """The whole tensors of pack ``name`` that the model has no place for (no tensor of that name, or another
        shape: e.g. ``classifier.weight`` of another label count), by the fine-tune's names, on the model's
        device. Not copies: do not modify them."""
        return dict(self._pack(name).extra)

    def nbytes(self, name: str | None = None) -> int:
        """Bytes the bank holds for pack ``name`` (kept values, their positions, whole tensors), or for all packs
        (positions shared between packs counted once)."""
        packs = self._packs.values() if name is None else [self._pack(name)]
        held = {id(t): t for pack in packs for t in pack.tensors()}
        return sum(t.nbytes for t in held.values())

    def write_bytes(self, name: str) -> int:
        """Bytes of values that activating ``name`` from the base writes into the model: its kept entries where it,
        or a pack sharing its positions, differs from the base, and the whole tensors it swaps in."""
        return sum(w.values.nbytes for w in self._pack(name).writes.values())

    def _pack(self, name: str) -> _Pack:
        try:
            return self._packs[name]
        except KeyError:
            known = ", ".join(self._packs) or "none; add one with bank.add(name, path)"
            raise ValueError(f"the bank has no pack named {name!r} (it has {known})") from None

    def _share(self, write: _Write) -> None:
        """Point a new write at the positions another pack holds, if it writes the same. An element-wise write
        joins the :class:`_Positions` of its kept entries (made if none has them) and keeps only the values at
        the written ones; where it differs from the base at an entry no earlier pack wrote, that entry is
        written from now on, and the earlier packs' values there (the base's) are filled in. Runs with the
        model at the base."""
        if write.index is None:
            return
        others = [
            o
            for p in self._packs.values()
            if (o := p.writes.get(write.key)) is not None and o.dim == write.dim and o.view.shape == write.view.shape
        ]
        if write.view.dim() > 1:
            for other in others:
                if other.index is not None and _equal(other.index, write.index):
                    write.index = other.index
                    return
            return
        base = write.view.index_select(0, write.index)
        differs = _bits(write.values) != _bits(base)
        group = next((o.positions for o in others if o.positions and _equal(o.positions.kept, write.index)), None)
        if group is None:
            group = _Positions(write.index, differs, _subset(write.index, differs))
        elif bool((differs & ~group.written).any()):
            written = group.written | differs
            for other in others:
                if other.positions is group:
                    full = base.clone()
                    full[group.written] = other.values
                    other.values = full[written]
            group.written, group.index = written, _subset(group.kept, written)
            for other in others:
                if other.positions is group:
                    other.index = group.index
        write.positions, write.index, write.values = group, group.index, write.values[group.written]

    @contextlib.contextmanager
    def _base_state(self) -> Iterator[None]:
        previous = self._active
        self.deactivate()
        try:
            yield
        finally:
            if previous is not None:
                self.activate(previous)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _subset(kept: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """``kept[written]``; ``kept`` itself when every entry is written (held once)."""
    return kept if bool(written.all()) else kept[written]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as integers of its width, so that comparing tells bit patterns apart (-0.0 from 0.0, NaNs)."""
    return tensor.view(_INT_OF_WIDTH[tensor.element_size()])


def _crc32(tensor: torch.Tensor, code: str) -> int:
    """CRC-32 of the bytes of ``tensor`` as dtype ``code`` (cast first if it has another dtype)."""
    data = tensor.detach()
    if data.dtype != torch_dtype(code):
        data = data.to(torch_dtype(code))
    return zlib.crc32(data.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def _model_key(entry: TensorEntry, tensors: Mapping[str, torch.Tensor], prefix: tuple[str, str] | None) -> str | None:
    """The model's name of a pack tensor: its base name, its fine-tuned name, or (for whole tensors, which have
    no base name) the fine-tuned name mapped through the pack's prefix ``(fine-tuned, base)``, e.g. ``bert.``."""
    for key in (entry.base_name, entry.name):
        if key is not None and key in tensors:
            return key
    if prefix is not None and entry.name.startswith(prefix[0]):
        key = prefix[1] + entry.name[len(prefix[0]) :]
        return key if key in tensors else None
    return None


def _prefix(manifest: Manifest) -> tuple[str, str] | None:
    """``(fine-tuned prefix, base prefix)`` of the pack's name mapping (``("bert.", "")``), or None."""
    for e in manifest.tensors:
        if e.base_name is not None and e.base_name != e.name:
            if e.name.endswith(e.base_name):
                return e.name[: len(e.name) - len(e.base_name)], ""
            if e.base_name.endswith(e.name):
                return "", e.base_name[: len(e.base_name) - len(e.name)]
    return None


def _load(
    path: Path, manifest: Manifest, tensors: Mapping[str, torch.Tensor], base_crc: dict[tuple[str, str], int]
) -> _Pack:
    """The writes and extra tensors of one pack, checked against the model's (base) tensors."""
    hint = f"{path} was not packed against this model"
    pack = _Pack({})
    prefix = _prefix(manifest)
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    with CheckpointReader(path / DATA_FILE) as rd:
        for e in manifest.tensors:
            key = _model_key(e, tensors, prefix)
            if e.kind == "copy":
                _add_whole(pack, e, rd.get(f"tensor/{e.name}"), key, None if key is None else tensors[key], device)
                continue
            assert e.base_name is not None and e.base_dtype is not None
            if key is None:
                raise ValueError(f"{hint}: it has no tensor {e.base_name!r}")
            tensor = tensors[key]
            if list(tensor.shape) != e.shape or not tensor.is_floating_point():
                raise ValueError(
                    f"{hint}: tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')} "
                    f"{list(tensor.shape)}, the pack's base had {dtype_name(e.base_dtype)} {e.shape}"
                )
            if (key, e.base_dtype) not in base_crc:
                base_crc[key, e.base_dtype] = _crc32(tensor, e.base_dtype)
            if base_crc[key, e.base_dtype] != e.base_crc32:
                raise ValueError(f"{hint}: tensor {key!r} has other values")
            if e.kind != "base" and e.kept:
                pack.writes[key] = _sparse_write(e, key, tensor, rd, manifest)
    shared: dict[int, str] = {}
    for key, write in pack.writes.items():
        other = shared.setdefault(write.tensor.untyped_storage().data_ptr(), key)
        if other != key:
            raise ValueError(
                f"{path} writes both {other!r} and {key!r}, which share memory in the model (tied "
                "weights); the bank cannot apply both"
            )
    return pack


def _view(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A view of the model's tensor, detached from autograd, that the bank writes through."""
    if not tensor.is_contiguous():
        raise ValueError(f"tensor {key!r} of the model is not contiguous; the bank writes flat positions")
    return tensor.detach().view(shape)


def _add_whole(
    pack: _Pack,
    entry: TensorEntry,
    value: torch.Tensor,
    key: str | None,
    tensor: torch.Tensor | None,
    device: torch.device,
) -> None:
    """A whole tensor of the pack: swapped into the model's tensor ``key`` of the same shape (skipped if it holds
    the same bytes), or kept aside as an extra on ``device``."""
    if (
        key is None
        or tensor is None
        or value.shape != tensor.shape
        or (value.dtype != tensor.dtype and not (value.is_floating_point() and tensor.is_floating_point()))
    ):
        pack.extra[entry.name] = value.to(device)
        return
    value = value.to(device=tensor.device, dtype=tensor.dtype)
    if not torch.equal(value.reshape(-1).view(torch.uint8), tensor.detach().reshape(-1).view(torch.uint8)):
        pack.writes[key] = _Write(key, tensor, _view(key, tensor, tuple(tensor.shape)), 0, None, value)


def _sparse_write(
    entry: TensorEntry, key: str, tensor: torch.Tensor, rd: CheckpointReader, manifest: Manifest
) -> _Write:
    """The write of one pruned tensor into the model's tensor ``key``: the flat positions (or rows / columns) of
    its kept values, and the values, on the tensor's device in its dtype."""
    numel = math.prod(entry.shape)
    values = rd.get(f"values/{entry.name}")
    if entry.kind in ("rows", "columns"):
        rows = entry.shape[0]
        shape: tuple[int, ...] = (rows, numel // rows if rows else 0)
        dim = 0 if entry.kind == "rows" else 1
        index = torch.from_numpy(rd.get(f"index/{entry.name}").numpy().astype(np.int64))
        values = values.reshape((len(index), shape[1]) if dim == 0 else (rows, len(index)))
    else:
        shape, dim = (numel,), 0
        if entry.kind == "mask":
            spec = manifest.spec()
            found = [
                np.flatnonzero(keep_words(min(CHUNK, numel - start), spec, entry.name, start)) + start
                for start in range(0, numel, CHUNK)
            ]
            flat = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        else:
            flat = KeptPositions(rd, f"index/{entry.name}").take(numel)
        if len(flat) != values.numel():
            raise ValueError(
                f"tensor {entry.name!r}: the pack holds {values.numel()} values, its mask keeps {len(flat)}"
            )
        index = torch.from_numpy(flat.astype(np.int64))
    return _Write(
        key,
        tensor,
        _view(key, tensor, shape),
        dim,
        index.to(tensor.device),
        values.to(device=tensor.device, dtype=tensor.dtype),
    )
