"""A Hugging Face model's repeated blocks, run from outside the model's own loop.

:class:`~lifelong_delta.delta.layered.LayeredModel` runs a model one stage at a time, so it feeds each block itself,
without code of its own for any architecture. While the outer weights are loaded, each block's ``forward`` is
replaced by a stub that records its arguments (hidden states, attention mask, rotary or relative position tensors)
and passes the hidden states on (:func:`record_calls`). The first block's hidden states are the embeddings; the
other blocks' recorded arguments are reused with the real hidden states of the block before (:meth:`BlockCall.run`).
To finish, the last block's stub returns the final hidden states (:func:`finish_stubs`), and the model's own code
applies its final norm and head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockCall", "find_blocks", "finish_stubs", "record_calls", "stubbed"]

#: ``stub(block index)``: the ``forward`` that replaces that block's.
Stubs = Callable[[int], Callable[..., Any]]


class _Stop(Exception):
    """Raised by the last block's recording stub: the embedding pass has what it needs."""


@dataclass
class BlockCall:
    """The arguments one block was called with; the hidden states are its first argument (or a keyword)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.args:
            return block(hidden, *self.args[1:], **self.kwargs)
        return block(**{**self.kwargs, "hidden_states": hidden})


def find_blocks(model: nn.Module, what: str) -> tuple[nn.ModuleList, str]:
    """The model's repeated blocks: the ``nn.ModuleList`` of one module class holding the most parameters, and its
    path in the model.

    Raises:
        ValueError: the model has no such list (``what`` names the checkpoint).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, path, module)
    if best is None:
        raise ValueError(f"{what}: a {type(model).__name__} has no list of repeated layers to calibrate one at a time")
    return best[2], best[1]


@contextmanager
def stubbed(blocks: nn.ModuleList, stub: Stubs) -> Iterator[None]:
    """Every block's ``forward`` replaced by ``stub(i)`` inside the context."""
    for i, block in enumerate(blocks):
        block.forward = stub(i)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def record_calls(model: nn.Module, blocks: nn.ModuleList, batch: dict[str, torch.Tensor]) -> list[BlockCall]:
    """Run the embedding part on one batch and return the arguments each block was called with.

    Raises:
        ValueError: the model did not call every block once, in order.
    """
    calls: list[BlockCall] = []
    last = len(blocks) - 1

    def stub(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            calls.append(BlockCall(args, kwargs))
            if i == last:
                raise _Stop
            return calls[-1].hidden

        return forward

    with stubbed(blocks, stub):
        try:
            model(**batch)
        except _Stop:
            pass
    if len(calls) != len(blocks):
        raise ValueError(
            f"{type(model).__name__} called {len(calls)} of its {len(blocks)} blocks; "
            "layer-by-layer calibration needs every block called once, in order"
        )
    return calls


def finish_stubs(n_blocks: int, final: torch.Tensor, width: int) -> Stubs:
    """Stubs for the finishing pass: every block passes its input on, the last returns ``final`` (in a tuple of
    ``width`` items, the rest None, where the blocks return tuples; alone for ``width`` 0)."""
    last = n_blocks - 1

    def stub(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if i < last:
                return BlockCall(args, kwargs).hidden
            return (final, *([None] * (width - 1))) if width else final

        return forward

    return stub
