"""EWCAnchor: penalty by hand, online / sum accumulation, growth, state round trip, options."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lifelong_delta.anchors import EWCAnchor
from lifelong_delta.anchors.fisher import diagonal_fisher


def tiny(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


def batches(seed: int, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, classes, (6,), generator=g)) for _ in range(2)]


def perturb_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_ewc_penalty_matches_hand_computation():
    model, data = tiny(), batches(0)
    anchor = EWCAnchor(include=["2.*"], label="argmax", estimator="batch")
    anchor.snapshot_(model, batches=data, head="bce")
    fisher = diagonal_fisher(model, ["2.weight", "2.bias"], data, head="bce", label="argmax", estimator="batch")
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb_(model)
    params = dict(model.named_parameters())
    hand = sum((fisher[n] * (params[n] - ref[n]) ** 2).sum() for n in fisher)
    torch.testing.assert_close(anchor.penalty(model), hand.detach())
    anchor.penalty(model).backward()
    torch.testing.assert_close(
        params["2.bias"].grad, (2 * fisher["2.bias"] * (params["2.bias"] - ref["2.bias"])).detach()
    )


@pytest.mark.parametrize("accumulate, gamma", [("online", 0.7), ("online", 0.0), ("sum", 1.0)])
def test_accumulation_over_three_tasks(accumulate, gamma):
    model = tiny()
    anchor = EWCAnchor(include=["0.weight"], accumulate=accumulate, gamma=gamma)
    expected = None
    for task in range(3):
        perturb_(model)
        data = batches(task)
        f = diagonal_fisher(model, ["0.weight"], data)["0.weight"]
        expected = f if expected is None else gamma * expected + f
        anchor.snapshot_(model, batches=data)
        torch.testing.assert_close(anchor.importance["0.weight"], expected)
    assert anchor.num_snapshots == 3


def test_accumulation_with_grown_head_pads_old_importance_with_zeros():
    model = tiny(out=3)
    anchor = EWCAnchor(include=["2.*"], accumulate="online", gamma=0.5)
    anchor.snapshot_(model, batches=batches(0))
    old = anchor.importance["2.weight"].clone()
    bigger = nn.Linear(5, 5)
    with torch.no_grad():
        bigger.weight[:3], bigger.bias[:3] = model[2].weight, model[2].bias
    model[2] = bigger
    data = batches(1, classes=5)
    new = diagonal_fisher(model, ["2.weight"], data)["2.weight"]
    anchor.snapshot_(model, batches=data)
    got = anchor.importance["2.weight"]
    assert got.shape == (5, 5)
    torch.testing.assert_close(got[:3], 0.5 * old + new[:3])
    torch.testing.assert_close(got[3:], new[3:])


def test_accumulation_rejects_shrunk_parameter():
    model = tiny(out=3)
    anchor = EWCAnchor(include=["2.*"])
    anchor.snapshot_(model, batches=batches(0))
    model[2] = nn.Linear(5, 2)
    with pytest.raises(ValueError, match="'2.weight' shrank from \\(3, 5\\) to \\(2, 5\\)"):
        anchor.snapshot_(model, batches=batches(1, classes=2))


def test_sampled_labels_are_reproducible_and_differ_per_snapshot():
    model = tiny()
    a, b = EWCAnchor(label="sampled", seed=3), EWCAnchor(label="sampled", seed=3)
    a.snapshot_(model, batches=batches(0))
    b.snapshot_(model, batches=batches(0))
    assert all(torch.equal(a.importance[n], b.importance[n]) for n in a.importance)
    c = EWCAnchor(label="sampled", seed=4)
    c.snapshot_(model, batches=batches(0))
    assert any(not torch.equal(a.importance[n], c.importance[n]) for n in a.importance)


def test_state_dict_round_trip_restores_identical_penalty():
    model = tiny()
    anchor = EWCAnchor(include=["0.*"], accumulate="online", gamma=0.9, n_samples=8, strength=50.0)
    anchor.snapshot_(model, batches=batches(0))
    perturb_(model)
    anchor.snapshot_(model, batches=batches(1))
    perturb_(model)
    buffer = io.BytesIO()
    torch.save(anchor.state_dict(), buffer)
    buffer.seek(0)
    fresh = EWCAnchor(include=["0.*"], accumulate="online", gamma=0.9, n_samples=8, strength=50.0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.num_snapshots == 2
    assert torch.equal(fresh.penalty(model), anchor.penalty(model))
    # the next consolidation continues identically (same seed stream, same accumulated ω)
    anchor.snapshot_(model, batches=batches(2))
    fresh.snapshot_(model, batches=batches(2))
    assert all(torch.equal(anchor.importance[n], fresh.importance[n]) for n in anchor.importance)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label": "soft"}, "label must be one of"),
        ({"estimator": "exact"}, "estimator must be one of"),
        ({"accumulate": "mean"}, "accumulate must be"),
        ({"accumulate": "online", "gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
        ({"gamma": 0.5}, "only applies with accumulate='online'"),
        ({"n_samples": 0}, "n_samples"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWCAnchor(**kwargs)


def test_seed_must_be_an_integer():
    with pytest.raises(TypeError, match="seed"):
        EWCAnchor(seed=1.5)  # type: ignore[arg-type]


def test_head_error_and_missing_batches():
    with pytest.raises(ValueError, match="head must be one of"):
        EWCAnchor().snapshot_(tiny(), batches=batches(0), head="sigmoid")
    with pytest.raises(ValueError, match="needs batches="):
        EWCAnchor().snapshot_(tiny())


def test_repr_shows_options():
    text = repr(EWCAnchor(include=["head.*"], accumulate="online", gamma=0.9, label="sampled"))
    assert "label='sampled'" in text and "gamma=0.9" in text and "accumulate='online'" in text
