"""A study's messages in the terminal and in a log file of its results folder.

``say`` prints a line on stdout and appends it, time-stamped, to the log. ``bar`` is a
:class:`~lifelong_delta.progress.Progress` on stderr (a live bar on a terminal, lines elsewhere) paired with one
that writes a line to the log every ``interval`` seconds, so the log shows how far a long loop got and how fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lifelong_delta.progress import Progress

__all__ = ["StudyLog"]


class StudyLog:
    """Messages of one study run, on the terminal and appended to ``path`` (None: terminal only).

    Args:
        path: the log file; its folder is created.
        enabled: False prints nothing on the terminal (the log file is still written).
        live: draw live bars on a terminal; False prints lines there too (for worker processes, whose bars would
            overwrite each other).
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, enabled: bool = True, live: bool = True) -> None:
        self.enabled, self.live = enabled, live
        self._file: IO[str] | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def say(self, text: str) -> None:
        """Print ``text`` and append it to the log with the time of day."""
        if self.enabled:
            print(text, flush=True)
        if self._file is not None:
            self._file.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self._file.flush()

    def bar(self, label: str, total: float | None, *, unit: str = "") -> _PairedProgress:
        """A progress reporter for the terminal and the log (use it as a context manager)."""
        bars = [Progress(label, total, unit=unit, enabled=self.enabled, live=self.live)]
        if self._file is not None:
            bars.append(Progress(label, total, unit=unit, stream=_Stamped(self._file)))
        return _PairedProgress(bars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StudyLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Stamped:
    """A text stream (not a terminal) that prefixes each line written to ``file`` with the time of day."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file

    def write(self, text: str) -> int:
        if text.strip():
            self.file.write(f"{time.strftime('%H:%M:%S')} {text.rstrip()}\n")
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False


class _PairedProgress:
    """Several :class:`Progress` reporters updated together."""

    def __init__(self, bars: list[Progress]) -> None:
        self.bars = bars

    def update(self, advance: float = 1, *, detail: str | None = None, total: float | None = None) -> None:
        for b in self.bars:
            b.update(advance, detail=detail, total=total)

    def close(self, *, failed: bool = False, detail: str | None = None) -> None:
        for b in self.bars:
            b.close(failed=failed, detail=detail)

    def __enter__(self) -> _PairedProgress:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)
