"""Streaming checkpoint reader/writer: round trips, sharding, atomic output, HF layout."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lifelong_delta.delta.io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    CheckpointReader,
    copy_non_weight_files,
    parse_size,
)
from lifelong_delta.delta.writer import ShardedWriter
from lifelong_delta.outputs import MARKER, OutputPathError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64] * 2):
        out[f"layers.{i}.weight"] = torch.randn(17, 9 + i, generator=g).to(dtype)
    out["position_ids"] = torch.arange(12).view(1, 12)
    out["mask"] = torch.tensor([True, False, True])
    out["empty"] = torch.zeros(0, 4)
    out["scalar"] = torch.tensor(3.5)
    return out


@pytest.mark.parametrize("size", ["1KB", 10**9])
def test_roundtrip_sharded_and_single(tmp_path, size):
    ts = _tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, size) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.commit()
    files = sorted(f for f in os.listdir(out) if f != MARKER)
    if size == "1KB":
        n = len([f for f in files if f.endswith(".safetensors")])
        assert n > 2 and INDEX_FILE in files and SINGLE_FILE not in files
        assert files[0] == f"model-00001-of-{n:05d}.safetensors"
        index = json.loads((out / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(ts)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
        for name, fname in index["weight_map"].items():  # every tensor is in the file the index names
            assert name in load_file(out / fname)
    else:
        assert files == [SINGLE_FILE]
    # the official safetensors reader agrees bit for bit, and sees the metadata
    for f in [out / f for f in files if f.endswith(".safetensors")]:
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for k in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert torch.equal(sf.get_tensor(k), ts[k]) and sf.get_tensor(k).dtype == ts[k].dtype
    r = CheckpointReader(out)
    assert set(r.names()) == set(ts) and len(r) == len(ts)
    for k, v in ts.items():
        got = r.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v)
        assert r.shape(k) == tuple(v.shape) and r.dtype(k) == v.dtype and k in r
    assert "nope" not in r


def test_raw_reads_and_views_are_the_stored_bytes(tmp_path):
    """``read_into`` (a copy) and ``view`` (a mapped range) give the bytes of any element range, at any offset in
    a shard (mappings start at page boundaries, ranges do not)."""
    ts = _tensors()
    with ShardedWriter(tmp_path / "o", 3000) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.commit()
    r = CheckpointReader(tmp_path / "o")
    for k, v in ts.items():
        raw = v.contiguous().view(-1).view(torch.uint8).numpy()
        size, n = v.element_size(), v.numel()
        assert (
            r.code(k)
            == {
                torch.float32: "F32",
                torch.bfloat16: "BF16",
                torch.float16: "F16",
                torch.float64: "F64",
                torch.int64: "I64",
                torch.bool: "BOOL",
            }[v.dtype]
        )
        for start, count in ((0, n), (min(3, n), max(n - 5, 0)), (max(n - 1, 0), min(n, 1)), (n, 0)):
            want = raw[start * size : (start + count) * size]
            buf = bytearray(count * size)
            assert bytes(r.read_into(k, start, count, buf)) == want.tobytes()
            view = r.view(k, start, count)
            assert view.readonly and bytes(view) == want.tobytes()
        with pytest.raises(IndexError):
            r.view(k, 1, n)
    r.close()


def test_shard_limit_respected(tmp_path):
    ts = {f"t{i}": torch.ones(250) for i in range(10)}  # 1000 bytes each
    with ShardedWriter(tmp_path / "o", 2500) as w:
        for k, v in ts.items():
            w.add(k, v)
        w.commit()
    shards = sorted(p for p in (tmp_path / "o").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == 5  # two tensors per shard: a third would exceed 2500 bytes
    with ShardedWriter(tmp_path / "big", 10) as w:  # a tensor larger than the limit gets its own shard
        w.add("a", torch.ones(100))
        w.add("b", torch.ones(100))
        w.commit()
    assert len(list((tmp_path / "big").glob("*.safetensors"))) == 2


def test_reader_single_file_and_dir_written_by_safetensors(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    (tmp_path / "d").mkdir()
    save_file(ts, tmp_path / "d" / SINGLE_FILE)
    for path in (tmp_path / "x.safetensors", tmp_path / "d"):
        r = CheckpointReader(path)
        assert dict(r.__iter__()).keys() == ts.keys()
        for k, v in r:
            assert torch.equal(v, ts[k])


def test_reader_get_owns_memory(tmp_path):
    save_file({"a": torch.arange(6.0)}, tmp_path / "a.safetensors")
    r = CheckpointReader(tmp_path / "a.safetensors")
    t = r.get("a")
    t += 1  # writable, independent of the file
    assert torch.equal(r.get("a"), torch.arange(6.0))


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(out, "1KB") as w:
        w.add("a", torch.ones(1000))
        w.add("b", torch.ones(1000))
        raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too


def test_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    with ShardedWriter(out) as w:
        w.add("a", torch.zeros(3))
        w.commit()
    with pytest.raises(OutputPathError, match="already exists.*--overwrite"):
        ShardedWriter(out)
    with ShardedWriter(out, overwrite=True) as w:
        w.add("a", torch.ones(3))
        w.commit()
    assert sorted(os.listdir(out)) == [MARKER, SINGLE_FILE]
    assert json.loads((out / MARKER).read_text())["files"] == [SINGLE_FILE]
    assert torch.equal(CheckpointReader(out).get("a"), torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputPathError, match="was not written by lifelong-delta"):
        ShardedWriter(out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_copy_non_weight_files(tmp_path):
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    for f in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "generation_config.json",
        "model.safetensors",
        "pytorch_model.bin",
        INDEX_FILE,
        ".gitattributes",
        "1_Pooling/config.json",
    ]:
        (src / f).write_text("{}")
    dst = tmp_path / "dst"
    copied = copy_non_weight_files(src, dst)
    assert sorted(copied) == [
        "1_Pooling/config.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "vocab.txt",
    ]
    assert (dst / "1_Pooling" / "config.json").exists() and not (dst / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "checkpoint not found"),
        (lambda p: p.write_bytes(b"abc"), "not a safetensors file"),
        (lambda p: p.write_bytes((10).to_bytes(8, "little") + b"not json!!"), "header is not JSON"),
        (lambda p: p.write_bytes((2**40).to_bytes(8, "little")), "implausible"),
    ],
)
def test_unreadable_file_is_a_one_line_error(tmp_path, make, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=match) as e:
        CheckpointReader(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file_and_unreadable_permissions(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        CheckpointReader(path)
    d = tmp_path / "empty_dir"
    d.mkdir()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        CheckpointReader(d)
    save_file({"a": torch.ones(3)}, d / "model-00001-of-00002.safetensors")
    (d / INDEX_FILE).write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which is missing"):
        CheckpointReader(d)
    if os.geteuid() != 0:  # root reads anything
        path.chmod(0)
        with pytest.raises(CheckpointError, match="cannot read"):
            CheckpointReader(path)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("100kib") == 102400
    assert parse_size(123) == 123
    assert parse_size("77") == 77
    for bad in ("", "2 parsecs", "-1GB", 0):
        with pytest.raises(ValueError, match="out_shard_size"):
            parse_size(bad)


@pytest.mark.parametrize("size", ["1KB", "300B", 10**9])
def test_planned_layout_writes_the_same_files(tmp_path, size):
    """With a layout, each tensor goes straight into its final shard: the files equal the staged path's, byte for
    byte."""
    ts = _tensors()
    ts["empty"] = torch.zeros(0, 3)
    layout = [(k, v.dtype, v.shape) for k, v in ts.items()]
    for name, plan in (("staged", None), ("planned", layout)):
        with ShardedWriter(tmp_path / name, size, layout=plan) as w:
            for k, v in ts.items():
                w.add_chunks(k, v.dtype, v.shape, list(v.reshape(-1).split(7)))
            w.commit()
    staged, planned = sorted(os.listdir(tmp_path / "staged")), sorted(os.listdir(tmp_path / "planned"))
    assert staged == planned and len(staged) > 1
    for f in staged:
        if f != MARKER:
            assert (tmp_path / "staged" / f).read_bytes() == (tmp_path / "planned" / f).read_bytes(), f
    assert not any(p.suffix == ".bin" for p in (tmp_path / "planned").iterdir())


def test_planned_layout_is_enforced(tmp_path):
    a, b = torch.ones(3), torch.zeros(2, dtype=torch.float16)
    layout = [("a", a.dtype, a.shape), ("b", b.dtype, b.shape)]
    with ShardedWriter(tmp_path / "o1", layout=layout) as w, pytest.raises(ValueError, match="out of the writer"):
        w.add("b", b)
    with ShardedWriter(tmp_path / "o2", layout=layout) as w, pytest.raises(ValueError, match="planned F16"):
        w.add("a", a)
        w.add("b", b.float())
    with ShardedWriter(tmp_path / "o3", layout=layout) as w, pytest.raises(ValueError, match="never added, e.g. 'b'"):
        w.add("a", a)
        w.commit()
    assert sorted(os.listdir(tmp_path)) == []


def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path):
    with pytest.raises(ValueError, match="closed file"), ShardedWriter(tmp_path / "out") as w:
        w.add("a", torch.ones(4))
        w._body.close()  # the next queued write fails in the helper thread
        w.add("b", torch.ones(4))
        w.commit()
    assert sorted(os.listdir(tmp_path)) == []
