"""One way to add a method: a toy method registered in this file runs through ``prune``, ``pack``/``unpack`` and
``merge`` with no other change, because every consumer reads its registry row."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import get_args

import pytest
import torch

from lifelong_delta.cli import main
from lifelong_delta.delta import streaming
from lifelong_delta.delta.choices import MethodName
from lifelong_delta.delta.merge import MERGE_METHODS, MergeMethod
from lifelong_delta.delta.merge_command import merge
from lifelong_delta.delta.methods import METHODS, Method, PruneSpec, prune_tensor, register_method
from lifelong_delta.delta.pack_format import read_manifest
from tests.delta._checkpoints import make_pair, perturbed, read_checkpoint, tiny_state, write_checkpoint
from tests.delta.test_pack import roundtrip, same_files


# ------------------------------------------------------------------------------------------------- the toy method
def stride_keep(
    name: str, delta: torch.Tensor, spec: PruneSpec, *, input_norms: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """Keep every k-th entry by flat index, k = round(1 / (1 - p)): at p = 0.5 the entries of even index."""
    k = max(1, round(1.0 / (1.0 - spec.p)))
    index = torch.arange(offset, offset + delta.numel(), device=delta.device)
    return (index % k == 0).view(delta.shape)


STRIDE = Method(stride_keep, "https://example.org/stride", "dare", rescales=("none", "dare"), elementwise=True)


@pytest.fixture
def stride():
    """``stride`` as a pruning method and ``stride-linear`` as a merge method, removed afterwards."""
    register_method("stride", STRIDE)
    MERGE_METHODS["stride-linear"] = MergeMethod("random", False, "density", False, STRIDE.paper, mask_method="stride")
    yield
    METHODS.pop("stride")
    MERGE_METHODS.pop("stride-linear")


def _expected(base: torch.Tensor, ft: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """Brute force: θ_pre + δ·scale at every k-th flat index, θ_pre elsewhere (fp32, then ft's dtype)."""
    b, d = base.float().reshape(-1), ft.float().reshape(-1) - base.float().reshape(-1)
    out = b.clone()
    out[::k] = b[::k] + d[::k] * scale
    return out.view(base.shape).to(ft.dtype)


# -------------------------------------------------------------------------------------------------------- tests
def test_the_built_in_rows_are_the_method_names_of_the_type_hints():
    assert list(get_args(MethodName)) == list(METHODS)
    assert all(METHODS[m].elementwise for m in METHODS if METHODS[m].random_mask)


def test_registering_checks_the_row_and_the_name(stride):
    assert METHODS["stride"] is STRIDE and PruneSpec("stride", 0.5).rescale == "dare"
    with pytest.raises(ValueError, match="already registered"):
        register_method("stride", STRIDE)
    with pytest.raises(ValueError, match="must be letters"):
        register_method("bad name", STRIDE)
    with pytest.raises(ValueError, match="set elementwise=True"):
        Method(stride_keep, "x", "dare", random_mask=True)
    with pytest.raises(ValueError, match="not among its rescales"):
        Method(stride_keep, "x", "q", rescales=("none",))
    with pytest.raises(ValueError, match="rescale='q' does not apply to method='stride'"):
        PruneSpec("stride", 0.5, rescale="q")
    with pytest.raises(ValueError, match="q is set but method='stride' rescales by 1/\\(1-p\\); use method='darex-q'"):
        PruneSpec("stride", 0.5, q=0.7)


def test_prune_runs_the_toy_method_from_the_cli_chunk_by_chunk(stride, tmp_path, monkeypatch):
    base, ft = make_pair(tmp_path)
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", 28)  # 7 fp32 entries a chunk: the mask must honour offsets
    main(
        [
            "prune",
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(tmp_path / "out"),
            "--method",
            "stride",
            "--p",
            "0.5",
            "--exclude",
            "classifier.*",
            "--progress",
            "false",
        ]
    )
    b, f, got = read_checkpoint(base), read_checkpoint(ft), read_checkpoint(tmp_path / "out")
    assert set(got) == set(f)
    for name, t in got.items():
        if name == "position_ids" or name.startswith("classifier."):
            assert torch.equal(t, f[name]), name
        else:
            assert torch.equal(t, _expected(b[name], f[name], 2, 2.0)), name
            assert torch.equal(t, prune_tensor(name, b[name], f[name], PruneSpec("stride", 0.5))), name


def test_cli_lists_the_registered_methods_in_its_error(stride, tmp_path, capsys):
    base, ft = make_pair(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "prune",
                "--base",
                str(base),
                "--finetuned",
                str(ft),
                "--out",
                str(tmp_path / "out"),
                "--method",
                "strides",
                "--progress",
                "false",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--method: expected one of dare, darex-q, magnitude, wanda, structural, stride, got 'strides'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_stores_the_toy_methods_kept_entries_and_unpacks_to_prunes_files(stride, tmp_path, dtype):
    base_sd = tiny_state(dtype=dtype)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=perturbed(base_sd, dtype=dtype))
    pack = roundtrip(tmp_path, base, ft, PruneSpec("stride", 0.75, seed=3))
    manifest = read_manifest(pack)
    assert manifest.method == "stride"
    kinds = {e.name: e.kind for e in manifest.tensors}
    assert kinds["layers.0.weight"] == "gaps" and kinds["position_ids"] == "copy"
    assert next(e for e in manifest.tensors if e.name == "layers.0.weight").kept == 16  # every 4th of 64
    METHODS.pop("stride")  # unpacking needs no registry row: the pack says where the kept entries are
    try:
        from lifelong_delta.delta.unpack import stream_unpack

        stream_unpack(base, pack, tmp_path / "again", progress=False)
        same_files(tmp_path / "pruned", tmp_path / "again")
    finally:
        register_method("stride", STRIDE)


def test_merge_draws_the_toy_methods_mask_for_each_model(stride, tmp_path):
    base_sd = tiny_state()
    base = write_checkpoint(tmp_path / "base", base_sd)
    fts = [write_checkpoint(tmp_path / f"ft{i}", perturbed(base_sd, seed=i + 1)) for i in range(2)]
    merge(
        str(tmp_path / "one"),
        base=str(base),
        models=[str(fts[0])],
        method="stride-linear",
        density=[0.5],
        progress=False,
    )
    main(
        [
            "prune",
            "--base",
            str(base),
            "--finetuned",
            str(fts[0]),
            "--out",
            str(tmp_path / "pruned"),
            "--method",
            "stride",
            "--p",
            "0.5",
            "--progress",
            "false",
        ]
    )
    one, pruned = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "pruned")
    for name in one:  # a one-model merge is the prune: same mask, same rescale 1/d = 1/(1-p)
        assert torch.equal(one[name], pruned[name]), name
    merge(
        str(tmp_path / "two"),
        base=str(base),
        models=[str(f) for f in fts],
        method="stride-linear",
        weights=[1.0, 0.5],
        density=[0.5, 0.25],
        progress=False,
    )
    two, f = read_checkpoint(tmp_path / "two"), [read_checkpoint(p) for p in fts]
    for name, b in base_sd.items():
        if not b.is_floating_point():
            continue
        d0, d1 = (x[name].reshape(-1) - b.reshape(-1) for x in f)
        tau = torch.zeros_like(d0)
        tau[::2] += d0[::2] * 2.0
        tau[::4] += 0.5 * (d1[::4] * 4.0)
        assert torch.allclose(two[name].reshape(-1), b.reshape(-1) + tau, rtol=0, atol=1e-6), name


def test_a_merge_row_must_name_an_element_wise_pruning_method(stride):
    from lifelong_delta.delta.merge import MergeSpec

    MERGE_METHODS["stride-linear"] = MergeMethod(
        "random", False, "density", False, STRIDE.paper, mask_method="magnitude"
    )
    with pytest.raises(ValueError, match="'magnitude', which is not a registered element-wise method"):
        MergeSpec("stride-linear", (1.0,), density=(0.5,))  # type: ignore[arg-type]


def test_prune_help_lists_the_built_in_methods_without_torch(tmp_path):
    code = (
        "import sys\nfrom lifelong_delta.cli import main\n"
        "try:\n    main(['prune', '--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
    )
    assert res.stdout.splitlines()[-2:] == ["exit 0", "False"], res.stdout + res.stderr
    assert "dare | darex-q | magnitude | wanda | structural" in res.stdout
