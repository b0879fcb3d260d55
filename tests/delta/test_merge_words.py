"""The merge on raw words (``merge_words`` over ``_words.c``) against the torch formulas of ``merge``: the same bits
for every method, dtype, weight, λ and chunking, the same TIES cut, the same one-line errors; ``lifelong-delta merge``
writes the same files on both paths, and its word path never imports torch."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_delta.cli import main
from lifelong_delta.delta import _kernels, merge_command, merge_words
from lifelong_delta.delta.merge import MERGE_METHODS, MagnitudeCut, MergeSpec, magnitude_cut, merge_tensor
from tests.delta._checkpoints import perturbed, tiny_state, write_checkpoint

pytestmark = pytest.mark.skipif(not _kernels.HAVE_WORDS, reason="the compiled kernel was not built")

CODES = {torch.float32: "F32", torch.bfloat16: "BF16"}
N = 40_000  # crosses the kernel's blocks of 2048 and, with _SPLIT_FROM lowered, the two-thread split at 16384


def _words(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def _inputs(
    dtypes: tuple[torch.dtype, ...], n: int = N, seed: int = 0, ties: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and fine-tunes of ``dtypes[1:]`` (base ``dtypes[0]``); ``ties``: deltas of a few exact magnitudes."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        base = (torch.randint(-4, 5, (n,), generator=g) * 0.25).to(dtypes[0])
        fts = [(base.float() + torch.randint(-3, 4, (n,), generator=g) * 0.125).to(d) for d in dtypes[1:]]
    else:
        base = torch.randn(n, generator=g).to(dtypes[0])
        fts = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(d) for d in dtypes[1:]]
    return base, fts


def _spec(
    method: str,
    n_models: int,
    normalize: bool,
    weights: tuple[float, ...] | None = None,
    density: tuple[float, ...] = (0.3, 0.55, 0.9),
) -> MergeSpec:
    row = MERGE_METHODS[method]
    if weights is None:  # a negative and a zero weight wherever the method takes them
        weights = (1.0, 0.0, 0.7) if row.consensus and normalize else (1.3, -0.6, 0.0)
    return MergeSpec(
        method,
        weights[:n_models],
        density=None if row.sparsify == "none" else density[:n_models],
        lambda_=0.83,
        normalize=normalize,
        seed=7,
    )


def _word_merge(
    base: torch.Tensor,
    fts: list[torch.Tensor],
    spec: MergeSpec,
    out_dtype: torch.dtype,
    bounds: list[int],
    name: str = "w",
) -> torch.Tensor:
    """The word path over chunks ``bounds[k]:bounds[k + 1]``, TIES' cuts from the whole tensors."""
    cuts = None
    if spec.row.sparsify == "magnitude":
        cuts = [
            merge_words.magnitude_cut_words(CODES[base.dtype], _words(base), CODES[f.dtype], _words(f), d, name=name)
            for f, d in zip(fts, spec.density, strict=True)
        ]
    out = torch.empty(base.numel(), dtype=out_dtype)
    for a, z in itertools.pairwise(bounds):
        merge_words.merge_chunk(
            CODES[out_dtype],
            _words(out[a:z]),
            CODES[base.dtype],
            _words(base[a:z]),
            [(CODES[f.dtype], _words(f[a:z])) for f in fts],
            spec,
            name=name,
            offset=a,
            cuts=cuts,
        )
    return out


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    diff = (got.view(-1).view(torch.uint8) != want.view(-1).view(torch.uint8)).nonzero()
    assert diff.numel() == 0, f"{diff.numel()} bytes differ, first at byte {int(diff[0])}"


DTYPES = {
    "f32": (torch.float32,) * 4,
    "bf16": (torch.bfloat16,) * 4,
    "mixed": (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("method", list(MERGE_METHODS))
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunks_give_the_bits_of_merge_tensor(monkeypatch, method, dtypes, out_dtype, normalize):
    monkeypatch.setattr(_kernels, "_SPLIT_FROM", 1)  # two threads on the longer chunks
    base, fts = _inputs(DTYPES[dtypes], ties=method == "ties")
    spec = _spec(method, 3, normalize)
    want = merge_tensor(base, fts, spec, name="w", out_dtype=out_dtype)
    got = _word_merge(base, fts, spec, out_dtype, [0, 5000, 5001, 9000, N])  # chunks start mid-block, mid-tensor
    _same_bits(got, want)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_weights_lambda_and_model_counts(method):
    base, fts = _inputs((torch.float32, torch.bfloat16, torch.float32), n=3000, seed=3)
    for weights, lam, normalize in [
        ((1.0, 1.0), 1.0, True),
        ((0.0, 0.0), 2.5, True),
        ((2.0, -2.0), 1.0, False),
        ((1e-9, 3e-9), 0.5, True),
        ((0.25, 0.5), -1.0, False),
    ]:
        if MERGE_METHODS[method].consensus and normalize and min(weights) < 0:
            continue
        row = MERGE_METHODS[method]
        spec = MergeSpec(
            method,
            weights,
            density=None if row.sparsify == "none" else (0.4, 0.7),
            lambda_=lam,
            normalize=normalize,
            seed=1,
        )
        _same_bits(
            _word_merge(base, fts, spec, torch.float32, [0, 3000]),
            merge_tensor(base, fts, spec, name="w", out_dtype=torch.float32),
        )
        one = MergeSpec(
            method,
            weights[:1],
            density=None if row.sparsify == "none" else (0.4,),
            lambda_=lam,
            normalize=normalize,
            seed=1,
        )
        _same_bits(
            _word_merge(base, fts[:1], one, torch.bfloat16, [0, 1234, 3000]),
            merge_tensor(base, fts[:1], one, name="w", out_dtype=torch.bfloat16),
        )


@pytest.mark.parametrize("method", ["dare-ties", "darex-q", "ties"])
def test_a_chunk_across_the_32_bit_counter_boundary(method):
    base, fts = _inputs((torch.bfloat16, torch.float32, torch.bfloat16), n=3000, seed=4)
    spec = _spec(method, 2, False)
    offset = (1 << 32) - 1000  # the mask counters of the last 2000 elements belong to the next segment
    cuts = [MagnitudeCut(0.03, offset + 1500)] * 2 if method == "ties" else None
    out = torch.empty(3000, dtype=torch.bfloat16)
    merge_words.merge_chunk(
        "BF16",
        _words(out),
        "BF16",
        _words(base),
        [(CODES[f.dtype], _words(f)) for f in fts],
        spec,
        name="w",
        offset=offset,
        cuts=cuts,
    )
    _same_bits(out, merge_tensor(base, fts, spec, name="w", offset=offset, cuts=cuts))


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_four_models_sum_in_model_order(method):
    base, fts = _inputs((torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float32), n=4000, seed=5)
    for normalize in (True, False):
        spec = _spec(method, 4, normalize, weights=(0.9, 1.1, 0.35, 2.0), density=(0.8, 0.6, 0.9, 0.7))
        _same_bits(
            _word_merge(base, fts, spec, torch.float32, [0, 4000]),
            merge_tensor(base, fts, spec, name="w", out_dtype=torch.float32),
        )


@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear", "darex-q"])
@pytest.mark.parametrize("density", [1e-5, 1.0, 0.5])  # k = 0, k = n, and half of many equal magnitudes
def test_extreme_densities(method, density):
    base, fts = _inputs((torch.float32, torch.float32, torch.bfloat16), n=5000, ties=True)
    spec = MergeSpec(method, (1.0, 0.5), density=(density,), lambda_=1.5, seed=2)
    _same_bits(
        _word_merge(base, fts, spec, torch.float32, [0, 2500, 5000]),
        merge_tensor(base, fts, spec, name="w", out_dtype=torch.float32),
    )


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_cut_equals_the_torch_cut(dtypes, ties):
    base, fts = _inputs(DTYPES[dtypes][:2], n=20_000, ties=ties)
    f = fts[0]
    delta = f.float() - base.float()
    for density in (1e-6, 1e-4, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0):
        want = magnitude_cut(delta, density)
        got = merge_words.magnitude_cut_words(CODES[base.dtype], _words(base), CODES[f.dtype], _words(f), density)
        assert got == want, density
    if ties:  # the cut falls inside a run of equal magnitudes, so the limit decides
        cut = magnitude_cut(delta, 0.3)
        assert int((delta.abs() == cut.value).sum()) > 1000 and 0 < cut.limit < delta.numel()
    zero = torch.zeros(10)
    assert merge_words.magnitude_cut_words("F32", _words(zero), "F32", _words(zero), 0.5) == MagnitudeCut(0.0, 5)


def _outcome(fn) -> str | bytes:
    """The one-line error of ``fn()``, or the bytes it returns."""
    try:
        return bytes(fn())
    except ValueError as e:
        assert "\n" not in str(e)
        return str(e)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
@pytest.mark.parametrize("where", ["base", 0, 1, "overflow"])
def test_non_finite_inputs_give_the_torch_error(method, where):
    base, fts = _inputs((torch.float32, torch.float32, torch.bfloat16), n=300)
    if where == "base":
        base[17] = float("nan")
    elif where == "overflow":  # finite inputs, a delta beyond fp32's range: an error where a mask or cut sees it
        base[5], fts[0][5] = -3e38, 3e38
    else:
        fts[where][40] = float("inf")
        fts[where][41] = float("nan")
    spec = _spec(method, 2, True)
    for cuts in [None, [MagnitudeCut(0.01, 0)] * 2] if spec.row.sparsify == "magnitude" else [None]:

        def torch_path() -> memoryview:
            return _words(merge_tensor(base, fts, spec, name="enc.w", cuts=cuts, out_dtype=torch.float32))  # noqa: B023

        def word_path() -> bytearray:
            out = bytearray(1200)
            models = [(CODES[f.dtype], _words(f)) for f in fts]
            merge_words.merge_chunk("F32", out, CODES[base.dtype], _words(base), models, spec, name="enc.w", cuts=cuts)  # noqa: B023
            return out

        want = _outcome(torch_path)
        assert _outcome(word_path) == want
        assert isinstance(want, str) or (where == "overflow" and (method == "task-arithmetic" or cuts))


def test_convert_words_casts_as_torch():
    x = torch.randn(5000) * 1e3
    x[:6] = torch.tensor([float("inf"), -float("inf"), 3.4e38, -0.0, 1e-40, float("nan")])
    out = torch.empty(5000, dtype=torch.bfloat16)
    _kernels.convert_words("F32", _words(x), "BF16", _words(out))
    _same_bits(out, x.to(torch.bfloat16))
    back = torch.empty(5000)
    _kernels.convert_words("BF16", _words(out), "F32", _words(back))
    _same_bits(back, out.float())


# ------------------------------------------------------------------------------------------------ the command
def _models(root: Path) -> tuple[Path, list[Path]]:
    """A bf16 base, one fp32 and one bf16 fine-tune (a copied head of each dtype), sharded."""
    base_sd = tiny_state(dtype=torch.bfloat16)
    fts = [perturbed(base_sd, scale=0.05, seed=1, dtype=torch.float32), perturbed(base_sd, scale=0.05, seed=2)]
    base = write_checkpoint(root / "base", base_sd, "1KB")
    return base, [write_checkpoint(root / f"ft{i}", sd, "1KB") for i, sd in enumerate(fts)]


ARGS = {
    "task-arithmetic": [],
    "ties": ["--density", "0.4"],
    "dare-linear": ["--p", "0.6"],
    "dare-ties": ["--density", "0.5", "--density", "0.3"],
    "darex-q": ["--density", "0.3", "--q", "0.5"],
}


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_the_command_writes_the_bits_of_the_torch_path(tmp_path, capsys, monkeypatch, method):
    monkeypatch.setattr(merge_command, "_CHUNK_ELEMENTS", 23)
    base, models = _models(tmp_path)
    calls = []
    real = merge_words.merge_chunk
    monkeypatch.setattr(merge_words, "merge_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    files = {}
    for backend, dtype in itertools.product(["auto", "torch"], ["float32", "bfloat16"]):
        monkeypatch.setenv("LIFELONG_DELTA_BACKEND", backend)
        out = tmp_path / f"{backend}-{dtype}"
        args = [
            "merge",
            "--progress",
            "false",
            "--base",
            base,
            "--models",
            *models,
            "--method",
            method,
            "--weights",
            "1",
            "--weights",
            "0.6",
            "--lambda",
            "0.9",
            "--seed",
            "3",
            "--dtype",
            dtype,
            "--exclude",
            "classifier.*",
            "--out",
            out,
            "--out-shard-size",
            "1KB",
            *ARGS[method],
        ]
        main(list(map(str, args)))
        files[backend, dtype] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors*"))}
        assert bool(calls) == (backend == "auto")
        calls.clear()
    capsys.readouterr()
    for dtype in ("float32", "bfloat16"):
        assert files["auto", dtype] and files["auto", dtype] == files["torch", dtype], dtype


def test_the_word_path_never_imports_torch(tmp_path):
    base, models = _models(tmp_path)
    runs = [["--method", m, "--dtype", "bfloat16", *ARGS[m]] for m in MERGE_METHODS]
    code = (
        "import sys\nfrom lifelong_delta.cli import main\n"
        f"for i, extra in enumerate({runs!r}):\n"
        f"    main(['merge', '--progress', 'false', '--base', {str(base)!r}, '--models', "
        f"*{list(map(str, models))!r}, '--exclude', 'classifier.*', '--out', {str(tmp_path)!r} + f'/out{{i}}', "
        "*extra])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'numba') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LIFELONG_DELTA_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]", res.stdout + res.stderr
    assert all(
        (tmp_path / f"out{i}" / "model.safetensors.index.json").is_file()
        or (tmp_path / f"out{i}" / "model.safetensors").is_file()
        for i in range(len(runs))
    )
