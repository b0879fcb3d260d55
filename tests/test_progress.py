"""``Progress``: lines when stderr is not a terminal (first update, then at most every interval, a final line),
percentages and time left from a fake clock, byte formatting, the rich bar on a terminal, a light import."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from lifelong_delta.progress import (
    DEFAULT_INTERVAL,
    INTERVAL_ENV,
    Progress,
    format_bytes,
    format_duration,
    progress_interval,
)


class Clock:
    """A fake monotonic clock: ``clock.now = 12`` moves time, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_line_at_the_first_update_then_at_most_every_interval_and_a_final_line():
    clock, out = Clock(), io.StringIO()
    with Progress("pruning", 10, unit="tensors", interval=10, stream=out, clock=clock) as bar:
        assert out.getvalue() == ""  # nothing before the first update
        bar.update(0, detail="a")
        assert _lines(out) == ["pruning: 0/10 tensors (0%), 0 s elapsed — a"]
        for t in range(1, 10):  # one update per second: lines at t = 10 only
            clock.now = t
            bar.update(1, detail=f"t{t}")
        assert len(_lines(out)) == 1
        clock.now = 10
        bar.update(0, detail="t10")
        clock.now = 15
        bar.update(1)
    lines = _lines(out)
    assert lines[1] == "pruning: 9/10 tensors (90%), 10 s elapsed, about 1 s left — t10"
    assert lines[2] == "pruning: 10/10 tensors (100%), done in 15 s"
    assert len(lines) == 3


def test_percent_and_time_left_follow_the_bytes_when_known():
    clock, out = Clock(), io.StringIO()
    bar = Progress("pruning", 291, unit="tensors", total_bytes=5_000_000_000, interval=0, stream=out, clock=clock)
    clock.now = 12
    bar.update(120, nbytes=2_100_000_000, detail="model.layers.9.mlp.up_proj.weight")
    # 42 % of the bytes in 12 s: 2.9 GB left at 175 MB/s is 16.6 s; the tensors alone (41 %) would say 17.1 s
    assert _lines(out)[-1] == (
        "pruning: 120/291 tensors, 2.1/5.0 GB (42%), 12 s elapsed, about 17 s left — model.layers.9.mlp.up_proj.weight"
    )
    assert bar.fraction() == pytest.approx(0.42)
    assert bar.seconds_left(12) == pytest.approx(12 * 2.9 / 2.1)
    clock.now = 30
    bar.update(1, nbytes=2_600_000_000)
    assert bar.seconds_left(30) == pytest.approx(30 * 0.3 / 4.7)
    assert "(94%), 30 s elapsed, about 2 s left" in _lines(out)[-1]


def test_items_only_and_bytes_only():
    clock, out = Clock(), io.StringIO()
    with Progress("evals", 4, interval=0, stream=out, clock=clock) as bar:
        clock.now = 60
        bar.update(1)
        clock.now = 200
    with Progress("reading", 5_000_000_000, unit="B", interval=0, stream=out, clock=clock) as bytes_bar:
        clock.now = 210
        bytes_bar.update(0, nbytes=0)
        bytes_bar.update(2_000_000_000)
    assert _lines(out) == [
        "evals: 1/4 (25%), 1 min 00 s elapsed, about 3 min 00 s left",
        "evals: 1/4 (25%), done in 3 min 20 s",
        "reading: 0.0/5.0 GB (0%), 10 s elapsed",
        "reading: 2.0/5.0 GB (40%), 10 s elapsed, about 15 s left",
        "reading: 2.0/5.0 GB (40%), done in 10 s",
    ]


def test_unknown_total_has_no_percent_or_time_left():
    clock, out = Clock(), io.StringIO()
    with Progress("fit", None, unit="steps", interval=0, stream=out, clock=clock) as bar:
        clock.now = 5
        bar.update(3, detail="epoch 1")
    assert _lines(out) == ["fit: 3 steps, 5 s elapsed — epoch 1", "fit: 3 steps, done in 5 s"]


def test_a_failure_ends_with_where_it_stopped():
    clock, out = Clock(), io.StringIO()
    with (
        pytest.raises(RuntimeError),
        Progress("pruning", 3, unit="tensors", interval=0, stream=out, clock=clock) as bar,
    ):
        bar.update(0, detail="w1")
        clock.now = 4
        raise RuntimeError("boom")
    assert _lines(out)[-1] == "pruning: 0/3 tensors (0%), stopped after 4 s — w1"


def test_close_with_a_detail_and_only_once():
    clock, out = Clock(), io.StringIO()
    bar = Progress("fit", 2, unit="steps", interval=0, stream=out, clock=clock)
    bar.update(2, detail="epoch 1/1")
    bar.close(detail="epoch 1/1, loss 0.25")
    bar.close()
    bar.update(1)  # after close: counted, not printed
    assert _lines(out)[-1] == "fit: 2/2 steps (100%), done in 0 s — epoch 1/1, loss 0.25"
    assert len(_lines(out)) == 2


def test_disabled_prints_nothing(capsys):
    clock = Clock()
    with Progress("pruning", 3, unit="tensors", total_bytes=10, enabled=False, clock=clock) as bar:
        for _ in range(3):
            clock.now += 60
            bar.update(1, nbytes=3, detail="x")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert bar.completed == 3 and bar.completed_bytes == 9  # still counted


def test_writes_to_the_current_stderr_by_default(capsys):
    with Progress("stats", 1, unit="tensors", interval=0) as bar:
        bar.update(1, detail="w")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("stats: 1/1 tensors (100%), ") and err[-1].startswith("stats: 1/1 tensors (100%), done")


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval() == DEFAULT_INTERVAL <= 30
    assert progress_interval(2.5) == 2.5
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert progress_interval() == 0.5 and Progress("x").interval == 0.5
    assert progress_interval(3) == 3  # an explicit interval wins
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        Progress("x")
    with pytest.raises(ValueError, match="interval"):
        progress_interval(-1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        Progress("x", -1)
    with pytest.raises(ValueError, match="total_bytes"):
        Progress("x", 10, unit="B", total_bytes=10)


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ((0,), "0 B"),
        ((999,), "999 B"),
        ((1500,), "1.5 kB"),
        ((2_100_000_000,), "2.1 GB"),
        ((120_000_000,), "120 MB"),
        ((512, 900), "512/900 B"),
        ((2_100_000_000, 5_000_000_000), "2.1/5.0 GB"),
        ((45_000_000, 120_000_000), "45/120 MB"),
        ((900_000, 1_200_000), "0.9/1.2 MB"),
        ((3 * 10**15, 4 * 10**15), "3.0/4.0 PB"),
    ],
)
def test_format_bytes(args, text):
    assert format_bytes(*args) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (0.4, "0 s"),
        (12.6, "13 s"),
        (59.4, "59 s"),
        (65, "1 min 05 s"),
        (3599, "59 min 59 s"),
        (3720, "1 h 02 min"),
        (-3, "0 s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_terminal_gets_the_rich_bar_not_lines():
    out = Tty()
    with Progress("pruning", 2, unit="tensors", total_bytes=2000, stream=out) as bar:
        bar.update(0, detail="layer.0.weight")
        bar.update(1, nbytes=1000)
        bar.update(1, nbytes=1000, detail="layer.1.weight")
    text = out.getvalue()
    assert "pruning" in text and "2/2 tensors, 2.0/2.0 kB" in text
    assert "elapsed" not in text and " — " not in text  # no plain lines
    out = Tty()
    with Progress("cl-eval", 2, unit="runs", live=False, interval=0, stream=out) as bar:  # lines on request
        bar.update(1)
    assert out.getvalue().startswith("cl-eval: 1/2 runs (50%), ")


def test_imports_no_torch_rich_or_lightning():
    code = (
        "import json, sys, lifelong_delta.progress; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'rich', 'lightning', "
        "'tqdm', 'numpy'})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []
