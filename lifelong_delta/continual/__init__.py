"""Rehearsal-free class-incremental learning (Smith et al., https://arxiv.org/abs/2203.17269).

Layer 3 (Lightning glue): :class:`ContinualModule` and :class:`ClassIncrementalDataModule`; layer 1 (pure
functions): ``heads``, ``distill``, ``metrics``. The Lightning classes are imported lazily, so
``import lifelong_delta.continual.heads`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lifelong_delta.continual.data import ClassIncrementalDataModule
    from lifelong_delta.continual.module import ContinualModule
    from lifelong_delta.continual.pretrain import pretrain

__all__ = ["ClassIncrementalDataModule", "ContinualModule", "pretrain"]

_LAZY = {
    "ClassIncrementalDataModule": "lifelong_delta.continual.data",
    "ContinualModule": "lifelong_delta.continual.module",
    "pretrain": "lifelong_delta.continual.pretrain",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
