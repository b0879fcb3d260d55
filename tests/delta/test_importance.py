"""Magnitude / WANDA delta pruning against brute-force sorts; calibration statistics via hooks."""

import pytest
import torch
from torch import nn

from lifelong_delta.delta.importance import collect_input_stats, importance_prune, n_keep


def _brute_row_topk(scores_row, k):
    order = sorted(range(len(scores_row)), key=lambda j: -scores_row[j])
    return set(order[:k])


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_keeps_exactly_the_top_k_of_each_row(p, score):
    torch.manual_seed(1)
    d = torch.randn(7, 13)
    norms = torch.rand(13) * 3
    out = importance_prune(d, p, score=score, input_norms=norms if score == "wanda" else None)
    k = n_keep(13, p)
    scores = d.abs() * (norms if score == "wanda" else 1.0)
    for i in range(7):
        kept = {j for j in range(13) if out[i, j] != 0}
        assert kept == _brute_row_topk(scores[i].tolist(), k), (i, kept)
        for j in kept:
            assert out[i, j] == d[i, j]  # rescale="none" keeps values


def test_wanda_differs_from_magnitude_when_norms_matter():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])
    mag = importance_prune(d, 0.5, score="magnitude")
    assert torch.equal(mag != 0, torch.tensor([[False, False, True, True]]))
    assert torch.equal(
        importance_prune(d, 0.5, score="wanda", input_norms=norms) != 0, torch.tensor([[True, False, False, True]])
    )


def test_one_d_uses_global_magnitude_and_nd_uses_rows():
    b = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0])
    out = importance_prune(b, 0.5, score="wanda")  # wanda falls back to magnitude for 1-D
    assert torch.equal(out != 0, torch.tensor([False, True, True, True, False, False]))
    conv = torch.randn(4, 3, 2, 2)
    out = importance_prune(conv, 0.75, score="magnitude")
    assert out.shape == conv.shape and ((out != 0).view(4, -1).sum(1) == 3).all()


def test_rescale_options():
    d = torch.randn(5, 10)
    base = importance_prune(d, 0.6)
    assert torch.allclose(importance_prune(d, 0.6, rescale="dare"), base / 0.4)
    assert torch.allclose(importance_prune(d, 0.6, rescale="q", q=0.8), base / 0.8)
    assert importance_prune(d.to(torch.bfloat16), 0.6).dtype == torch.float32


def test_errors():
    d = torch.randn(3, 4)
    with pytest.raises(ValueError, match="wanda' needs input_norms for tensor 'x'"):
        importance_prune(d, 0.5, score="wanda", name="x")
    with pytest.raises(ValueError, match="input_norms for tensor 'x' has shape"):
        importance_prune(d, 0.5, score="wanda", input_norms=torch.ones(3), name="x")
    with pytest.raises(ValueError, match="rescale='q' needs q"):
        importance_prune(d, 0.5, rescale="q")
    with pytest.raises(ValueError, match="rescale='half'"):
        importance_prune(d, 0.5, rescale="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score='l1'"):
        importance_prune(d, 0.5, score="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p=1.0 is outside"):
        importance_prune(d, 1.0)
    with pytest.raises(ValueError, match="'x'.*non-finite"):
        importance_prune(torch.tensor([1.0, float("inf")]), 0.5, name="x")


def test_collect_input_stats_matches_manual_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    batches = [torch.randn(4, 2, 3), torch.randn(6, 2, 3)]  # leading dims are tokens
    stats = collect_input_stats(model, batches)
    assert set(stats) == {"0.weight", "2.weight"}
    x0 = torch.cat([b.reshape(-1, 3) for b in batches])
    x2 = torch.relu(model[0](x0)).detach()
    assert stats["0.weight"].count == 20
    assert torch.allclose(stats["0.weight"].mean, x0.mean(0), atol=1e-6)
    assert torch.allclose(stats["0.weight"].norm, x0.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats["2.weight"].mean, x2.mean(0), atol=1e-6)
    assert not model[0]._forward_hooks  # hooks removed
    only = collect_input_stats(model, batches, forward_fn=lambda m, b: m(b), names=["2.weight"])
    assert set(only) == {"2.weight"}
    with pytest.raises(ValueError, match="'1.weight' is not the weight of an nn.Linear"):
        collect_input_stats(model, batches, names=["1.weight"])
    with pytest.raises(ValueError, match="no calibration input"):
        collect_input_stats(model, [])
