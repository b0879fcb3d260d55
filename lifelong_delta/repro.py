"""The command line that repeats a study's call, for the study's summary.

Standard library only, so a study can record its command without importing the CLI (``lifelong_delta.cli``),
which is the layer above the library and imports the studies.
"""

from __future__ import annotations

import inspect
import json
import shlex
from collections.abc import Callable
from typing import Any

__all__ = ["repro_command"]


def repro_command(
    program: str, func: Callable[..., Any], given: dict[str, Any], skip: tuple[str, ...] = (), default: str = ""
) -> str:
    """The command line that repeats a call of ``func`` as ``program``, for a study's summary.

    Only the options in ``given`` that differ from ``func``'s signature defaults appear (``skip`` names options
    that do not change results, e.g. ``progress``); lists are one JSON value, which also carries items that
    start with ``--``. With nothing to pass, ``default`` (e.g. ``make cl-eval``) is returned if given.
    """

    def norm(value: Any) -> Any:  # a tuple default equals the list the CLI passes
        return list(value) if isinstance(value, tuple) else value

    defaults = {k: p.default for k, p in inspect.signature(func).parameters.items()}
    parts = [program]
    for key, value in given.items():
        if key in skip or norm(value) == norm(defaults[key]):
            continue
        if isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        else:
            text = "null" if value is None else str(value)
        parts.append(f"--{key.replace('_', '-')} {shlex.quote(text)}")
    return default if default and len(parts) == 1 else " ".join(parts)
