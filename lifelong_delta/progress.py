"""Progress of long work on stderr: a live bar on a terminal, plain lines in a log.

One reporter for every long loop of the library (pruning, statistics, LoRA merges, the studies; the Lightning
callback :class:`~lifelong_delta.callbacks.ProgressLines` builds on it for training). When stderr is a terminal it
draws a live bar with rich (label, bar, done/total, elapsed time, current item). When it is not (CI, ``nohup``,
``make demo | tee log``) a live bar would print nothing until the end, so it prints a line at the first update,
then at most every ``interval`` seconds, and one final line, each flushed::

    pruning: 120/291 tensors, 2.1/5.0 GB (42%), 12 s elapsed, about 17 s left — model.layers.9.mlp.up_proj.weight
    pruning: 291/291 tensors, 5.0/5.0 GB (100%), done in 29 s

The time left is the rate so far applied to the work left, measured in bytes when a byte total is known (tensors
differ hugely in size), else in items. ``LIFELONG_DELTA_PROGRESS_INTERVAL`` (seconds) overrides the default
interval of 10 s.

Imports only the standard library (it is imported by start-up-critical code); rich is imported when a bar is
drawn on a terminal.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

__all__ = [
    "DEFAULT_INTERVAL",
    "INTERVAL_ENV",
    "Progress",
    "format_bytes",
    "format_duration",
    "is_terminal",
    "progress_interval",
    "run_spawned",
]

INTERVAL_ENV = "LIFELONG_DELTA_PROGRESS_INTERVAL"
#: Seconds between two progress lines when stderr is not a terminal.
DEFAULT_INTERVAL = 10.0
_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_interval(interval: float | None = None) -> float:
    """Seconds between progress lines: ``interval``, else ``$LIFELONG_DELTA_PROGRESS_INTERVAL``, else 10.

    Raises:
        ValueError: a negative or non-numeric interval (naming the argument or the environment variable).
    """
    what = "interval"
    if interval is None:
        raw = os.environ.get(INTERVAL_ENV, "").strip()
        if not raw:
            return DEFAULT_INTERVAL
        what = INTERVAL_ENV
        try:
            interval = float(raw)
        except ValueError:
            raise ValueError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds, e.g. 10") from None
    if not (interval >= 0 and math.isfinite(interval)):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {interval!r}")
    return float(interval)


def format_duration(seconds: float) -> str:
    """``"12 s"``, ``"3 min 05 s"``, ``"1 h 02 min"`` (rounded to the second)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _byte_scale(n: float) -> tuple[float, str]:
    k = 0
    while abs(n) >= 1000 and k < len(_BYTE_UNITS) - 1:
        n, k = n / 1000, k + 1
    return 1000.0**k, _BYTE_UNITS[k]


def format_bytes(n: float, total: float | None = None) -> str:
    """A byte count in decimal units (as ``out_shard_size="2GB"``): ``"2.1 GB"``; with ``total``, ``"2.1/5.0 GB"``.

    The unit is that of the larger number; one decimal below 100 of it (none for plain bytes).
    """
    scale, unit = _byte_scale(max(n, total or 0))
    top = max(n, total or 0) / scale
    digits = 1 if unit != "B" and top < 100 else 0
    text = f"{n / scale:.{digits}f}" if total is None else f"{n / scale:.{digits}f}/{total / scale:.{digits}f}"
    return f"{text} {unit}"


def _count(done: float, total: float | None, unit: str) -> str:
    if unit == "B":
        return format_bytes(done, total)

    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:.1f}"

    text = num(done) if total is None else f"{num(done)}/{num(total)}"
    return f"{text} {unit}" if unit else text


class Progress:
    """Progress of one long loop on stderr: a live bar on a terminal, a line every ``interval`` seconds elsewhere.

    Example::

        with Progress("pruning", total=len(names), unit="tensors", total_bytes=size) as bar:
            for name in names:
                bar.update(0, detail=name)      # now working on ``name`` (the first call prints a line)
                ...
                bar.update(1, nbytes=nbytes[name])

    Args:
        label: what is being done, e.g. ``"pruning"``; starts each line.
        total: items to do (``None``: unknown, no percentage or time left).
        unit: name of the items, e.g. ``"tensors"``; ``"B"`` counts bytes and shows them as ``2.1/5.0 GB``.
        total_bytes: optional second measure, the bytes of all items; then the percentage and the time left
            follow the bytes (advance them with ``update(nbytes=...)``).
        enabled: ``False`` prints nothing.
        live: draw a live bar when stderr is a terminal. ``False`` prints lines there too: use it when the loop's
            body draws bars of its own (a Lightning fit), since a terminal shows one live display at a time.
        interval: seconds between two lines (default ``$LIFELONG_DELTA_PROGRESS_INTERVAL`` or 10).
        stream: where to write (default: ``sys.stderr`` at the time of writing).
        clock: the time source, in seconds (tests pass a fake one).

    Raises:
        ValueError: a negative total or interval, or ``total_bytes`` with ``unit="B"``.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "",
        total_bytes: int | None = None,
        enabled: bool = True,
        live: bool = True,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is not None and not total >= 0:
            raise ValueError(f"total must be >= 0 or None, got {total!r}")
        if total_bytes is not None and unit == "B":
            raise ValueError("total_bytes is a second measure in bytes; with unit='B' the total already is one")
        self.label, self.unit = label, unit
        self.total, self.total_bytes = total, total_bytes
        self.completed: float = 0
        self.completed_bytes: int = 0
        self.detail = ""
        self.enabled = enabled
        self.interval = progress_interval(interval)
        self._stream, self._clock = stream, clock
        self._start = clock()
        self._last_line: float | None = None
        self._live = enabled and live and is_terminal(stream)
        self._rich: Any = None
        self._task: Any = None
        self._closed = False

    # ------------------------------------------------------------------ public
    def update(
        self, advance: float = 1, *, nbytes: int = 0, detail: str | None = None, total: float | None = None
    ) -> None:
        """Add ``advance`` items and ``nbytes`` bytes of work done; set the current item and the total if given.

        Prints a line if none was printed yet or the last one is ``interval`` seconds old (not on a terminal).
        """
        self.completed += advance
        self.completed_bytes += nbytes
        if detail is not None:
            self.detail = detail
        if total is not None:
            self.total = total
        if not self.enabled or self._closed:
            return
        if self._live:
            self._draw()
            return
        now = self._clock()
        if self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            self._write(self._line(now))

    def close(self, *, failed: bool = False, detail: str | None = None) -> None:
        """Print the final line or finish the bar.

        The line ends ``done in <elapsed>``, followed by ``detail`` if given (e.g. the final loss); with
        ``failed``, ``stopped after <elapsed>`` followed by the current item (where it stopped).
        """
        if self._closed:
            return
        self._closed = True
        if detail is not None:
            self.detail = detail
        elif not failed:
            self.detail = ""  # the last item says nothing about the whole
        if not self.enabled:
            return
        if self._live:
            self._draw()
            self._rich.stop()
        else:
            self._write(self._line(self._clock(), final="stopped after" if failed else "done in"))

    def fraction(self) -> float | None:
        """Fraction of the work done, in bytes when ``total_bytes`` is known, else in items (None: unknown)."""
        done, total = self._work()
        if total is None or total <= 0:
            return None
        return min(1.0, max(0.0, done / total))

    def seconds_left(self, elapsed: float) -> float | None:
        """The rate so far applied to the work left (None before any work is done or without a total)."""
        done, total = self._work()
        if total is None or done <= 0 or elapsed <= 0:
            return None
        return max(0.0, elapsed * (total - done) / done)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    # ------------------------------------------------------------------ private
    def _line(self, now: float, final: str | None = None) -> str:
        """The line at time ``now``; ``final`` (``"done in"``, ``"stopped after"``) ends it with the elapsed time."""
        elapsed = now - self._start
        text = self._measures()
        fraction = self.fraction()
        if fraction is not None:
            text += f" ({math.floor(100 * fraction + 1e-9):.0f}%)"
        if final is not None:
            text += f", {final} {format_duration(elapsed)}"
        else:
            text += f", {format_duration(elapsed)} elapsed"
            left = self.seconds_left(elapsed)
            if left is not None:
                text += f", about {format_duration(left)} left"
        return f"{self.label}: {text} — {self.detail}" if self.detail else f"{self.label}: {text}"

    def _measures(self) -> str:
        """``"120/291 tensors, 2.1/5.0 GB"``: the items done, and the bytes when ``total_bytes`` is known."""
        text = _count(self.completed, self.total, self.unit)
        if self.total_bytes is not None:
            text += ", " + format_bytes(self.completed_bytes, self.total_bytes)
        return text

    def _work(self) -> tuple[float, float | None]:
        if self.total_bytes is not None:
            return self.completed_bytes, self.total_bytes
        return self.completed, self.total

    def _write(self, text: str) -> None:
        stream = sys.stderr if self._stream is None else self._stream
        print(text, file=stream, flush=True)

    def _draw(self) -> None:
        """Start (on first use) and update the rich bar: label, bar, done/total, elapsed, current item."""
        if self._rich is None:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            console = Console(stderr=True) if self._stream is None else Console(file=self._stream)
            self._rich = RichProgress(
                TextColumn(f"[bold]{escape(self.label)}"),
                BarColumn(),
                TextColumn("{task.fields[measures]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}", markup=False),
                console=console,
                transient=False,
            )
        done, total = self._work()
        fields = {"completed": done, "total": total, "measures": self._measures(), "detail": self.detail}
        if self._task is None:
            self._rich.start()
            self._task = self._rich.add_task(self.label, **fields)
        else:
            self._rich.update(self._task, **fields)


class _QueueBar:
    """The ``update`` of a :class:`Progress`, in a worker process: forwarded to the parent's bar by a queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def update(self, advance: int = 1, *, detail: str | None = None) -> None:
        self.queue.put((advance, detail))


def _spawned_call(fn: Callable[..., Any], args: tuple, threads: int | None, queue: Any) -> Any:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return fn(*args, _QueueBar(queue))


def run_spawned(fn: Callable[..., Any], calls: list[tuple], jobs: int, bar: Any) -> list[Any]:
    """``fn(*args, bar)`` for each ``args`` of ``calls``, in ``jobs`` spawned processes; the results in call order.

    Each worker runs with this process's torch thread count (when torch is loaded), and its ``bar.update`` calls
    reach ``bar`` here. Calls are submitted in the order given (put the longest first); a worker's error is
    raised here. ``fn`` must be importable by name (a module-level function).
    """
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        q = manager.Queue()
        futures = {pool.submit(_spawned_call, fn, args, threads, q): i for i, args in enumerate(calls)}
        pending, results = set(futures), {}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                results[futures[f]] = f.result()  # re-raises a worker's error here
            while True:
                try:
                    n, text = q.get_nowait()
                except queue_mod.Empty:
                    break
                bar.update(n, detail=text)
    return [results[i] for i in range(len(calls))]
