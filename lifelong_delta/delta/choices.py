"""The option vocabularies of delta pruning, as ``Literal`` types, and the range rule of ``p`` and ``q``.

Pure Python (no torch): the ``lifelong-delta`` commands build their parsers from these before any heavy import.
:data:`MethodName` names the built-in rows of :data:`lifelong_delta.delta.methods.METHODS` (a test holds them
equal), for type hints; ``--method`` itself is a string checked against the registry when the command runs, so a
method added with :func:`~lifelong_delta.delta.methods.register_method` is accepted too.
"""

from __future__ import annotations

import math
import struct
from typing import Literal

__all__ = ["Arithmetic", "LoraPrune", "MethodName", "QMode", "RescaleName", "resolve_q", "scale_of"]

MethodName = Literal["dare", "darex-q", "magnitude", "wanda", "structural"]
RescaleName = Literal["none", "dare", "q"]
QMode = Literal["grid", "analytic", "unlabelled"]
Arithmetic = Literal["float16", "float64"]
LoraPrune = Literal["product", "factors"]


def _where(name: str | None) -> str:
    return f" (tensor {name!r})" if name else ""


def resolve_q(p: float, q: float | None, *, force: bool = False, name: str | None = None) -> float:
    """Validate ``p`` and ``q`` and return the effective ``q`` (``1 - p`` when ``q is None``).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``; ``q <= 0``; ``q > 1`` or ``q < 1 - p`` unless ``force``.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p={p} is outside [0, 1): p is the drop rate{_where(name)}")
    if q is None:
        return 1.0 - float(p)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not q > 0.0 or q != q:
        raise ValueError(f"q={q} must be > 0: the kept entries are rescaled by 1/q{_where(name)}")
    if not force:
        if q > 1.0:
            raise ValueError(
                f"q={q} is above 1 (it would shrink the kept delta); pass force=True to allow it{_where(name)}"
            )
        if q < (1.0 - p) - 1e-12:
            raise ValueError(
                f"q={q} is below 1-p={1.0 - p:g} (it over-amplifies the kept delta); "
                f"pass force=True to allow it{_where(name)}"
            )
    return float(q)


def scale_of(q: float) -> float:
    """The fp32 rescale factor ``float32(1/q)`` used by every DARE/DAREx-q path (as a Python float)."""
    try:
        return struct.unpack("f", struct.pack("f", 1.0 / q))[0]
    except OverflowError:  # beyond fp32's range, as float32() rounds it
        return math.inf
