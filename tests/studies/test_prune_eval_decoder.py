"""``prune_eval_decoder`` end to end on a tiny Llama and tiny corpora written here: the CSV schema and plan, p = 0
reproducing the fine-tune, the reference rows equal to direct evaluations, the model cache, and the corpus readers."""

import csv
import json
import math
import random

import pytest
import torch

from lifelong_delta.delta.calibration import causal_lm_perplexity
from lifelong_delta.studies.decoder_data import EOS, batches, pack, read_dialogue, read_fortunes, split_documents
from lifelong_delta.studies.decoder_models import load_lm
from lifelong_delta.studies.decoder_run import METHODS, plan_cells
from lifelong_delta.studies.decoder_train import LMSpec, TrainSpec, train_lm_
from lifelong_delta.studies.prune_eval_decoder import FINETUNE_SPLITS, prune_eval_decoder
from lifelong_delta.studies.prune_eval_decoder_report import RESULT_COLUMNS, read_results

TINY = LMSpec(vocab_size=300, hidden_size=32, intermediate_size=64, layers=2, heads=2, kv_heads=1, seq_len=32)
WORDS = [
    "the",
    "cat",
    "dog",
    "man",
    "woman",
    "house",
    "tree",
    "runs",
    "sees",
    "eats",
    "likes",
    "big",
    "small",
    "red",
    "old",
    "new",
    "happy",
    "sad",
    "and",
    "but",
    "a",
    "one",
    "very",
    "never",
    "always",
    "here",
    "there",
    "today",
    "night",
    "day",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A fortune directory (two files, an index and a symlink that must be skipped) and a dialogue file."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpora")
    fortunes = root / "fortunes"
    fortunes.mkdir()
    for name in ("wisdom", "people"):
        (fortunes / name).write_text(
            "\n%\n".join(_sentence(rng) + "\n\t\t-- " + rng.choice(WORDS) for _ in range(150)) + "\n%\n"
        )
        (fortunes / f"{name}.dat").write_bytes(b"\x00\x01binary index")
        (fortunes / f"{name}.u8").symlink_to(fortunes / name)
    dialogue = root / "dialogue.txt"
    dialogue.write_text("\n".join(f"{_sentence(rng).lower()}\t{_sentence(rng).lower()}" for _ in range(1500)) + "\n")
    return fortunes, dialogue


def _run(corpora, tmp_path, out="out", **kw):
    fortunes, dialogue = corpora
    args = dict(
        out=str(tmp_path / out),
        cache_dir=str(tmp_path / "cache"),
        pretrain_corpus=str(fortunes),
        finetune_corpus=str(dialogue),
        model=TINY,
        pretrain_steps=12,
        finetune_steps=8,
        batch_size=4,
        ps=[0.0, 0.9, 0.999],
        seeds=[0, 1],
        test_blocks=4,
        val_blocks=2,
        calib_blocks=2,
        q_grid_size=3,
        etas=[0.27, 1.0],
        encoder_results=str(tmp_path / "no_encoder.csv"),
        jobs=1,
        progress=False,
    )
    args.update(kw)
    return prune_eval_decoder(**args)


@pytest.fixture(scope="module")
def study(corpora, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    return tmp, _run(corpora, tmp)


def test_results_csv_has_the_schema_and_one_row_per_planned_cell(study):
    _, paths = study
    with open(paths["results"], newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == RESULT_COLUMNS
    rows = read_results(paths["results"])
    plan = plan_cells(["adamw", "adamr-l2"], METHODS, [0.0, 0.9, 0.999], [0, 1])
    assert [(r["finetune"], r["method"], r["p"], r["seed"]) for r in rows] == [
        (c.finetune, c.method, c.p, c.seed) for c in plan
    ]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)
    # the random methods run every seed, magnitude and WANDA one
    assert sum(r["method"] == "dare" and r["p"] == 0.9 for r in rows) == 2 * 2
    assert sum(r["method"] == "wanda" and r["p"] == 0.9 for r in rows) == 2


def test_pruning_at_p0_reproduces_the_finetune_and_p0999_changes_it(study):
    _, paths = study
    rows = read_results(paths["results"])
    for ft in ("adamw", "adamr-l2"):
        mine = [r for r in rows if r["finetune"] == ft]
        unpruned = next(r["perplexity"] for r in mine if r["method"] == "unpruned")
        at0 = {r["method"]: r["perplexity"] for r in mine if r["p"] == 0.0 and r["method"] != "unpruned"}
        assert set(at0) == set(METHODS)
        for m, ppl in at0.items():
            assert ppl == pytest.approx(unpruned, rel=1e-5), m
        dare = [r["perplexity"] for r in mine if r["method"] == "dare" and r["p"] == 0.999]
        assert all(abs(d / unpruned - 1) > 1e-3 for d in dare)


def test_reference_rows_equal_direct_evaluations_of_the_cached_models(study, corpora):
    tmp, paths = study
    rows = read_results(paths["results"])
    cache = tmp / "cache"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache / "base"))
    test_docs = split_documents(read_dialogue(corpora[1]), FINETUNE_SPLITS, chunk=50, seed=0)["test"]
    test = batches(pack(tok, test_docs, TINY.seq_len, 4), 32)
    for ft in ("adamw", "adamr-l2"):
        got = {
            r["method"]: r["perplexity"]
            for r in rows
            if r["finetune"] == ft and r["method"] in ("unpruned", "pretrained")
        }
        assert got["unpruned"] == pytest.approx(causal_lm_perplexity(load_lm(cache / ft), test), rel=1e-5)
        assert got["pretrained"] == pytest.approx(causal_lm_perplexity(load_lm(cache / "base"), test), rel=1e-5)
        assert got["unpruned"] < got["pretrained"]  # the fine-tune learned the dialogue domain


def test_q_choices_lie_in_their_range_and_the_report_files_exist(study):
    _, paths = study
    with open(paths["q_choices"], newline="") as f:
        q_rows = list(csv.DictReader(f))
    modes = {r["method"] for r in q_rows}
    assert modes == {"darex-q-grid", "darex-q-analytic", "darex-q-unlabelled"}
    for r in q_rows:
        p = float(r["p"])
        assert 1 - p - 1e-9 <= float(r["q_min"]) <= float(r["q"]) <= float(r["q_max"]) <= 1 + 1e-9, r
        assert (r["eta"] != "") == (r["method"] == "darex-q-analytic")
    summary = open(paths["summary"]).read()
    assert "Test perplexity after pruning" in summary and "Debian fortunes" in summary
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    log = open(paths["log"]).read()
    assert "pretraining" in log and "finished" in log
    meta = json.load(open(paths["meta"]))
    assert meta["trained"] is True and meta["models"]["base"]["parameters"] > 0


def test_a_rerun_reuses_the_cached_models_and_writes_the_same_rows(study, corpora):
    tmp, paths = study
    weights = tmp / "cache" / "adamw" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = _run(corpora, tmp, out="out2")
    assert weights.stat().st_mtime_ns == stamp
    assert open(again["results"]).read() == open(paths["results"]).read()
    assert json.load(open(again["meta"]))["trained"] is False
    assert "cached: fine-tune adamw" in open(again["log"]).read()


def test_a_cached_model_made_otherwise_is_a_value_error_naming_the_setting(study, corpora):
    tmp, _ = study
    with pytest.raises(ValueError, match="lr"):
        _run(corpora, tmp, out="out3", finetune_lr=1e-2)


def test_bad_options_are_value_errors(corpora, tmp_path):
    for kw, match in (
        ({"methods": ["dare", "ties"]}, "methods"),
        ({"ps": [1.0]}, "ps"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"test_blocks": 0}, "test_blocks"),
    ):
        with pytest.raises(ValueError, match=match):
            _run(corpora, tmp_path, **kw)
    with pytest.raises(ValueError, match="heads"):
        LMSpec(hidden_size=30, heads=4)


# ------------------------------------------------------------------------------------------------ components
def test_fortune_files_split_on_percent_lines_and_skip_index_files(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    (d / "a").write_text("%\nFirst one.\n\t-- Someone\n%\nSecond\none.\n%\n\n%\nThird.")
    (d / "a.dat").write_bytes(b"\x00")
    (d / "ascii-art").write_text("  /\\_/\\\n%\n ( o.o )\n")
    assert read_fortunes(d) == ["First one.\n\t-- Someone", "Second\none.", "Third."]
    with pytest.raises(FileNotFoundError, match="fortunes"):
        read_fortunes(tmp_path / "missing")


def test_splits_are_disjoint_deterministic_and_keep_chunks_together():
    docs = [f"d{i}" for i in range(1000)]
    a = split_documents(docs, {"test": 0.1, "train": 0.9}, chunk=50, seed=0)
    assert a == split_documents(docs, {"test": 0.1, "train": 0.9}, chunk=50, seed=0)
    assert sorted(a["test"] + a["train"]) == sorted(docs) and len(a["test"]) == 100
    idx = sorted(int(d[1:]) for d in a["test"])
    assert all(i // 50 == idx[k - k % 50] // 50 for k, i in enumerate(idx))  # two whole chunks of 50


def test_pack_separates_documents_with_end_of_text():
    from lifelong_delta.studies.decoder_data import train_tokenizer

    tok = train_tokenizer(["hello world", "hello there world"] * 20, 300)
    blocks = pack(tok, ["hello world", "hello there"] * 10, 4)
    eos = tok.convert_tokens_to_ids(EOS)
    flat = blocks.reshape(-1).tolist()
    assert blocks.shape[1] == 4 and flat.count(eos) >= blocks.numel() // 5
    assert tok.decode(flat[: flat.index(eos)]) == "hello world"
    assert pack(tok, ["hello world"] * 50, 4, max_blocks=3).shape == (3, 4)


def test_adamr_l2_keeps_the_delta_smaller_than_adamw():
    blocks = torch.randint(0, TINY.vocab_size, (16, TINY.seq_len), generator=torch.Generator().manual_seed(0))
    deltas = {}
    for opt, reg in (("adamw", 0.0), ("adamr", 1.0)):
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        lm = LlamaForCausalLM(TINY.config())
        start = [p.detach().clone() for p in lm.parameters()]
        train_lm_(lm, blocks, TrainSpec(steps=10, lr=1e-2, batch_size=4, optimizer=opt, reg=reg))
        deltas[opt] = sum(float((p.detach() - s).square().sum()) for p, s in zip(lm.parameters(), start))
    assert deltas["adamr"] < 0.8 * deltas["adamw"]
