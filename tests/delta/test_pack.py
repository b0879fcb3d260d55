"""``lifelong-delta pack`` / ``unpack``: a pack holds only what ``prune`` changed, and unpacking it onto the base
gives ``prune``'s files bit for bit, for every method, dtype, layout and input kind."""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lifelong_delta.cli import main
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.methods import PruneSpec
from lifelong_delta.delta.pack import stream_pack
from lifelong_delta.delta.pack_format import DATA_FILE, read_manifest, varint_decode, varint_encode
from lifelong_delta.delta.streaming import stream_prune
from lifelong_delta.delta.unpack import stream_unpack
from tests.delta._checkpoints import (
    calib_args,
    leftovers,
    make_pair,
    perturbed,
    run_cli,
    tiny_llama_pair,
    tiny_state,
    write_checkpoint,
    write_text_data,
)
from tests.delta.test_lora_merge import _setup as lora_setup


def same_files(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` (but the output marker, which names the command) is byte-identical."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and not p.name.startswith("."))
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def roundtrip(tmp_path: Path, base: Path, ft: Path, spec: PruneSpec, shard: str = "2GB", **kw) -> Path:
    stream_prune(base, ft, tmp_path / "pruned", spec, progress=False, out_shard_size=shard, **kw)
    stream_pack(base, ft, tmp_path / "x.delta", spec, progress=False, **kw)
    stream_unpack(base, tmp_path / "x.delta", tmp_path / "unpacked", progress=False, out_shard_size=shard)
    same_files(tmp_path / "pruned", tmp_path / "unpacked")
    return tmp_path / "x.delta"


@pytest.mark.parametrize(
    "values", [[0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**35 + 3, 2**63 - 1, 2**64 - 1], list(range(300))]
)
def test_varints_round_trip_and_leave_a_cut_off_tail(values):
    enc = varint_encode(np.array(values, dtype=np.uint64))
    assert len(enc) == sum(max(1, -(-int(v).bit_length() // 7)) for v in values)
    dec, used = varint_decode(enc)
    assert used == len(enc) and dec.tolist() == values
    cut = enc[:-1] if enc[-1] < 0x80 and len(values) > 1 and values[-1] >= 128 else enc
    dec, used = varint_decode(cut)
    assert dec.tolist() == values[: len(dec)] and used <= len(cut)


SPECS = [
    PruneSpec("dare", 0.9, seed=3),
    PruneSpec("darex-q", 0.9, q=0.2, seed=1),
    PruneSpec("magnitude", 0.7),
    PruneSpec("magnitude", 0.5, q=0.6),
    PruneSpec("structural", 0.5, seed=2),
    PruneSpec("structural", 0.5, structural_axis="columns", structural_select="importance"),
    PruneSpec("dare", 0.5, exclude=("classifier.*", "layers.1.*")),
]


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
    ids=["f32", "bf16", "f16", "f32-base-bf16-ft"],
)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.structural_axis}-{len(s.exclude)}")
def test_unpack_gives_prunes_files_bit_for_bit(tmp_path, spec, dtypes):
    base_sd = tiny_state(dtype=dtypes[0])
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=perturbed(base_sd, dtype=dtypes[1]))
    pack = roundtrip(tmp_path, base, ft, spec, shard="1KB")  # several output shards and an index
    kinds = {e.name: e.kind for e in read_manifest(pack).tensors}
    assert kinds["position_ids"] == "copy"
    expected = {"dare": "mask", "darex-q": "mask", "magnitude": "gaps"}.get(spec.method, spec.structural_axis)
    assert kinds["layers.0.weight"] == expected
    assert kinds["layers.1.weight"] == ("copy" if spec.exclude else expected)
    assert kinds["layers.0.bias"] in ("mask", "gaps", "copy")


def test_wanda_and_per_tensor_q_and_a_name_prefix(tmp_path):
    base_sd = tiny_state()
    ft_sd = {f"bert.{k}": v for k, v in perturbed(base_sd).items()}  # names differ by a prefix
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    norms = {f"bert.layers.{i}.weight": torch.rand(8) + 0.1 for i in range(3)}
    norms |= {"bert.embed.weight": torch.rand(8), "bert.classifier.weight": torch.rand(8)}
    roundtrip(tmp_path / "w", base, ft, PruneSpec("wanda", 0.6), input_norms=norms)
    q = {f"bert.layers.{i}.weight": 0.3 + 0.1 * i for i in range(3)}
    pack = roundtrip(tmp_path / "q", base, ft, PruneSpec("darex-q", 0.8, q=0.5), q_per_tensor=q)
    m = read_manifest(pack)
    assert m.q_per_tensor == q
    assert {e.name: e.base_name for e in m.tensors}["bert.layers.2.weight"] == "layers.2.weight"


def test_a_lora_adapter_packs_its_pruned_product(tmp_path):
    lora_setup(tmp_path)
    for method in ("dare", "magnitude"):
        args = [
            "--base",
            str(tmp_path / "base"),
            "--finetuned",
            str(tmp_path / "adapter"),
            "--method",
            method,
            "--p",
            "0.5",
            "--exclude",
            "layers.2.*",
            "--progress",
            "false",
        ]
        main(["prune", *args, "--out", str(tmp_path / f"{method}-pruned")])
        main(["pack", *args, "--out", str(tmp_path / f"{method}.delta")])
        main(
            [
                "unpack",
                "--base",
                str(tmp_path / "base"),
                "--delta",
                str(tmp_path / f"{method}.delta"),
                "--out",
                str(tmp_path / f"{method}-unpacked"),
                "--progress",
                "false",
            ]
        )
        same_files(tmp_path / f"{method}-pruned", tmp_path / f"{method}-unpacked")
        kinds = {e.name: e.kind for e in read_manifest(tmp_path / f"{method}.delta").tensors}
        assert kinds["embed.weight"] == "base" and kinds["layers.2.weight"] == "gaps"  # excluded: merged unpruned
        assert kinds["layers.0.weight"] == ("mask" if method == "dare" else "gaps")
        assert not (tmp_path / f"{method}.delta" / "files").exists()  # the base's files are not stored twice


def test_a_random_mask_pack_holds_the_kept_values_and_little_else(tmp_path):
    """The issue's goal: at p = 0.99 a random-mask pack is at most 1.05 (1 - p) of the fine-tune + 64 KiB."""
    g = torch.Generator().manual_seed(0)
    base_sd = {f"layers.{i}.weight": torch.randn(256, 1024, generator=g).to(torch.bfloat16) for i in range(4)}
    base, ft = make_pair(tmp_path, base_sd=base_sd, shard_size="10GB")
    for p in (0.9, 0.99):
        pack = tmp_path / f"{p}.delta"
        stream_pack(base, ft, pack, PruneSpec("dare", p), progress=False)
        dense = sum(t.numel() * 2 for t in base_sd.values())
        size = sum(f.stat().st_size for f in pack.rglob("*") if f.is_file())
        assert size <= 1.05 * (1 - p) * dense + 64 * 1024, (p, size, dense)
        with CheckpointReader(pack / DATA_FILE) as r:
            kept = sum(r.info(n).numel for n in r.names())
        assert abs(kept / (dense / 2) - (1 - p)) < 0.002  # values only: one per kept entry, no index


def test_magnitude_indices_cost_about_a_byte_per_kept_entry(tmp_path):
    g = torch.Generator().manual_seed(0)
    base_sd = {"w": torch.randn(512, 512, generator=g)}
    base, ft = make_pair(tmp_path, base_sd=base_sd, shard_size="10GB")
    stream_pack(base, ft, tmp_path / "m.delta", PruneSpec("magnitude", 0.9), progress=False)
    with CheckpointReader(tmp_path / "m.delta" / DATA_FILE) as r:
        index, values = r.info("index/w").numel, r.info("values/w").numel
    assert values == 512 * 51  # top-k of each row
    assert values <= index < 2 * values  # gaps of about 10: one byte each, a few two


def _files(tmp_path: Path) -> tuple[Path, Path]:
    base, ft = make_pair(tmp_path)
    (ft / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8, "num_labels": 3}))
    (ft / "sub").mkdir()
    (ft / "sub" / "notes.txt").write_text("fine-tune only")
    return base, ft


def test_files_that_differ_from_the_base_travel_in_the_pack(tmp_path):
    base, ft = _files(tmp_path)
    pack = roundtrip(tmp_path, base, ft, PruneSpec("dare", 0.5))
    files = read_manifest(pack).files
    assert {k: v["stored"] for k, v in files.items()} == {
        "config.json": True,
        "sub/notes.txt": True,
        "tokenizer_config.json": False,
    }
    assert sorted(str(p.relative_to(pack / "files")) for p in (pack / "files").rglob("*") if p.is_file()) == [
        "config.json",
        "sub/notes.txt",
    ]


def _cli(*args: object) -> subprocess.CompletedProcess:
    """The CLI in an environment of only ``HF_HUB_OFFLINE`` and a system ``PATH``."""
    return run_cli(*args, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_cli_pack_unpack_end_to_end(tmp_path):
    base, ft = _files(tmp_path)
    options = ["--base", base, "--finetuned", ft, "--method", "darex-q", "--p", "0.8", "--q", "0.5", "--seed", "4"]
    res = _cli("pack", *options, "--out", tmp_path / "x.delta", "--exclude", "classifier.*")
    assert res.returncode == 0, res.stderr
    assert "packed" in res.stdout and "of the" in res.stdout
    assert _cli("prune", *options, "--out", tmp_path / "pruned", "--exclude", "classifier.*").returncode == 0
    unpack = ("unpack", "--base", base, "--delta", tmp_path / "x.delta")
    res = _cli(*unpack, "--out", tmp_path / "un")
    assert res.returncode == 0, res.stderr
    same_files(tmp_path / "pruned", tmp_path / "un")
    # --overwrite replaces the tool's own output, and only that
    assert _cli(*unpack, "--out", tmp_path / "un").returncode == 2
    assert _cli(*unpack, "--out", tmp_path / "un", "--overwrite").returncode == 0
    res = _cli(*unpack, "--out", ft, "--overwrite")
    assert res.returncode == 2 and "--finetuned" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli("pack", "--base", base, "--finetuned", ft, "--p", "0.5", "--out", ft / "inner.delta")
    assert res.returncode == 2 and not (ft / "inner.delta").exists()


def _big_and_small() -> dict[str, torch.Tensor]:
    """A base state whose tensor ``big`` reaches beyond the first 64 KiB that unpack checks up front."""
    return {"big": torch.randn(40_000, generator=torch.Generator().manual_seed(0)), "small": torch.ones(4)}


def _pair_and_pack(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, ft = make_pair(tmp_path, base_sd=_big_and_small())
    stream_pack(base, ft, tmp_path / "x.delta", PruneSpec("dare", 0.9), progress=False)
    return base, ft, tmp_path / "x.delta"


@pytest.mark.parametrize("change", ["tail", "head", "shape", "missing", "file"])
def test_a_wrong_base_is_a_one_line_error_and_writes_nothing(tmp_path, change):
    _base, _ft, pack = _pair_and_pack(tmp_path)
    sd = _big_and_small()
    if change == "tail":  # beyond the first 64 KiB checked up front: found while streaming
        sd["big"][-1] += 1
    elif change == "head":
        sd["big"][0] += 1
    elif change == "shape":
        sd["small"] = torch.ones(5)
    elif change == "missing":
        del sd["small"]
    other = write_checkpoint(tmp_path / "other", sd)
    if change == "file":
        (other / "tokenizer_config.json").write_text('{"changed": true}')
    res = _cli("unpack", "--base", other, "--delta", pack, "--out", tmp_path / "out", "--progress", "false")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 2  # the "unpack: ..." line and one error line
    assert "error:" in res.stderr and ("not the base" in res.stderr)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_not_a_pack(tmp_path):
    base, ft = make_pair(tmp_path)
    res = _cli("unpack", "--base", base, "--delta", ft, "--out", tmp_path / "out")
    assert res.returncode == 2 and "not a packed delta" in res.stderr and not (tmp_path / "out").exists()
    (tmp_path / "x.delta").mkdir()
    (tmp_path / "x.delta" / "manifest.json").write_text('{"format": "lifelong-delta-pack", "version": 99}')
    res = _cli("unpack", "--base", base, "--delta", tmp_path / "x.delta", "--out", tmp_path / "out")
    assert res.returncode == 2 and "upgrade" in res.stderr


def test_a_decoder_packs_through_the_calibrated_cli(tmp_path):
    tiny_llama_pair(tmp_path, tie_word_embeddings=True)
    data = write_text_data(tmp_path / "calib.jsonl", (f"line {i} of some calibration text" for i in range(6)))
    common = calib_args(tmp_path, data, "--method", "wanda", "--progress", "false")
    assert _cli("prune", *common, "--out", tmp_path / "pruned").returncode == 0
    res = _cli("pack", *common, "--out", tmp_path / "x.delta")
    assert res.returncode == 0, res.stderr
    res = _cli("unpack", "--base", tmp_path / "base", "--delta", tmp_path / "x.delta", "--out", tmp_path / "un")
    assert res.returncode == 0, res.stderr
    same_files(tmp_path / "pruned", tmp_path / "un")
