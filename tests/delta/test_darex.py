"""DAREx-q: masked delta built once, rescaled per q; grid and unlabelled q selection."""

import pytest
import torch
from torch import nn

from lifelong_delta.delta.dare import dare_merge
from lifelong_delta.delta.darex import MaskedDelta, default_coarse_grid, select_q_grid, select_q_unlabelled


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    base = {
        "a.weight": torch.randn(8, 5).to(dtype),
        "a.bias": torch.randn(8).to(dtype),
        "b.weight": torch.randn(3, 8).to(dtype),
        "steps": torch.tensor(3),
    }
    ft = {
        k: (v.float() + 0.1 * torch.randn(v.shape)).to(dtype) if v.is_floating_point() else v + 1
        for k, v in base.items()
    }
    return base, ft


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_at_one_minus_p_equals_dare_bit_for_bit(dtype):
    base, ft = _pair(dtype)
    p = 0.8
    masked = MaskedDelta.build(base, ft, p, seed=5)
    assert masked.names == ["a.weight", "a.bias", "b.weight"]  # non-floating 'steps' is skipped
    target = {k: v.clone() for k, v in ft.items()}
    masked.apply_(target, 1 - p)
    for n in masked.names:
        assert target[n].dtype == dtype
        assert torch.equal(target[n], dare_merge(base[n], ft[n], p, seed=5, name=n)), n
    assert torch.equal(target["steps"], ft["steps"])


def test_apply_rescales_the_same_mask_and_accepts_per_tensor_q():
    base, ft = _pair()
    masked = MaskedDelta.build(base, ft, 0.5, seed=1, exclude=["b.*"])
    assert masked.names == ["a.weight", "a.bias"]
    sd = {k: v.clone() for k, v in ft.items()}
    masked.apply_(sd, {"a.weight": 0.7, "a.bias": 1.0})
    ref = dare_merge(base["a.weight"], ft["a.weight"], 0.5, seed=1, name="a.weight", q=0.7)
    assert torch.equal(sd["a.weight"], ref)
    kept = masked.kept("a.bias")
    assert torch.allclose(sd["a.bias"], base["a.bias"] + kept)
    assert torch.equal(sd["b.weight"], ft["b.weight"])  # excluded: untouched


def test_apply_into_a_module_in_place():
    torch.manual_seed(0)
    pre, model = nn.Linear(4, 3), nn.Linear(4, 3)
    masked = MaskedDelta.build(pre.state_dict(), model.state_dict(), 0.5, seed=0)
    expected = dare_merge(pre.weight, model.weight, 0.5, seed=0, name="weight", q=0.6)
    masked.apply_(model, 0.6)
    assert torch.equal(model.weight.detach(), expected)


def test_apply_and_build_errors():
    base, ft = _pair()
    masked = MaskedDelta.build(base, ft, 0.5, seed=1)
    with pytest.raises(ValueError, match="no value for tensor 'a.bias'"):
        masked.apply_(dict(ft), {"a.weight": 0.7, "b.weight": 0.7})
    with pytest.raises(ValueError, match="q=0.2 is below 1-p"):
        masked.apply_(dict(ft), 0.2)
    with pytest.raises(ValueError, match="target has no tensor 'b.weight'"):
        masked.apply_({"a.weight": ft["a.weight"].clone(), "a.bias": ft["a.bias"].clone()}, 0.7)
    bad = dict(ft, **{"a.bias": torch.ones(9)})
    with pytest.raises(ValueError, match="'a.bias'.*shape"):
        MaskedDelta.build(base, bad, 0.5)
    nan = dict(ft, **{"a.bias": torch.full((8,), float("nan"))})
    with pytest.raises(ValueError, match="'a.bias'.*non-finite"):
        MaskedDelta.build(base, nan, 0.5)
    with pytest.raises(ValueError, match="p=1.5 is outside"):
        MaskedDelta.build(base, ft, 1.5)


def test_grid_search_finds_the_optimum_of_a_known_function():
    calls = []

    def f(q):
        calls.append(q)
        return -((q - 0.537) ** 2)

    res = select_q_grid(f, 0.9, fine_steps=5)
    coarse = default_coarse_grid(0.9)
    assert coarse[0] == pytest.approx(0.1) and coarse[-1] == 1.0 and len(coarse) == 6
    fine_step = (coarse[1] - coarse[0]) * 2 / 6
    assert abs(res.q - 0.537) <= fine_step / 2 + 1e-9
    assert len(calls) == len(set(calls)) == len(res.table) == 6 + 4  # the middle fine q is the coarse best
    assert max(res.table, key=lambda t: t[1])[0] == res.q
    res_min = select_q_grid(lambda q: (q - 0.3) ** 2, 0.9, coarse=[0.1, 0.25, 0.4, 1.0], fine_steps=5, mode="min")
    assert res_min.q == pytest.approx(0.3)
    assert select_q_grid(lambda q: q, 0.5, fine_steps=0).q == 1.0  # edge optimum, no fine grid
    with pytest.raises(ValueError, match="mode="):
        select_q_grid(f, 0.5, mode="best")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the metric must be a finite number"):
            select_q_grid(lambda q, bad=bad: bad, 0.5)


def test_unlabelled_q_on_a_tiny_mlp():
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in pre.state_dict().items()})
    ft_state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(10, 6) for _ in range(3)]
    masked = MaskedDelta.build(pre.state_dict(), model.state_dict(), 0.7, seed=2)
    res = select_q_unlabelled(model, masked, batches, lambda m, x: m(x), grid=[0.3, 0.5, 0.7, 1.0], fine_steps=2)
    for k, v in model.state_dict().items():  # the model is left as it was
        assert torch.equal(v, ft_state[k])
    assert min(res.table, key=lambda t: t[1])[0] == res.q and 5 <= len(res.table) <= 6
    # each table entry is the mean |h_ft - h_pruned| computed independently
    pruned = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    for q, dist in res.table[:2]:
        pruned.load_state_dict(ft_state)
        masked.apply_(pruned, q, force=True)
        with torch.no_grad():
            ref = torch.stack([(pruned(x) - model(x)).abs().mean() for x in batches]).mean()
        assert dist == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="batches"):
        select_q_unlabelled(model, masked, [], lambda m, x: m(x))
