"""DARE / DAREx-q on single tensors: statistics, exactness, dtypes, back ends and errors."""

import math

import pytest
import torch

from lifelong_delta.delta import masks
from lifelong_delta.delta.dare import _words, dare, dare_merge, resolve_q, scale_of
from lifelong_delta.delta.dtypes import dtype_code
from lifelong_delta.delta.masks import keep_mask

BACKENDS = ["torch"] + (["numba"] if masks.numba_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    masks.set_backend(request.param)
    yield request.param
    masks.set_backend("auto")


def test_dare_is_mask_times_scale(backend):
    d = torch.randn(37, 41)
    p = 0.6
    out = dare(d, p, seed=4, name="w")
    keep = keep_mask(d.numel(), p, seed=4, name="w").view(d.shape)
    ref = torch.where(keep, d * scale_of(1 - p), torch.zeros(()))
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    frac = (out == 0).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / d.numel())


def test_expectation_is_delta(backend):
    d = torch.randn(64)
    p, n_seeds = 0.7, 3000
    mean = torch.stack([dare(d, p, seed=s, name="v") for s in range(n_seeds)]).mean(0)
    # per-entry std of the estimate: |d| sqrt(p/(1-p)) / sqrt(n)
    tol = 5 * d.abs() * math.sqrt(p / (1 - p)) / math.sqrt(n_seeds) + 1e-6
    assert ((mean - d).abs() <= tol).all()


def test_darex_q_at_one_minus_p_equals_dare_bit_for_bit(backend):
    base, ft = torch.randn(50, 30), torch.randn(50, 30)
    p = 0.9
    a = dare_merge(base, ft, p, seed=1, name="w")
    b = dare_merge(base, ft, p, seed=1, name="w", q=1 - p)
    assert torch.equal(a, b)
    assert torch.equal(dare(ft - base, p, seed=1, name="w"), dare(ft - base, p, seed=1, name="w", q=1 - p))


def test_merge_formula_and_dropped_entries_are_base(backend):
    base, ft = torch.randn(1000), torch.randn(1000)
    p, q = 0.5, 0.8
    out = dare_merge(base, ft, p, seed=2, name="b", q=q)
    keep = keep_mask(1000, p, seed=2, name="b")
    assert torch.equal(out[~keep], base[~keep])
    assert torch.equal(out[keep], base[keep] + (ft - base)[keep] * scale_of(q))


def test_chunked_equals_whole(backend):
    base, ft = torch.randn(9001), torch.randn(9001)
    whole = dare_merge(base, ft, 0.4, seed=3, name="c")
    cut = 4444
    parts = [
        dare_merge(base[:cut], ft[:cut], 0.4, seed=3, name="c"),
        dare_merge(base[cut:], ft[cut:], 0.4, seed=3, name="c", offset=cut),
    ]
    assert torch.equal(torch.cat(parts), whole)
    d = ft - base
    parts = [dare(d[:cut], 0.4, seed=3, name="c"), dare(d[cut:], 0.4, seed=3, name="c", offset=cut)]
    assert torch.equal(torch.cat(parts), dare(d, 0.4, seed=3, name="c"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_in_equals_dtype_out(backend, dtype):
    base = torch.randn(300, 7).to(dtype)
    ft = (base.float() + 0.1 * torch.randn(300, 7)).to(dtype)
    out = dare_merge(base, ft, 0.5, seed=0, name="w")
    assert out.dtype == dtype and out.shape == ft.shape
    ref = dare_merge(base.float(), ft.float(), 0.5, seed=0, name="w").to(dtype)
    assert torch.equal(out, ref)  # fp32 compute, one rounding at the end


def test_mixed_dtypes_write_the_finetuned_dtype(backend):
    base = torch.randn(100, dtype=torch.float32)
    ft = (base + 0.1).to(torch.bfloat16)
    out = dare_merge(base, ft, 0.3, seed=0, name="w")
    assert out.dtype == torch.bfloat16
    assert dare_merge(base, ft, 0.3, seed=0, name="w", out_dtype=torch.float32).dtype == torch.float32


@pytest.mark.skipif(not masks.numba_available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_and_torch_merge_agree_bit_for_bit(dtype):
    from lifelong_delta.delta import _kernels, _torch_kernels

    base = torch.randn(123_457).to(dtype)
    ft = (base.float() + torch.randn(123_457)).to(dtype)
    res = {}
    for b in ("numba", "torch"):  # numba: the compiled kernel for one fp32/bf16 dtype, numba for the others
        masks.set_backend(b)
        try:
            res[b] = (
                dare_merge(base, ft, 0.85, seed=9, name="x", q=0.4, offset=17),
                dare(ft.float() - base.float(), 0.85, seed=9, name="x", offset=17),
            )
        finally:
            masks.set_backend("auto")
    assert torch.equal(res["numba"][0], res["torch"][0]) and torch.equal(res["numba"][1], res["torch"][1])
    if masks.numba_available():  # the numba merge itself, whichever kernel dare_merge picked
        out = torch.empty_like(ft)
        args = (_kernels.tensor_key(9, "x"), 17, _kernels.drop_threshold(0.85), scale_of(0.4))
        assert _torch_kernels.nb_merge(base, ft, out, *args) == 0
        assert torch.equal(out, res["torch"][0])


def test_non_contiguous_input(backend):
    base, ft = torch.randn(20, 30).T, torch.randn(20, 30).T
    out = dare_merge(base, ft, 0.5, seed=0, name="t")
    assert torch.equal(out, dare_merge(base.contiguous(), ft.contiguous(), 0.5, seed=0, name="t"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_delta_names_the_tensor(backend, bad):
    base, ft = torch.zeros(1000), torch.ones(1000)
    ft[500] = bad
    with pytest.raises(ValueError, match="'layer.3.w'.*non-finite"):
        dare_merge(base, ft, 0.5, seed=0, name="layer.3.w")
    with pytest.raises(ValueError, match="non-finite"):
        dare(ft, 0.5, seed=0, name="layer.3.w")


def test_bad_p_q_shape_dtype():
    t = torch.ones(4)
    with pytest.raises(ValueError, match=r"p=1.2 is outside \[0, 1\): p is the drop rate"):
        dare(t, 1.2, seed=0, name="a")
    with pytest.raises(ValueError, match="p=1.0 is outside"):
        dare(t, 1.0, seed=0, name="a")
    with pytest.raises(ValueError, match="q=0.05 is below 1-p=0.1.*force=True"):
        dare(t, 0.9, seed=0, name="a", q=0.05)
    assert dare(t, 0.9, seed=0, name="a", q=0.05, force=True).dtype == torch.float32
    with pytest.raises(ValueError, match="q=1.5 is above 1"):
        dare(t, 0.5, seed=0, name="a", q=1.5)
    with pytest.raises(ValueError, match="q=0 must be > 0"):
        dare(t, 0.5, seed=0, name="a", q=0, force=True)
    with pytest.raises(ValueError, match="'w'.*shape"):
        dare_merge(torch.ones(3), torch.ones(4), 0.5, seed=0, name="w")
    with pytest.raises(TypeError, match="'idx'.*floating"):
        dare(torch.arange(4), 0.5, seed=0, name="idx")
    assert resolve_q(0.9, None) == pytest.approx(0.1)


def _fused(base: torch.Tensor, ft: torch.Tensor, p: float, seed: int, name: str, q: float | None, offset: int = 0):
    from lifelong_delta.delta import _kernels

    out = torch.empty_like(ft)
    counts = _kernels.merge_words(
        dtype_code(ft.dtype),
        _words(base),
        _words(ft),
        _words(out),
        _kernels.tensor_key(seed, name),
        offset,
        _kernels.drop_threshold(p),
        scale_of(q if q is not None else 1 - p),
    )
    return out, counts


def test_the_compiled_kernel_is_built():
    """``pip install -e .`` builds ``_words.c`` where a C compiler exists (setup.py marks it optional, so a failed
    build would otherwise go unnoticed and every prune would take the slower torch path)."""
    from lifelong_delta.delta import _kernels

    assert _kernels.HAVE_WORDS, "lifelong_delta.delta._words is missing: run `make setup` (needs gcc)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1000, 70_001, 2 * 16384 + 17])  # partial blocks and lanes
def test_fused_merge_stats_equals_merge_and_accumulator(dtype, numel):
    from lifelong_delta.delta.summary import PruneStatsAccumulator

    g = torch.Generator().manual_seed(numel)
    base = torch.randn(numel, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(numel, generator=g)).to(dtype)
    ft[::7] = base[::7]  # unchanged entries: nnz before < numel
    for q, offset in ((None, 0), (0.35, 12345), (None, 2**32 - 500)):  # the last crosses a counter segment
        merged, (nbad, nnz_b, nnz_a, sq_b, sq_a) = _fused(base, ft, 0.7, 3, "w", q, offset)
        masks.set_backend("torch")  # the reference: torch ops (dare_merge itself takes the compiled kernel)
        try:
            want = dare_merge(base, ft, 0.7, seed=3, name="w", q=q, offset=offset)
        finally:
            masks.set_backend("auto")
        assert nbad == 0 and torch.equal(merged.view(torch.uint8), want.view(torch.uint8))
        acc = PruneStatsAccumulator("w")
        acc.add(base, ft, want)
        assert (nnz_b, nnz_a) == (acc.nnz_before, acc.nnz_after)
        assert sq_b == pytest.approx(acc.sq_before, rel=1e-5) and sq_a == pytest.approx(acc.sq_after, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1000, 70_001])
def test_fused_merge_stats_counts_non_finite_deltas_exactly(dtype, numel):
    base = torch.zeros(numel, dtype=dtype)
    ft = torch.full((numel,), 1e-3, dtype=dtype)
    ft[[3, numel - 1]] = float("nan")
    base[10] = float("inf")  # inf - 1e-3 is inf: a third bad delta
    assert _fused(base, ft, 0.5, 0, "w", None)[1][0] == 3
    # finite deltas whose squares overflow the fp32 sums are not an error
    huge = torch.zeros(numel, dtype=dtype)
    huge[::2] = 3e38
    assert _fused(torch.zeros(numel, dtype=dtype), huge, 0.5, 0, "w", None)[1][0] == 0
