"""The merge formulas of ``lifelong_delta.delta.merge`` against their definitions: task arithmetic and TIES exactly
(TIES against a brute-force per-element reference in float32, ties in magnitude and zero sign sums included), the
DARE merges statistically and through their masks, and every method chunk by chunk equal to the whole tensor."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest
import torch

from lifelong_delta.delta.dare import dare
from lifelong_delta.delta.merge import (
    MERGE_METHODS,
    MagnitudeCut,
    MergeMethodName,
    MergeSpec,
    combine,
    magnitude_cut,
    magnitude_keep,
    merge_tensor,
)
from lifelong_delta.delta.methods import PruneSpec, prune_tensor

F32 = np.float32


def test_registry_rows_match_the_method_names():
    assert list(MERGE_METHODS) == list(get_args(MergeMethodName))
    for row in MERGE_METHODS.values():
        assert row.paper.startswith("https://arxiv.org/abs/")
        assert (row.sparsify == "random") == (row.rescale in ("density", "q"))


def _models(n: int, numel: int, seed: int = 0, scale: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    return base, [base + scale * torch.randn(numel, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ task arithmetic
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_exact(normalize):
    base, fts = _models(3, 257)
    weights, lam = (0.5, -1.25, 2.0), 0.7
    spec = MergeSpec("task-arithmetic", weights, lambda_=lam, normalize=normalize)
    got = merge_tensor(base, fts, spec, name="w").numpy()
    b = base.numpy()
    d = [f.numpy() - b for f in fts]
    tau = F32(weights[0]) * d[0] + F32(weights[1]) * d[1] + F32(weights[2]) * d[2]
    if normalize:
        tau = tau / (F32(weights[0]) + F32(weights[1]) + F32(weights[2]))
    assert np.array_equal(got, b + F32(lam) * tau)  # float32, in model order: bit for bit
    exact = b.astype(np.float64) + lam * sum(w * x.astype(np.float64) for w, x in zip(weights, d)) / (
        sum(weights) if normalize else 1.0
    )
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5)


def test_task_arithmetic_keeps_the_base_dtype_and_takes_mixed_inputs():
    base, fts = _models(2, 64)
    spec = MergeSpec("task-arithmetic", (1.0, 1.0))
    got = merge_tensor(base.bfloat16(), [fts[0].bfloat16(), fts[1]], spec, name="w")
    b = base.bfloat16().float()
    want = (b + ((fts[0].bfloat16().float() - b) + (fts[1] - b))).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert merge_tensor(base, fts, spec, name="w", out_dtype=torch.float16).dtype == torch.float16


# ------------------------------------------------------------------------------------------------------------ TIES
def _ties_reference(base, fts, weights, density, lam, normalize):
    """TIES element by element in float32 scalars: trim (sort by -|δ|, then index), elect, disjoint merge."""
    b = base.numpy().astype(F32)
    n = b.size
    trimmed = []
    for f, d in zip(fts, density):
        delta = [F32(x) - F32(y) for x, y in zip(f.numpy(), b)]
        kept = set(sorted(range(n), key=lambda j: (-abs(delta[j]), j))[: int(d * n)])
        trimmed.append([delta[j] if j in kept else F32(0) for j in range(n)])
    out = []
    for j in range(n):
        u = [F32(w) * t[j] for w, t in zip(weights, trimmed)]
        total = u[0]
        for x in u[1:]:
            total = total + x
        elected = 1 if total >= 0 else -1
        agree = [np.sign(x) == elected for x in u]
        mixed, div = F32(0), F32(0)
        for x, w, a in zip(u, weights, agree):
            if a:
                mixed, div = mixed + x, div + F32(w)
        if normalize:
            mixed = mixed / (div if div != 0 else F32(1))
        out.append(b[j] + (F32(lam) * mixed if lam != 1 else mixed))
    return np.array(out, dtype=F32)


def test_ties_by_hand():
    """Elected sign from the summed mass (a zero sum elects +), disjoint mean of the agreeing models."""
    deltas = torch.tensor([[3.0, -1, 2, 0.5, 0, -1], [-2, -1, -2, 0.5, 0, -3], [1, 4, 0, -0.5, 0, 2]])
    base = torch.zeros(6)
    spec = MergeSpec("ties", (1.0, 1.0, 1.0), density=(1.0,))
    assert merge_tensor(base, list(deltas), spec, name="w").tolist() == [2.0, 4.0, 2.0, 0.5, 0.0, -2.0]
    summed = MergeSpec("ties", (1.0, 1.0, 1.0), density=(1.0,), normalize=False)
    assert merge_tensor(base, list(deltas), summed, name="w").tolist() == [4.0, 4.0, 2.0, 1.0, 0.0, -4.0]
    weighted = MergeSpec("ties", (1.0, 3.0, 1.0), density=(1.0,))  # u_0 = 3, -6, 1: - wins, (-6) / 3
    assert merge_tensor(base, list(deltas), weighted, name="w").tolist()[:3] == [-2.0, 4.0, -2.0]


def test_ties_trim_breaks_magnitude_ties_by_flat_index():
    delta = torch.tensor([1.0, -2.0, 2.0, -2.0, 0.5])
    cut = magnitude_cut(delta, 0.4)  # k = 2 of the three entries of magnitude 2: indices 1 and 2
    assert cut == MagnitudeCut(2.0, 3)
    assert magnitude_keep(delta, cut).tolist() == [False, True, True, False, False]
    chunks = [magnitude_keep(delta[s : s + 2], cut, offset=s) for s in range(0, 5, 2)]
    assert torch.cat(chunks).tolist() == [False, True, True, False, False]
    assert magnitude_cut(delta, 0.1) == MagnitudeCut(math.inf, 0)  # floor(0.5) = 0 entries kept
    assert magnitude_keep(delta, magnitude_cut(delta, 1.0)).all()
    zeros = torch.zeros(10)
    assert magnitude_keep(zeros, magnitude_cut(zeros, 0.3)).tolist() == [True] * 3 + [False] * 7


@pytest.mark.parametrize("k_rule", [(0.29, 100, 28), (0.3, 10, 3), (0.7, 10, 7), (0.55, 8, 4)])
def test_ties_keeps_floor_of_density_times_n_like_mergekit(k_rule):
    density, n, k = k_rule
    delta = torch.arange(1, n + 1, dtype=torch.float32)
    assert int(magnitude_keep(delta, magnitude_cut(delta, density)).sum()) == k == int(density * n)


@pytest.mark.parametrize(
    ("weights", "density", "lam", "normalize"),
    [
        ((1.0, 1.0, 1.0), (0.5, 0.5, 0.5), 1.0, True),
        ((1.0, 0.5, 2.0), (0.3, 0.6, 1.0), 1.0, True),
        ((1.0, -0.75, 0.5), (0.45, 0.2, 0.7), 0.8, False),
        ((0.25, 1.5, 1.0, 0.5), (0.5, 0.5, 0.35, 0.9), 1.3, False),
        ((2.0,), (0.4,), 1.0, True),
    ],
)
def test_ties_equals_brute_force_reference(weights, density, lam, normalize):
    """Small integer deltas: many equal magnitudes at the cut, exact zeros, and zero sums at the election."""
    g = torch.Generator().manual_seed(len(weights) * 7 + int(lam * 10))
    n = 61
    base = torch.randn(n, generator=g)
    fts = [base + torch.randint(-3, 4, (n,), generator=g).float() * 0.25 for _ in weights]
    spec = MergeSpec("ties", weights, density=density, lambda_=lam, normalize=normalize)
    want = _ties_reference(base, fts, weights, density, lam, normalize)
    got = merge_tensor(base, fts, spec, name="t")
    assert np.array_equal(got.numpy(), want)
    cuts = [magnitude_cut(f - base, d) for f, d in zip(fts, density)]
    for step in (1, 7, 16):  # chunks through the cut's tie limit
        chunks = [
            merge_tensor(base[s : s + step], [f[s : s + step] for f in fts], spec, name="t", offset=s, cuts=cuts)
            for s in range(0, n, step)
        ]
        assert np.array_equal(torch.cat(chunks).numpy(), want)


def test_ties_zero_sign_cases():
    base = torch.zeros(4)
    fts = [torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0, -0.5])]
    spec = MergeSpec("ties", (1.0, 1.0), density=(1.0,))
    # sums 0, 0, 0, -0.5: the first two elect +, an all-zero entry stays 0, the last elects -
    assert merge_tensor(base, fts, spec, name="z").tolist() == [1.0, 1.0, 0.0, -0.5]
    spec = MergeSpec("ties", (1.0, -1.0), density=(1.0,), normalize=False)  # a negative weight flips its sign
    assert merge_tensor(base, fts, spec, name="z").tolist() == [2.0, -2.0, 0.0, 0.5]


# ----------------------------------------------------------------------------------------------------- DARE merges
def test_one_model_dare_linear_is_prune_with_seed_plus_index():
    base, fts = _models(2, 4099, seed=3)
    one = MergeSpec("dare-linear", (1.0,), density=(0.25,), seed=11)
    assert torch.equal(
        merge_tensor(base, fts[:1], one, name="layer.w"),
        prune_tensor("layer.w", base, fts[0], PruneSpec("dare", 0.75, seed=11)),
    )
    second = MergeSpec("dare-linear", (0.0, 1.0), density=(0.25,), seed=11)  # model 1 draws with seed 12
    assert torch.equal(
        merge_tensor(base, fts, second, name="layer.w"),
        prune_tensor("layer.w", base, fts[1], PruneSpec("dare", 0.75, seed=12)),
    )
    darex = MergeSpec("darex-q", (1.0,), density=(0.25,), q=(0.5,), seed=11)
    assert torch.equal(
        merge_tensor(base, fts[:1], darex, name="layer.w"),
        prune_tensor("layer.w", base, fts[0], PruneSpec("darex-q", 0.75, q=0.5, seed=11)),
    )


@pytest.mark.parametrize("method", ["dare-ties", "dare-linear", "darex-q"])
def test_dare_merges_compose_dare_with_the_combination(method):
    base, fts = _models(3, 3001, seed=5)
    spec = MergeSpec(method, (1.0, 0.5, 1.5), density=(0.3, 0.6, 0.9), seed=2)
    q = [spec.rescale_q(i) for i in range(3)]
    pruned = [
        dare(f - base, 1 - d, seed=2 + i, name="x", q=qi) for i, (f, d, qi) in enumerate(zip(fts, spec.density, q))
    ]
    assert torch.equal(merge_tensor(base, fts, spec, name="x"), base + combine(pruned, spec))
    if method == "darex-q":
        assert q == pytest.approx([math.sqrt(d) for d in spec.density])


def test_dare_linear_statistics_kept_fraction_independence_and_mean():
    n = 200_000
    base = torch.zeros(n)
    fts = [torch.full((n,), 1.0), torch.full((n,), 3.0)]
    spec = MergeSpec("dare-linear", (1.0, 0.5), density=(0.3, 0.6), seed=0)
    got = merge_tensor(base, fts, spec, name="w")
    one, two = F32(1) * F32(1 / F32(0.3)), F32(0.5) * (F32(3) * F32(1 / F32(0.6)))
    freq = {
        k: float((got == v).float().mean())
        for k, v in (("none", 0.0), ("first", float(one)), ("second", float(two)), ("both", float(F32(one + two))))
    }
    assert sum(freq.values()) == pytest.approx(1.0)
    want = {"none": 0.7 * 0.4, "first": 0.3 * 0.4, "second": 0.7 * 0.6, "both": 0.3 * 0.6}  # independent masks
    for k, v in want.items():
        assert freq[k] == pytest.approx(v, abs=0.006), k
    assert float(got.double().mean()) == pytest.approx(1.0 + 1.5, rel=0.01)  # E[merge] = task arithmetic


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties", "darex-q"])
def test_dare_merges_are_task_arithmetic_in_expectation(method):
    """Random same-sign deltas (so dare-ties' sign election keeps everything it drew), normalize off."""
    n = 100_000
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    fts = [base + sign * torch.rand(n, generator=g) for _ in range(3)]
    weights, density = (1.0, 0.5, 2.0), (0.2, 0.5, 0.8)
    spec = MergeSpec(method, weights, density=density, normalize=False, lambda_=0.5, seed=4)
    merged = (merge_tensor(base, fts, spec, name="w") - base).double()
    factor = [spec.density[i] / spec.rescale_q(i) for i in range(3)]  # 1 for DARE, √d for the default DAREx-q
    expected = 0.5 * sum(w * c * (f - base).double() for w, c, f in zip(weights, factor, fts))
    assert float((merged * expected).sum() / expected.square().sum()) == pytest.approx(1.0, abs=0.01)
    for i, f in enumerate(fts):  # each model's kept fraction is its density
        alone = MergeSpec(method, tuple(1.0 if j == i else 0.0 for j in range(3)), density=density, seed=4)
        assert float((merge_tensor(base, fts, alone, name="w") != base).float().mean()) == pytest.approx(
            density[i], abs=0.01
        )


def test_darex_q_default_q_keeps_the_expected_squared_norm():
    base, fts = _models(1, 200_000, seed=9)
    spec = MergeSpec("darex-q", (1.0,), density=(0.1,))
    pruned = (merge_tensor(base, fts, spec, name="w") - base).double()
    delta = (fts[0] - base).double()
    assert spec.rescale_q(0) == pytest.approx(math.sqrt(0.1))
    assert float(pruned.square().sum() / delta.square().sum()) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_chunks_concatenate_to_the_whole_tensor(method):
    base, fts = _models(3, 1000, seed=7)
    base, fts = base.view(40, 25), [f.view(40, 25) for f in fts]
    density = None if method == "task-arithmetic" else (0.3, 0.5, 0.7)
    spec = MergeSpec(method, (1.0, 0.5, 0.75), density=density, lambda_=0.9, seed=3)
    whole = merge_tensor(base, fts, spec, name="m.w")
    cuts = [magnitude_cut(f - base, d) for f, d in zip(fts, density)] if method == "ties" else None
    flat_b, flat_f = base.reshape(-1), [f.reshape(-1) for f in fts]
    chunks = [
        merge_tensor(flat_b[s : s + 77], [f[s : s + 77] for f in flat_f], spec, name="m.w", offset=s, cuts=cuts)
        for s in range(0, 1000, 77)
    ]
    assert torch.equal(torch.cat(chunks).view(40, 25), whole)


# ---------------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ties", "weights": (1.0, 1.0), "density": (0.0,)}, r"density 0 is outside \(0, 1\]"),
        ({"method": "ties", "weights": (1.0, 1.0), "density": (1.5,)}, r"density 1\.5 is outside \(0, 1\]"),
        ({"method": "dare-ties", "weights": (1.0, 1.0), "density": (0.5, 0.5, 0.5)}, r"density has 3 values for 2"),
        ({"method": "ties", "weights": (1.0, 1.0)}, r"ties needs density"),
        ({"method": "task-arithmetic", "weights": (1.0,), "density": (0.5,)}, r"keeps every delta entry"),
        ({"method": "darex-q", "weights": (1.0,), "density": (0.5,), "q": (0.4,)}, r"q 0\.4 of model 1 is outside"),
        ({"method": "dare-linear", "weights": (1.0,), "density": (0.5,), "q": (0.7,)}, r"q is the rescale of darex-q"),
        ({"method": "ties", "weights": (), "density": (0.5,)}, r"at least one model"),
        ({"method": "task-arithmetic", "weights": (1.0, float("nan"))}, r"weights must be finite"),
        ({"method": "task-arithmetic", "weights": (1.0,), "lambda_": float("inf")}, r"lambda must be a finite"),
        ({"method": "slerp", "weights": (1.0,)}, r"method 'slerp' is not one of"),
        ({"method": "dare-ties", "weights": (1.0, -1.0), "density": (0.5,)}, r"undoes a negative weight"),
    ],
)
def test_spec_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        MergeSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_inputs_must_be_finite_and_match():
    base, fts = _models(2, 10)
    spec = MergeSpec("ties", (1.0, 1.0), density=(0.5,))
    fts[1][3] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'w' of the fine-tuned #2 model has 1 non-finite"):
        merge_tensor(base, fts, spec, name="w")
    with pytest.raises(ValueError, match=r"1 fine-tuned tensors for 2 weights"):
        merge_tensor(base, fts[:1], spec, name="w")
    with pytest.raises(ValueError, match=r"fine-tuned #1 has shape \[5\]"):
        merge_tensor(base, [fts[0][:5], fts[0]], spec, name="w")
