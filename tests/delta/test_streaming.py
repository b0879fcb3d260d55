"""stream_prune equals the in-memory prune_tensor loop, for every method, sharded or not, with mixed dtypes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lifelong_delta.delta import streaming
from lifelong_delta.delta.io import INDEX_FILE, CheckpointReader
from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.methods import PruneSpec, prune_tensor
from lifelong_delta.delta.stats import DeltaStats
from lifelong_delta.delta.streaming import stream_delta_stats, stream_prune
from tests.delta._checkpoints import make_pair, perturbed, read_checkpoint, tiny_state

SPECS = [
    PruneSpec("dare", 0.7, seed=3),
    PruneSpec("darex-q", 0.7, q=0.5, seed=3),
    PruneSpec("magnitude", 0.5),
    PruneSpec("structural", 0.5, seed=1),
    PruneSpec("dare", 0.0),
]


def _in_memory(base, ft, spec, input_norms=None):
    out = {}
    for k, v in ft.items():
        if v.is_floating_point() and not is_excluded(k, spec.exclude):
            norms = input_norms.get(k) if input_norms else None
            out[k] = prune_tensor(k, base[k], v, spec, input_norms=norms)
        else:
            out[k] = v
    return out


# The back end changes DARE's path only: auto takes bf16/fp32 tensors through the compiled kernel on raw words
# (without torch), torch takes every tensor through torch.
CASES = [(s, b) for s in SPECS for b in (("auto", "torch") if s.method.startswith("dare") else ("auto",))]


@pytest.mark.parametrize(("spec", "backend"), CASES, ids=lambda c: c if isinstance(c, str) else f"{c.method}-{c.p}")
@pytest.mark.parametrize(("shard", "chunk"), [("1KB", 28), ("1GB", 8 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streaming_equals_in_memory(tmp_path, monkeypatch, spec, backend, shard, chunk, dtype):
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", chunk)  # 28 B: DARE runs in many ragged chunks per tensor
    monkeypatch.setenv("LIFELONG_DELTA_BACKEND", backend)
    base_sd = tiny_state(dtype=dtype)
    ft_sd = perturbed(base_sd)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd, shard_size="700B")
    summary = stream_prune(base, ft, tmp_path / "out", spec, out_shard_size=shard, progress=False)
    got = read_checkpoint(tmp_path / "out")
    want = _in_memory(base_sd, ft_sd, spec)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    if dtype == torch.float32:  # 2.3 KB: sharded at 1KB (the 2-byte dtypes may fit one shard)
        assert ((tmp_path / "out" / INDEX_FILE).exists()) == (shard == "1KB")
    # config/tokenizer files copied; the summary counts what was done
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "tiny"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert summary.copied == ["position_ids"]
    assert len(summary.tensors) == len(base_sd) - 1
    nnz_before = sum(int((ft_sd[k] != base_sd[k]).sum()) for k in want if k != "position_ids")
    nnz_after = sum(int((want[k] != base_sd[k]).sum()) for k in want if k != "position_ids")
    assert summary.kept_fraction == pytest.approx(nnz_after / nnz_before)
    norm_before = (
        sum(float((ft_sd[k].float() - base_sd[k].float()).square().sum()) for k in want if k != "position_ids") ** 0.5
    )
    assert summary.norm_before == pytest.approx(norm_before, rel=1e-5)
    if spec.p == 0.0:
        assert summary.kept_fraction == 1.0 and summary.norm_after == pytest.approx(norm_before, rel=1e-5)


@pytest.mark.parametrize("chunk", [28, 200, 8 << 20])
def test_wanda_streaming_uses_input_norms(tmp_path, monkeypatch, chunk):
    """Top-k within rows streams a block of rows at a time (one row, several with a ragged last block, all)."""
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", chunk)
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    g = torch.Generator().manual_seed(5)
    norms = {k: torch.rand(v.shape[1], generator=g) + 0.1 for k, v in base_sd.items() if v.ndim == 2}
    spec = PruneSpec("wanda", 0.5)
    stream_prune(base, ft, tmp_path / "out", spec, progress=False, input_norms=norms)
    got, want = read_checkpoint(tmp_path / "out"), _in_memory(base_sd, ft_sd, spec, norms)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(ValueError, match="needs calibration input norms.*--calib_data"):
        stream_prune(base, ft, tmp_path / "out2", spec, progress=False)
    assert not (tmp_path / "out2").exists()


def test_dtype_difference_computes_fp32_writes_finetuned_dtype(tmp_path):
    base_sd = tiny_state(dtype=torch.float32)
    ft_sd = perturbed(base_sd, dtype=torch.bfloat16)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    spec = PruneSpec("dare", 0.5, seed=7)
    summary = stream_prune(base, ft, tmp_path / "out", spec, progress=False)
    got = read_checkpoint(tmp_path / "out")
    want = _in_memory(base_sd, ft_sd, spec)
    for k, v in got.items():
        assert v.dtype == ft_sd[k].dtype and torch.equal(v, want[k]), k
    # dropped entries are exactly the base (in bf16), so they do not count as kept
    assert 0.35 < summary.kept_fraction < 0.65


def test_exclude_copies_unchanged_and_allows_head_only_in_finetuned(tmp_path):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    ft_sd["head.weight"] = torch.randn(2, 8)
    del base_sd["classifier.weight"]
    ft_sd.pop("classifier.weight")
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    spec = PruneSpec("dare", 0.9, exclude=("head.*", "embed.*"))
    summary = stream_prune(base, ft, tmp_path / "out", spec, progress=False)
    got = read_checkpoint(tmp_path / "out")
    assert torch.equal(got["head.weight"], ft_sd["head.weight"])
    assert torch.equal(got["embed.weight"], ft_sd["embed.weight"])
    assert set(summary.copied) == {"head.weight", "embed.weight", "position_ids"}
    assert not torch.equal(got["layers.0.weight"], ft_sd["layers.0.weight"])


def test_overwrite_replaces_an_earlier_output(tmp_path):
    base, ft = make_pair(tmp_path)
    out = tmp_path / "out"
    stream_prune(base, ft, out, PruneSpec("dare", 0.5), progress=False)
    stream_prune(base, ft, out, PruneSpec("dare", 0.9), overwrite=True, progress=False)
    assert (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "out"]
    (out / "stale.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds files lifelong-delta did not write \(stale.txt\)"):
        stream_prune(base, ft, out, PruneSpec("dare", 0.5), overwrite=True, progress=False)
    assert (out / "stale.txt").read_text() == "x"


@pytest.mark.parametrize("chunk", [20, 8 << 20])
def test_stream_delta_stats_matches_in_memory(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", chunk)
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd, scale=0.05)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    streamed = stream_delta_stats(base, ft, exclude=("classifier.*",))
    memory = DeltaStats.from_state_dicts(base_sd, ft_sd, exclude=("classifier.*",))
    assert [s.name for s in streamed.layers] == [s.name for s in memory.layers]
    assert "classifier.weight" not in [s.name for s in streamed.layers]
    for a, b in zip(streamed.layers, memory.layers):
        assert a.shape == b.shape and a.numel == b.numel and a.max_abs == b.max_abs
        for attr in ("sum", "sum_sq", "sum_abs", "base_sum_sq"):
            assert getattr(a, attr) == pytest.approx(getattr(b, attr), rel=1e-6, abs=1e-12), attr


def test_reader_reads_from_threads_and_closes_every_shard(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _base, ft = make_pair(tmp_path, shard_size="300B")
    r = CheckpointReader(ft)
    assert len(r.files) > 3
    want = {n: r.get(n) for n in r.names()}
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(r.names() * 8, pool.map(r.get, r.names() * 8)))
    assert all(torch.equal(got[n], want[n]) for n in want)
    fds = list(r._fds.values())
    assert len(fds) == len(r.files)
    r.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_read_ahead_passes_items_errors_and_stops_early():
    assert list(streaming._read_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise ValueError("broken shard")

    with pytest.raises(ValueError, match="broken shard"):
        list(streaming._read_ahead(failing()))
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i

    gen = streaming._read_ahead(endless())
    assert next(gen) == 0
    gen.close()  # the helper thread stops instead of reading everything
    assert len(produced) < 10


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dare_prune_of_bf16_and_fp32_checkpoints_never_imports_torch(tmp_path, dtype):
    """The whole prune, summary included, on the compiled kernel alone: a process that never imports torch (nor
    numpy) writes the same bytes as the torch path (``LIFELONG_DELTA_BACKEND=torch``)."""
    import subprocess
    import sys

    base_sd = tiny_state(dtype=getattr(torch, dtype))
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=perturbed(base_sd), shard_size="700B")
    script = (
        "import sys\n"
        "from lifelong_delta.delta.methods import PruneSpec\n"
        "from lifelong_delta.delta.streaming import stream_prune\n"
        "s = stream_prune(sys.argv[1], sys.argv[2], sys.argv[3], PruneSpec('darex-q', 0.7, q=0.4, seed=5),\n"
        "                 out_shard_size='1KB', progress=False)\n"
        "print(s.kept_fraction, s.norm_after, 'torch' in sys.modules or 'numpy' in sys.modules)\n"
    )
    runs = {}
    for backend in ("auto", "torch"):
        env = {**os.environ, "LIFELONG_DELTA_BACKEND": backend}
        out = tmp_path / f"out-{backend}"
        done = subprocess.run(
            [sys.executable, "-c", script, str(base), str(ft), str(out)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        kept, norm, heavy_loaded = done.stdout.split()
        runs[backend] = (float(kept), float(norm), heavy_loaded, read_checkpoint(out))
    assert runs["auto"][2] == "False" and runs["torch"][2] == "True"
    assert runs["auto"][0] == runs["torch"][0]
    assert runs["auto"][1] == pytest.approx(runs["torch"][1], rel=1e-6)
    got, want = runs["auto"][3], runs["torch"][3]
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
