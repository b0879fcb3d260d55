"""DAREx-q's per-layer q from calibration inputs: the authors' bound and the minimum-MSE closed form."""

import itertools
import math

import pytest
import torch

from lifelong_delta.delta.analytic_q import (
    analytic_q_per_layer,
    analytic_row_q,
    analytic_row_q_sequential,
    bernoulli_subgaussian_phi,
    min_mse_q_per_layer,
)
from lifelong_delta.delta.darex import MaskedDelta


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
    got = analytic_row_q(c, p, eta=eta, stop_fraction=None, arithmetic="float64")
    for i, row in enumerate(c.tolist()):
        vals = [(_objective(row, p, q, eta, 0.95), q) for q in _grid(p)]
        best = min(v for v, _ in vals)
        want = max(q for v, q in vals if v == best)  # ties go to the larger q
        assert got[i].item() == pytest.approx(want, abs=1e-12), i


def test_analytic_row_q_early_stop_and_bad_arguments():
    # identical rows with an interior minimum: every row passes it at the same step, so stopping early changes nothing
    row = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)  # minimum near q = 0.45
    c = row.repeat(4, 1)
    f64 = {"arithmetic": "float64"}
    full = analytic_row_q(c, 0.9, eta=0.5, stop_fraction=None, **f64)
    early = analytic_row_q(c, 0.9, eta=0.5, **f64)
    assert torch.equal(full, early) and 0.1 < full[0] < 0.998
    # one row with a much later minimum keeps its best-so-far q when 80% of the rows have stopped
    c2 = torch.cat([row.repeat(4, 1), torch.tensor([[100.0, 100.0, 100.0]], dtype=torch.float64)])
    early2 = analytic_row_q(c2, 0.9, eta=0.5, **f64)
    assert torch.equal(early2[:4], full)
    assert early2[4] <= analytic_row_q(c2[4:], 0.9, eta=0.5, stop_fraction=None, **f64)[0]
    assert analytic_row_q(c, 0.9, eta=0.5, **f64)[0] >= 0.1  # never below 1 - p
    with pytest.raises(ValueError, match="eta=0"):
        analytic_row_q(c, 0.9, eta=0.0)
    with pytest.raises(ValueError, match="gamma=1"):
        analytic_row_q(c, 0.9, gamma=1.0)
    with pytest.raises(ValueError, match="arithmetic='bf16'"):
        analytic_row_q(c, 0.9, arithmetic="bf16")
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="tie_rtol="):
            analytic_row_q(c, 0.9, tie_rtol=bad)
    # tie_rtol = 0 is the exact scan: the blocked float64 result
    assert torch.equal(analytic_row_q(c2, 0.9, eta=0.5, tie_rtol=0.0, **f64), early2)


@pytest.mark.parametrize(("p", "eta", "stop"), [(0.5, 0.37, 0.8), (0.9, 0.1, 0.8), (0.99, 1.5, 0.5), (0.95, 0.7, None)])
def test_blocked_scan_equals_the_sequential_scan(p, eta, stop):
    torch.manual_seed(3)
    # rows of many scales and signs, so they stop at different q (some only after several blocks of q values)
    c = torch.randn(300, 40, dtype=torch.float64) * torch.logspace(-3, 1, 300, dtype=torch.float64)[:, None]
    c[::7] = c[::7].abs()
    want = analytic_row_q_sequential(c, p, eta=eta, stop_fraction=stop)
    got = analytic_row_q(c, p, eta=eta, stop_fraction=stop, arithmetic="float64")
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
    base = {
        "l.weight": torch.zeros(3, 4),
        "l.bias": torch.zeros(3),
        "e.weight": torch.zeros(5, 2),
        "n.weight": torch.zeros(4),
    }
    ft = {k: torch.randn(v.shape) for k, v in base.items()}
    masked = MaskedDelta.build(base, ft, p)
    xbar = torch.rand(4) + 0.5
    for arithmetic, dtype in (("float64", torch.float64), ("float16", torch.float32)):
        qs = analytic_q_per_layer(masked, {"l.weight": xbar}, eta=eta, arithmetic=arithmetic)
        c = torch.cat([ft["l.weight"].to(dtype) * xbar.to(dtype)[None, :], ft["l.bias"].to(dtype)[:, None]], dim=1)
        want = analytic_row_q(c, p, eta=eta, arithmetic=arithmetic).mean().item()
        assert qs["l.weight"] == pytest.approx(want) and qs["l.bias"] == qs["l.weight"]
        assert qs["e.weight"] == qs["n.weight"] == pytest.approx(want)  # mean of the layer qs
    assert analytic_q_per_layer(masked, {})["l.weight"] == pytest.approx(1 - p)  # no calibrated layer
    with pytest.raises(ValueError, match=r"mean_inputs\['l.weight'\] has shape"):
        analytic_q_per_layer(masked, {"l.weight": torch.ones(3)})


def test_input_major_weights_are_read_transposed():
    """A weight stored [in, out] (GPT-2's Conv1D) with mean inputs of shape [in, 1] gets the q of the same weight
    stored [out, in] with mean inputs [in], its bias included, for both per-layer rules."""
    torch.manual_seed(5)
    p = 0.7
    w, b = torch.randn(3, 4), torch.randn(3)  # out 3, in 4
    xbar = torch.rand(4) + 0.5
    out_major = MaskedDelta.build(
        {"l.weight": torch.zeros(3, 4), "l.bias": torch.zeros(3)}, {"l.weight": w, "l.bias": b}, p
    )
    in_major = MaskedDelta.build(
        {"l.weight": torch.zeros(4, 3), "l.bias": torch.zeros(3)}, {"l.weight": w.T.contiguous(), "l.bias": b}, p
    )
    for arithmetic in ("float16", "float64"):
        want = analytic_q_per_layer(out_major, {"l.weight": xbar}, arithmetic=arithmetic)
        got = analytic_q_per_layer(in_major, {"l.weight": xbar[:, None]}, arithmetic=arithmetic)
        assert got == want
    assert min_mse_q_per_layer(in_major, {"l.weight": xbar[:, None]}) == min_mse_q_per_layer(
        out_major, {"l.weight": xbar}
    )
    with pytest.raises(ValueError, match=r"expected \[4, 1\]"):
        analytic_q_per_layer(in_major, {"l.weight": xbar[:3, None]})


def _authors_float16_scan(c, p, eta, gamma=0.95, stop_iter=0.8):
    """The authors' ``analytical_resolve_new`` transcribed as written (float16 c, float16 running best, keepdim
    sums recomputed at every q), except that the grid starts at 1 − p rounded up, as ours does."""
    c = c.to(torch.float16)
    q_o = torch.ones(c.shape[0], 1, dtype=torch.float64) * (1 - p)
    stop_index = torch.zeros(c.shape[0], 1)
    best_res = torch.ones(c.shape[0], 1, dtype=torch.float16) * 10000
    phi = (1 - 2 * p) / math.log((1 - p) / p)
    for q_1000 in range(math.ceil((1 - p) * 1000 - 1e-9), 999):
        q = q_1000 * 0.001
        term1 = (1 - (1 - p) / q) * torch.sum(c, dim=1, keepdim=True)
        term2 = eta**2 * phi * torch.sum(c**2, dim=1, keepdim=True) / (4 * q**2) + math.log(2 / (1 - gamma))
        res = abs(eta * term1 + term2)
        index_s = res <= best_res
        index_l = res >= best_res
        best_res[index_s] = res[index_s]
        q_o[index_s] = q
        stop_index[index_l] = 1
        if stop_index.mean() >= stop_iter:
            break
    return q_o[:, 0]


@pytest.mark.parametrize(("p", "eta"), [(0.6, 0.37), (0.9, 1.0), (0.99, 0.27), (0.99, 20.0)])
def test_float16_scan_is_the_authors_loop(p, eta):
    torch.manual_seed(5)
    # rows from far below float16's resolution at the objective's ~3.69 up to rows that move it a lot
    c = torch.randn(200, 30) * torch.logspace(-6, 0, 200)[:, None]
    got = analytic_row_q(c, p, eta=eta)  # float16 is the default
    assert torch.equal(got, _authors_float16_scan(c, p, eta))
    assert (got >= 1 - p - 1e-12).all() and (got <= 0.998 + 1e-12).all()


@pytest.mark.parametrize("p", [0.9, 0.99])
def test_float16_keeps_small_deltas_at_dare_where_float64_drifts_to_half(p):
    """The behaviour behind finding 2: on tiny c the float16 objective ties at the second q, so every row stops at
    1 − p + step; the exact float64 objective sends rows with Σ_j c_ij < 0 to the end of the grid."""
    torch.manual_seed(6)
    c = torch.randn(400, 64) * 1e-5
    f16 = analytic_row_q(c, p)
    assert torch.allclose(f16, torch.full_like(f16, 1 - p + 0.001))
    f64 = analytic_row_q(c, p, arithmetic="float64", stop_fraction=None)
    neg = c.double().sum(1) < 0
    assert (f64[neg] > 0.99).all() and (f64[~neg] < 1 - p + 0.05).all()
    # the effect is the tolerance, not the precision: float64 with a relative tie tolerance behaves like float16
    assert torch.equal(analytic_row_q(c, p, arithmetic="float64", tie_rtol=5e-4), f16)
    # per layer: float16 ≈ DARE's 1/(1 − p); float64 ≈ the mean of the two ends, whatever p is
    base, ft = {"l.weight": torch.zeros(400, 64)}, {"l.weight": c}
    masked = MaskedDelta.build(base, ft, p)
    ones = {"l.weight": torch.ones(64)}
    assert analytic_q_per_layer(masked, ones)["l.weight"] == pytest.approx(1 - p + 0.001)
    assert 0.4 < analytic_q_per_layer(masked, ones, arithmetic="float64", stop_fraction=None)["l.weight"] < 0.6


def test_tie_tolerance_counts_a_near_equal_value_as_improved_and_stopped():
    """One row with Σ_j c_ij < 0, p = 0.5: F falls at every q, by less than 1e-4 relative per step. Exact
    comparisons follow it to the end of the grid; with a tolerance the second q ties, the row takes it and stops."""
    c = torch.tensor([[-0.02, -0.02, -0.02]], dtype=torch.float64)
    exact = analytic_row_q(c, 0.5, eta=1.0, arithmetic="float64", stop_fraction=1.0)
    assert exact.item() == pytest.approx(0.998)
    for rtol in (1e-4, 1e-2):
        loose = analytic_row_q(c, 0.5, eta=1.0, arithmetic="float64", stop_fraction=1.0, tie_rtol=rtol)
        assert loose.item() == pytest.approx(0.501)
