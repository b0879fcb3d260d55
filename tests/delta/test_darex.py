"""DAREx-q: masked delta built once, rescaled per q; grid, analytic and unlabelled q selection."""

import itertools
import math

import pytest
import torch
from torch import nn

from lifelong_delta.delta.dare import dare_merge
from lifelong_delta.delta.darex import (
    MaskedDelta,
    analytic_q_per_layer,
    analytic_row_q,
    analytic_row_q_sequential,
    bernoulli_subgaussian_phi,
    default_coarse_grid,
    min_mse_q_per_layer,
    select_q_grid,
    select_q_unlabelled,
)


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    base = {"a.weight": torch.randn(8, 5).to(dtype), "a.bias": torch.randn(8).to(dtype),
            "b.weight": torch.randn(3, 8).to(dtype), "steps": torch.tensor(3)}
    ft = {k: (v.float() + 0.1 * torch.randn(v.shape)).to(dtype) if v.is_floating_point() else v + 1
          for k, v in base.items()}
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
    res_min = select_q_grid(lambda q: (q - 0.3) ** 2, 0.9, coarse=[0.1, 0.25, 0.4, 1.0], fine_steps=5,
                            mode="min")
    assert res_min.q == pytest.approx(0.3)
    assert select_q_grid(lambda q: q, 0.5, fine_steps=0).q == 1.0  # edge optimum, no fine grid
    with pytest.raises(ValueError, match="mode="):
        select_q_grid(f, 0.5, mode="best")
    with pytest.raises(ValueError, match="NaN"):
        select_q_grid(lambda q: float("nan"), 0.5)


def _expected_sq_change(dw, xbar, p, q):
    """Brute force Σ_i E[h_i²] over all 2^n masks of the (tiny) matrix."""
    c = dw * xbar[None, :]
    n = c.numel()
    total = 0.0
    for bits in itertools.product([0, 1], repeat=n):
        m = torch.tensor(bits, dtype=torch.float64).view(c.shape)
        prob = float(((1 - p) ** m.sum()) * (p ** (n - m.sum())))
        h = (c * (1 - m / q)).sum(1)
        total += prob * float((h * h).sum())
    return total


def test_min_mse_q_on_a_hand_example_and_against_brute_force():
    p = 0.5
    # ΔW = [[1, 1]], x̄ = [1, 1]: S1 = 2, S2 = 2 → q* = 0.5 + 0.5 · 2/4 = 0.75
    base = {"l.weight": torch.zeros(1, 2), "l.bias": torch.zeros(1)}
    ft = {"l.weight": torch.ones(1, 2), "l.bias": torch.ones(1)}
    masked = MaskedDelta.build(base, ft, p)
    q = min_mse_q_per_layer(masked, {"l.weight": torch.ones(2)})
    assert q["l.weight"] == pytest.approx(0.75) and q["l.bias"] == pytest.approx(0.5)
    # rows that cancel push q to 1: [[1,1],[1,-1]] → ΣS1² = 4, ΣS2 = 4 → q* = 1
    ft2 = {"l.weight": torch.tensor([[1.0, 1.0], [1.0, -1.0]])}
    m2 = MaskedDelta.build({"l.weight": torch.zeros(2, 2)}, ft2, p)
    assert min_mse_q_per_layer(m2, {"l.weight": torch.ones(2)})["l.weight"] == pytest.approx(1.0)
    # random tiny layer: the closed form minimises the brute-force expected squared output change
    torch.manual_seed(3)
    dw, xbar, p = torch.randn(2, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5, 0.6
    m3 = MaskedDelta.build({"w": torch.zeros(2, 4)}, {"w": dw.float()}, p)
    q_star = min_mse_q_per_layer(m3, {"w": xbar.float()}, clip=False)["w"]
    grid = [q_star * (1 + e) for e in (-0.05, -0.01, 0.0, 0.01, 0.05)]
    vals = [_expected_sq_change(dw, xbar, p, g) for g in grid]
    assert vals.index(min(vals)) == 2
    with pytest.raises(ValueError, match=r"mean_inputs\['w'\] has shape"):
        min_mse_q_per_layer(m3, {"w": torch.ones(3)})


def _grid(p):
    return [k * 0.001 for k in range(math.ceil((1 - p) * 1000 - 1e-9), 999)]


def _objective(row, p, q, eta, gamma):
    """The authors' per-row objective, written out with plain Python sums."""
    s1 = sum(float(c) for c in row)
    s2 = sum(float(c) ** 2 for c in row)
    phi = (1 - 2 * p) / math.log((1 - p) / p)
    return abs(eta * (1 - (1 - p) / q) * s1 + eta**2 * phi * s2 / (4 * q * q) + math.log(2 / (1 - gamma)))


@pytest.mark.parametrize(("p", "eta"), [(0.7, 0.5), (0.9, 1.0), (0.95, 0.27)])
def test_analytic_row_q_is_the_grid_argmin_of_the_authors_objective(p, eta):
    torch.manual_seed(int(p * 100))
    c = torch.randn(5, 4, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [3.0], [0.5], [10.0]])
    got = analytic_row_q(c, p, eta=eta, stop_fraction=None)
    for i, row in enumerate(c.tolist()):
        vals = [(_objective(row, p, q, eta, 0.95), q) for q in _grid(p)]
        best = min(v for v, _ in vals)
        want = max(q for v, q in vals if v == best)  # ties go to the larger q
        assert got[i].item() == pytest.approx(want, abs=1e-12), i


def test_analytic_row_q_early_stop_and_bad_arguments():
    # identical rows with an interior minimum: every row passes it at the same step, so stopping early changes nothing
    row = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)  # minimum near q = 0.45
    c = row.repeat(4, 1)
    full = analytic_row_q(c, 0.9, eta=0.5, stop_fraction=None)
    early = analytic_row_q(c, 0.9, eta=0.5)
    assert torch.equal(full, early) and 0.1 < full[0] < 0.998
    # one row with a much later minimum keeps its best-so-far q when 80% of the rows have stopped
    c2 = torch.cat([row.repeat(4, 1), torch.tensor([[100.0, 100.0, 100.0]], dtype=torch.float64)])
    early2 = analytic_row_q(c2, 0.9, eta=0.5)
    assert torch.equal(early2[:4], full) and early2[4] <= analytic_row_q(c2[4:], 0.9, eta=0.5, stop_fraction=None)[0]
    assert analytic_row_q(c, 0.9, eta=0.5)[0] >= 0.1  # never below 1 - p
    with pytest.raises(ValueError, match="eta=0"):
        analytic_row_q(c, 0.9, eta=0.0)
    with pytest.raises(ValueError, match="gamma=1"):
        analytic_row_q(c, 0.9, gamma=1.0)


@pytest.mark.parametrize(
    ("p", "eta", "stop"), [(0.5, 0.37, 0.8), (0.9, 0.1, 0.8), (0.99, 1.5, 0.5), (0.95, 0.7, None)]
)
def test_blocked_scan_equals_the_sequential_scan(p, eta, stop):
    torch.manual_seed(3)
    # rows of many scales and signs, so they stop at different q (some only after several blocks of q values)
    c = torch.randn(300, 40, dtype=torch.float64) * torch.logspace(-3, 1, 300, dtype=torch.float64)[:, None]
    c[::7] = c[::7].abs()
    want = analytic_row_q_sequential(c, p, eta=eta, stop_fraction=stop)
    got = analytic_row_q(c, p, eta=eta, stop_fraction=stop)
    assert torch.equal(got, want)
    assert len(set(want.tolist())) > 10  # the rows really chose different q


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.99])
def test_phi_is_a_subgaussian_proxy_of_the_bernoulli_mask(p):
    """E exp(λ(m − E m)) <= exp(λ² Φ(p) / 4) for m ~ Bernoulli(1 − p), on a grid of λ (the bound's MGF step)."""
    phi = bernoulli_subgaussian_phi(p)
    for lam in [x / 4 for x in range(-80, 81)]:
        mgf = (1 - p) * math.exp(lam * p) + p * math.exp(-lam * (1 - p))
        assert mgf <= math.exp(lam * lam * phi / 4) * (1 + 1e-12), lam
    assert bernoulli_subgaussian_phi(0.5) == 0.5


def test_analytic_q_per_layer_wires_rows_bias_and_fallback():
    torch.manual_seed(4)
    p, eta = 0.8, 0.6
    base = {"l.weight": torch.zeros(3, 4), "l.bias": torch.zeros(3), "e.weight": torch.zeros(5, 2),
            "n.weight": torch.zeros(4)}
    ft = {k: torch.randn(v.shape) for k, v in base.items()}
    masked = MaskedDelta.build(base, ft, p)
    xbar = torch.rand(4) + 0.5
    qs = analytic_q_per_layer(masked, {"l.weight": xbar}, eta=eta)
    c = torch.cat([ft["l.weight"].double() * xbar.double()[None, :], ft["l.bias"].double()[:, None]], dim=1)
    want = analytic_row_q(c, p, eta=eta).mean().item()
    assert qs["l.weight"] == pytest.approx(want) and qs["l.bias"] == qs["l.weight"]
    assert qs["e.weight"] == qs["n.weight"] == pytest.approx(want)  # mean of the layer qs
    assert analytic_q_per_layer(masked, {})["l.weight"] == pytest.approx(1 - p)  # no calibrated layer
    with pytest.raises(ValueError, match=r"mean_inputs\['l.weight'\] has shape"):
        analytic_q_per_layer(masked, {"l.weight": torch.ones(3)})


def test_unlabelled_q_on_a_tiny_mlp():
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in pre.state_dict().items()})
    ft_state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(10, 6) for _ in range(3)]
    masked = MaskedDelta.build(pre.state_dict(), model.state_dict(), 0.7, seed=2)
    res = select_q_unlabelled(model, masked, batches, lambda m, x: m(x), grid=[0.3, 0.5, 0.7, 1.0],
                              fine_steps=2)
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
