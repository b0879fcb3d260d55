"""``merge_eval`` end to end on tiny random BERT "fine-tunes" of TREC and VADER (heads of 6 and 2 classes): the CSV
schema and plan, task arithmetic of one model reproducing its fine-tune, and the in-memory merge equal to the files
``lifelong-delta merge`` writes."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from lifelong_delta.cli import main
from lifelong_delta.delta.merge import MergeSpec
from lifelong_delta.studies.merge_eval import (
    MergeCell,
    encoder_checkpoint,
    encoder_names,
    merge_encoder,
    merge_eval,
    plan_merges,
    spec_of,
)
from lifelong_delta.studies.merge_eval_report import RESULT_COLUMNS, read_results
from lifelong_delta.text.finetune import finetune_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = {"trec": 6, "vader": 2}
RUN = dict(densities=[0.1, 1.0], seeds=[0, 1], max_test=24, batch_size=8, jobs=1, progress=False)


def _save(model, path, task):
    model.save_pretrained(path)
    hparams = {"task": task, "split_seed": 0, "max_length": 16, "max_eval_examples": 48, "backbone": "minilm"}
    (path / "finetune.json").write_text(json.dumps({"recipe": path.name, "hparams": hparams}))


@pytest.fixture(scope="module")
def cache(module_tmp):
    """``<task>/base`` (one random encoder, a head per task) and ``<task>/adamw`` (encoder and head + noise)."""
    from transformers import BertConfig, BertForSequenceClassification

    root = module_tmp("finetunes")
    torch.manual_seed(0)
    encoder = None
    for task, k in LABELS.items():
        config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=k,
        )
        model = BertForSequenceClassification(config).eval()
        if encoder is None:
            encoder = {n: t.clone() for n, t in model.bert.state_dict().items()}
        model.bert.load_state_dict(encoder)
        _save(model, finetune_dir(task, "base", root), task)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _save(model, finetune_dir(task, "adamw", root), task)
    return root


@pytest.fixture(scope="module")
def study(cache, module_tmp):
    out = module_tmp("merge_eval")
    return out, merge_eval(cache_dir=str(cache), out=str(out), recipes=["adamw"], **RUN)


def test_results_csv_has_the_schema_and_two_rows_per_planned_merge(study):
    out, paths = study
    with open(paths["results"], newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == RESULT_COLUMNS
    rows = read_results(paths["results"])
    refs = [r for r in rows if r["density"] is None]
    merged = [r for r in rows if r["density"] is not None]
    assert sorted((r["method"], r["task"]) for r in refs) == sorted(
        (m, t) for m in ("base", "finetune-trec", "finetune-vader") for t in LABELS
    )
    plan = plan_merges(
        ["adamw"], ["task-arithmetic", "ties", "dare-linear", "dare-ties", "darex-q"], [0.1, 1.0], [0, 1]
    )
    assert [(r["method"], r["density"], r["seed"], r["task"]) for r in merged] == [
        (c.method, c.density, c.seed, t) for c in plan for t in LABELS
    ]
    # task arithmetic once; ties one seed per density; DARE every seed below density 1, one at 1
    assert len(plan) == 1 + 2 + 3 * (2 + 1)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(r["merge_s"] is not None and r["merge_s"] >= 0 for r in merged)
    text = (out / "summary.md").read_text()
    assert "λ = 1" in text and "dare-ties" in text and "density 0.1" in text
    assert (out / "accuracy_vs_density.png").stat().st_size > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["trec"]["test"] == 24 and meta["lambda"] == 1.0


def test_density_1_dare_equals_task_arithmetic(study):
    rows = read_results(study[1]["results"])
    acc = {(r["method"], r["task"]): r["accuracy"] for r in rows if r["density"] == 1.0}
    for t in LABELS:
        assert acc["dare-linear", t] == acc["task-arithmetic", t]
        assert acc["dare-ties", t] == acc["ties", t]


def test_task_arithmetic_of_one_model_reproduces_its_finetune(cache, tmp_path):
    paths = merge_eval(
        cache_dir=str(cache),
        out=str(tmp_path / "one"),
        tasks=["vader"],
        recipes=["adamw"],
        methods=["task-arithmetic"],
        **RUN,
    )
    rows = read_results(paths["results"])
    ta = [r for r in rows if r["method"] == "task-arithmetic"]
    own = [r for r in rows if r["method"] == "finetune-vader"]
    assert len(ta) == len(own) == 1
    assert ta[0]["accuracy"] == own[0]["accuracy"]
    base = load_file(str(finetune_dir("vader", "base", cache) / "model.safetensors"))
    ft = load_file(str(finetune_dir("vader", "adamw", cache) / "model.safetensors"))
    names = encoder_names(base, [ft])
    merged = merge_encoder(base, [ft], MergeSpec("task-arithmetic", (1.0,)), names)
    for n in names:
        torch.testing.assert_close(merged[n], ft[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["dare-ties", "ties"])
def test_in_memory_merge_equals_the_cli_files(cache, tmp_path, method):
    head = finetune_dir("trec", "base", cache)
    dirs = {
        k: encoder_checkpoint(finetune_dir(t, r, cache), tmp_path / f"{t}-{r}", head)
        for k, (t, r) in {"base": ("trec", "base"), "trec": ("trec", "adamw"), "vader": ("vader", "adamw")}.items()
    }
    cell = MergeCell("adamw", method, 0.1, 3)
    out = tmp_path / "out"
    main(
        [
            "merge",
            "--progress",
            "false",
            "--base",
            str(dirs["base"]),
            "--models",
            str(dirs["trec"]),
            str(dirs["vader"]),
            "--method",
            method,
            "--density",
            "0.1",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    cli = load_file(str(out / "model.safetensors"))
    base = load_file(str(finetune_dir("trec", "base", cache) / "model.safetensors"))
    fts = [load_file(str(finetune_dir(t, "adamw", cache) / "model.safetensors")) for t in LABELS]
    names = encoder_names(base, fts)
    assert sorted(cli) == sorted([*names, "classifier.bias", "classifier.weight"])
    merged = merge_encoder(base, fts, spec_of(cell, 2), names)
    for n in names:
        assert torch.equal(merged[n], cli[n]), n
    for n in ("classifier.weight", "classifier.bias"):  # the shared head's deltas are zero: it stays the base's
        assert torch.equal(cli[n], base[n])


def test_bad_options_are_value_errors_naming_the_option(cache, tmp_path):
    for kwargs, option in (
        ({"recipes": ["lora"]}, "recipes"),
        ({"methods": ["nope"]}, "methods"),
        ({"densities": [0.0]}, "densities"),
        ({"seeds": [1, 1]}, "seeds"),
    ):
        with pytest.raises(ValueError, match=option):
            merge_eval(cache_dir=str(cache), out=str(tmp_path / "x"), **{**RUN, **kwargs})


def test_two_processes_give_the_rows_of_one(cache, study, tmp_path):
    _, paths = study
    two = merge_eval(cache_dir=str(cache), out=str(tmp_path / "two"), recipes=["adamw"], **{**RUN, "jobs": 2})
    one_rows, two_rows = read_results(paths["results"]), read_results(two["results"])
    drop = ("merge_s",)  # wall time
    assert [{k: v for k, v in r.items() if k not in drop} for r in one_rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in two_rows
    ]
