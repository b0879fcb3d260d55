"""A_N, F_N and BWT on hand-made matrices; the JSON + PNG report."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lifelong_delta import outputs
from lifelong_delta.continual.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    label_task_axes,
    plot_accuracy_matrix,
    write_cl_metrics,
)
from lifelong_delta.studies import cl_eval

NAN = float("nan")
# after task 0 / 1 / 2; the upper triangle is unused (0.99 would change F_N and BWT if it were read)
R = [
    [0.60, 0.99, NAN],
    [0.80, 0.80, 0.99],
    [0.50, 0.70, 0.95],
]


def test_average_accuracy_hand_computed():
    assert average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert average_accuracy(R, weights=[100, 200, 100]) == pytest.approx((50 + 140 + 95) / 400)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best before the last task is max(0.60, 0.80) = 0.80 -> 0.30; task 1: 0.80 - 0.70 = 0.10
    assert average_forgetting(R) == pytest.approx((0.30 + 0.10) / 2)


def test_bwt_hand_computed():
    # (0.50 - 0.60) + (0.70 - 0.80)
    assert backward_transfer(R) == pytest.approx(-0.10)


def test_single_task_and_tensor_input():
    assert average_forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)
    t = torch.tensor([[0.9, 0.0], [0.4, 0.8]])
    assert average_forgetting(t) == pytest.approx(0.5)
    assert backward_transfer(np.asarray(t)) == pytest.approx(-0.5)
    assert average_accuracy(t) == pytest.approx(0.6)


def test_partial_stream_uses_rows_trained_so_far():
    partial = [[0.9, None, None], [0.6, 0.8, None]]
    assert average_accuracy(partial) == pytest.approx(0.7)
    assert average_accuracy(partial, weights=[1, 3, 100]) == pytest.approx((0.6 + 2.4) / 4)
    assert average_forgetting(partial) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "bad, match",
    [([[0.1, 0.2], [0.3]], "rectangular"), ([[0.1], [0.2]], "more rows"), ([[NAN, 0.0], [0.1, 0.2]], "missing")],
)
def test_bad_matrices(bad, match):
    with pytest.raises(ValueError, match=match):
        average_accuracy(bad)


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        average_accuracy(R, weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        average_accuracy(R, weights=[-1, 2, 1])


def test_write_cl_metrics(tmp_path):
    out = write_cl_metrics(R, tmp_path / "logs", weights=[1, 1, 1], extra={"class_order": [3, 1, 2]})
    assert out == tmp_path / "logs" / "cl_metrics.json"
    data = json.loads(out.read_text())
    assert data["accuracy_matrix"][0][2] is None
    assert data["accuracy_matrix"][1] == [0.8, 0.8, 0.99]
    assert data["average_accuracy"] == pytest.approx(average_accuracy(R))
    assert data["forgetting"] == pytest.approx(0.2)
    assert data["bwt"] == pytest.approx(-0.1)
    assert data["class_order"] == [3, 1, 2]
    png = tmp_path / "logs" / "accuracy_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["accuracy_matrix.png", "cl_metrics.json"]
    with pytest.raises(ValueError, match="overwrite"):
        write_cl_metrics(R, tmp_path, extra={"bwt": 0})


def test_plot_percent_matrix(tmp_path):
    path = plot_accuracy_matrix([[95.0, math.nan], [80.0, 90.0]], tmp_path / "m.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("tasks", [2, 3])
def test_both_heat_maps_tick_the_integer_task_indices(tasks, monkeypatch, tmp_path):
    """Left to matplotlib, a 2 x 2 matrix gets ticks at -0.5, -0.25, ..., 1.5; they must be the tasks 0..T-1."""
    figures = {}
    monkeypatch.setattr(outputs, "write_png", lambda path, fig, dpi=110: figures.__setitem__(path.name, fig))
    matrix = [[0.9 if j <= i else None for j in range(tasks)] for i in range(tasks)]
    rows = [{"method": m, "seed": 0, "average_accuracy": 0.5, "forgetting": 0.1, "bwt": -0.1} for m in ("ft", "l2")]
    cl_eval._plot(rows, {"ft": [matrix], "l2": [matrix, matrix]}, tmp_path, "tiny")
    axes = [ax for ax in figures["accuracy_matrices.png"].axes if ax.get_images()]
    assert len(axes) == 2

    single = Figure()  # the per-run plot's axes go through the same function
    ax = single.add_subplot(1, 1, 1)
    ax.imshow(np.zeros((tasks, tasks)))
    label_task_axes(ax, tasks, tasks, "after training task i", "evaluated on task j")
    for ax in [*axes, single.axes[0]]:
        assert list(ax.get_xticks()) == list(range(tasks)) and list(ax.get_yticks()) == list(range(tasks))
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(j) for j in range(tasks)]
