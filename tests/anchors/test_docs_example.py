"""The MAS-style anchor in docs/anchors.md runs as written and computes what it claims (brute force)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

DOC = Path(__file__).resolve().parents[2] / "docs" / "anchors.md"


@pytest.fixture(scope="module")
def mas_cls():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/anchors.md should hold exactly one python example"
    code = blocks[0]
    class_lines = code[code.index("class MASAnchor") :].rstrip().splitlines()
    assert len(class_lines) <= 30, f"the example subclass has {len(class_lines)} lines; the docs promise <= 30"
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["MASAnchor"]


def model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(6, 4), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    return model, batches


def brute_mas(model, names, batches):
    """Per-batch loop with a different formula: ‖f‖² = Σ_i Σ_c f_ic², mean over samples, via .backward()."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for x, _ in batches:
        model.zero_grad()
        out = model(x)
        (sum((out[i] ** 2).sum() for i in range(len(x))) / len(x)).backward()
        for n in names:
            total[n] += params[n].grad.abs()
    model.zero_grad()
    return {n: t / len(batches) for n, t in total.items()}


def test_mas_importance_matches_brute_force_and_averages_tasks(mas_cls):
    model, batches = model_and_batches()
    anchor = mas_cls(include=["0.*", "2.weight"], strength=2.0)
    anchor.snapshot_(model, batches=batches)
    want = brute_mas(model, ["0.weight", "0.bias", "2.weight"], batches)
    assert set(anchor.importance) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(anchor.importance[n], w)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    second = brute_mas(model, list(want), batches[:2])
    anchor.snapshot_(model, batches=batches[:2])
    for n in want:
        torch.testing.assert_close(anchor.importance[n], (want[n] + second[n]) / 2)


def test_mas_penalty_uses_the_importance(mas_cls):
    model, batches = model_and_batches()
    anchor = mas_cls(include=["2.weight"])
    anchor.snapshot_(model, batches=batches)
    ref = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight.add_(torch.randn_like(ref))
    hand = (anchor.importance["2.weight"] * (model[2].weight - ref) ** 2).sum()
    torch.testing.assert_close(anchor.penalty(model), hand.detach())
