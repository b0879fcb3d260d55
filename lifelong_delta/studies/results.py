"""What the studies write the same way: a results table as CSV bytes, mean ± std over seeds, and the sentence of a
``summary.md`` that says how many runs the call trained and which command repeats it.

Standard library only; each study formats its own cells and writes the bytes through
:func:`lifelong_delta.outputs.write_file`.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["csv_bytes", "mean_std", "runs_sentence"]


def csv_bytes(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """A CSV file: the header ``columns``, then one line per row of cells, ``\\n`` line ends on every platform."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue().encode()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values`` (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def runs_sentence(trained: int | str, runs: int | str, wall_time_s: float, command: str) -> str:
    """``this call trained 3 of 6 runs in 1.5 min (finished runs are reused). Reproduce: `<command>`.``"""
    return (
        f"this call trained {trained} of {runs} runs in {wall_time_s / 60:.1f} min (finished runs are reused). "
        f"Reproduce: `{command}`."
    )
