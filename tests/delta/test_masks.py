"""Counter-based masks: statistics, determinism, chunking, and numba == torch bit for bit."""

import itertools
import math
import os

import numpy as np
import pytest
import torch

from lifelong_delta.delta import _kernels, masks
from lifelong_delta.delta.masks import drop_threshold, keep_mask, tensor_key, uniform

BACKENDS = ["torch"] + (["numba"] if masks.numba_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    masks.set_backend(request.param)
    yield request.param
    masks.set_backend("auto")


def _ref_words(key: int, idx: np.ndarray) -> np.ndarray:
    """Pure-Python-integer reference of the documented hash (independent of both back ends)."""
    k0, k1 = key & 0xFFFFFFFF, key >> 32

    def lb32(x):
        x = (x ^ (x >> 16)) & 0xFFFFFFFF
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = (x ^ (x >> 15)) & 0xFFFFFFFF
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return (x ^ (x >> 16)) & 0xFFFFFFFF

    out = []
    for i in idx.tolist():
        kr = (k1 + (i >> 32) * 0x9E3779B9) & 0xFFFFFFFF
        out.append(lb32(lb32((i & 0xFFFFFFFF) ^ k0) ^ kr))
    return np.array(out, dtype=np.uint64)


def test_tensor_key_depends_on_seed_and_name():
    assert tensor_key(0, "a") == tensor_key(0, "a")
    assert len({tensor_key(s, n) for s in (0, 1, -1) for n in ("a", "b", "a.weight")}) == 9
    assert 0 <= tensor_key(123, "x") < 2**64


def test_matches_reference_hash(backend):
    key = tensor_key(7, "layer.weight")
    words = _ref_words(key, np.arange(300))
    p = 0.37
    expect = words >= drop_threshold(p)
    got = keep_mask(300, p, seed=7, name="layer.weight").numpy()
    assert np.array_equal(got, expect)
    u = uniform(300, seed=7, name="layer.weight").numpy()
    assert np.array_equal(u, ((words >> 8).astype(np.float32) * np.float32(2.0**-24)))


def test_fraction_dropped_close_to_p(backend):
    n = 200_000
    for p in (0.1, 0.5, 0.9, 0.99):
        dropped = (~keep_mask(n, p, seed=3, name=f"w{p}")).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(dropped - p) < 5 * sigma, (p, dropped)


def test_uniform_is_uniform(backend):
    u = uniform(100_000, seed=1, name="u")
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.006  # 5 sigma ~ 5*sqrt(.09/1e5)=0.0047


def test_p_zero_keeps_all(backend):
    assert keep_mask(1000, 0.0, seed=0, name="a").all()


def test_different_names_and_seeds_give_independent_masks(backend):
    n, p = 100_000, 0.5
    a = keep_mask(n, p, seed=0, name="layers.0.weight")
    b = keep_mask(n, p, seed=0, name="layers.1.weight")
    c = keep_mask(n, p, seed=1, name="layers.0.weight")
    assert torch.equal(a, keep_mask(n, p, seed=0, name="layers.0.weight"))
    for other in (b, c):
        agree = (a == other).double().mean().item()
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)


def test_chunks_concatenate_to_whole(backend):
    whole = keep_mask(10_007, 0.3, seed=5, name="t")
    cuts = [0, 1, 999, 4096, 7000, 10_007]
    parts = [keep_mask(b - a, 0.3, seed=5, name="t", offset=a) for a, b in itertools.pairwise(cuts)]
    assert torch.equal(torch.cat(parts), whole)
    uw = uniform(5000, seed=5, name="t")
    parts = [uniform(1234, seed=5, name="t"), uniform(3766, seed=5, name="t", offset=1234)]
    assert torch.equal(torch.cat(parts), uw)


def test_offsets_beyond_32_bits_use_the_segment_key(backend):
    off = 2**32 - 5
    got = keep_mask(10, 0.5, seed=2, name="big", offset=off).numpy()
    words = _ref_words(tensor_key(2, "big"), np.arange(off, off + 10, dtype=np.uint64))
    assert np.array_equal(got, words >= drop_threshold(0.5))
    assert _kernels.segments(off, 10) == [(0, 5, 2**32 - 5, 0), (5, 10, 0, 1)]


@pytest.mark.skipif(not masks.numba_available(), reason="numba not installed")
def test_numba_and_torch_agree_bit_for_bit():
    masks.set_backend("numba")
    try:
        a = keep_mask(70_001, 0.77, seed=11, name="x", offset=3)
        ua = uniform(70_001, seed=11, name="x", offset=3)
    finally:
        masks.set_backend("torch")
    try:
        b = keep_mask(70_001, 0.77, seed=11, name="x", offset=3)
        ub = uniform(70_001, seed=11, name="x", offset=3)
    finally:
        masks.set_backend("auto")
    assert torch.equal(a, b) and torch.equal(ua, ub)


@pytest.mark.skipif(not masks.numba_available(), reason="numba not installed")
def test_the_compiled_torch_path_gives_the_numba_bits(tmp_path, monkeypatch):
    """``set_backend("compile")``: the hash as one ``torch.compile`` graph (C++ here, Triton on a GPU), for masks,
    uniforms and merges, across a 2**32 counter segment, equals numba bit for bit; one graph serves every key."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # 0.3 GB, not left in /tmp
    from lifelong_delta.delta import _torch_kernels
    from lifelong_delta.delta.dare import dare_merge

    base, ft = torch.randn(40_001), torch.randn(40_001)
    cases = [(40_001, 3, "x"), (10, 2**32 - 5, "big"), (999, 0, "another name")]
    results = {}
    for b in ("numba", "compile"):
        masks.set_backend(b)
        try:
            results[b] = [
                (keep_mask(n, 0.77, seed=11, name=nm, offset=off), uniform(n, seed=11, name=nm, offset=off))
                for n, off, nm in cases
            ]
            results[b].append(
                (
                    dare_merge(base, ft, 0.6, seed=2, name="w", q=0.5),
                    dare_merge(base.bfloat16(), ft.bfloat16(), 0.6, seed=2, name="w"),
                )
            )
        finally:
            masks.set_backend("auto")
    for (a, ua), (c, uc) in zip(results["numba"], results["compile"], strict=True):
        assert torch.equal(a, c) and torch.equal(ua, uc)
    assert "hash" in _torch_kernels._compiled  # the compiled graph ran, not the eager ops


def test_bad_inputs():
    with pytest.raises(ValueError, match="p=1.2 is outside"):
        keep_mask(10, 1.2, seed=0, name="a")
    with pytest.raises(ValueError, match="outside"):
        keep_mask(10, -0.1, seed=0, name="a")
    with pytest.raises(ValueError, match="numel"):
        keep_mask(-1, 0.1, seed=0, name="a")
    with pytest.raises(ValueError, match="offset"):
        uniform(3, seed=0, name="a", offset=-1)
    with pytest.raises(TypeError, match="name"):
        tensor_key(0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        masks.set_backend("cuda")  # type: ignore[arg-type]


@pytest.mark.skipif(not masks.numba_available() or not hasattr(os, "fork"), reason="needs numba and os.fork")
def test_forked_child_gets_the_same_bits_without_aborting():
    """GNU OpenMP is not fork-safe: a child of a process that used numba's pool must run serially."""
    from lifelong_delta.delta.dare import dare_merge

    base, ft = torch.randn(1 << 17), torch.randn(1 << 17)
    masks.set_backend("numba")
    try:
        parent = dare_merge(base, ft, 0.5, seed=0, name="x")  # starts the parallel pool (>= 2**16 elements)
        pid = os.fork()
        if pid == 0:  # child: only numpy comparisons, no torch intra-op threads
            code = 3
            try:
                torch.set_num_threads(1)
                child = dare_merge(base, ft, 0.5, seed=0, name="x")
                code = 0 if (child.numpy() == parent.numpy()).all() else 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        masks.set_backend("auto")
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_parallel_mask_leaves_torchs_thread_count_alone():
    """numba's OpenMP pool shares torch's thread count; a one-thread process must stay one-thread."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from lifelong_delta.delta.masks import keep_mask\n"
        "keep_mask(1 << 20, 0.9, seed=0, name='w'); keep_mask(1 << 20, 0.5, seed=1, name='w')\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "1"
