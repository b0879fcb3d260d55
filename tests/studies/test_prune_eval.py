"""``prune_eval``: masks against the delta engine on tiny tensors, the study plan, one tiny real fine-tune
pruned and evaluated end to end (CSV schema, unpruned accuracy equal to a direct evaluation, LoRA delta), and the
study on a tiny random MPNet (the ``mpnet`` backbone row)."""

import csv
import json
import math

import pytest
import torch
from torch import nn

from lifelong_delta.delta import PruneSpec, dare_merge, prune_tensor
from lifelong_delta.studies.prune_eval import METHODS, plan_cells, prune_eval
from lifelong_delta.studies.prune_eval_masks import build_masked, mark_dirty
from lifelong_delta.studies.prune_eval_report import RESULT_COLUMNS, read_results
from lifelong_delta.studies.prune_eval_run import q_grid
from tests.text.tiny_mpnet import as_mpnet_row, write_tiny_mpnet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- tiny tensors
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    ft = {n: t + 0.05 * torch.randn_like(t) for n, t in base.items()}
    ft["emb.weight"][3:] = base["emb.weight"][3:]  # like a fine-tune: most embedding rows unchanged
    delta = {n: ft[n] - base[n] for n in base}
    return model, base, ft, delta


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_mask_rescaled_per_q_equals_dare_merge_bit_for_bit(p):
    model, base, ft, delta = _pair()
    masked = build_masked("dare", base, delta, p, seed=7)
    for q in (1 - p, 0.8, 1.0, 1 - p):  # the first write is dense, the next ones only touch kept entries
        masked.apply_(model, q)
        sd = model.state_dict()
        for n in base:
            assert torch.equal(sd[n], dare_merge(base[n], ft[n], p, seed=7, name=n, q=q)), (n, q)
    with torch.no_grad():  # another writer: after mark_dirty the next apply_ rewrites whole tensors again
        for t in model.parameters():
            t.add_(1.0)
    mark_dirty(model)
    masked.apply_(model, 0.8)
    assert all(torch.equal(model.state_dict()[n], dare_merge(base[n], ft[n], p, seed=7, name=n, q=0.8)) for n in base)


def test_building_a_mask_keeps_torch_thread_count():
    base = {"w": torch.zeros(512, 512)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        build_masked("dare", base, {"w": torch.randn(512, 512)}, 0.9, seed=0)  # numba kernel (OpenMP)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_importance_and_structural_masks_merge_like_the_engine():
    model, base, ft, delta = _pair(1)
    norms = {
        "emb.weight": torch.ones(6),
        "lin.weight": torch.rand(6) + 0.5,
        "out.weight": torch.rand(5) + 0.5,
    }
    for method, q in (("magnitude", 1.0), ("wanda", 1.0), ("structural", 0.4)):
        masked = build_masked(method, base, delta, 0.75, seed=3, input_norms=norms)
        masked.apply_(model, q)
        spec = PruneSpec(method, 0.75, seed=3, **({"q": q} if method == "structural" else {}))
        for n in base:
            want = prune_tensor(n, base[n], ft[n], spec, input_norms=norms.get(n) if method == "wanda" else None)
            torch.testing.assert_close(model.state_dict()[n], want, rtol=0, atol=1e-7, msg=f"{method} {n}")
        kept_rows = (model.state_dict()["emb.weight"] != base["emb.weight"]).any(1)
        assert not kept_rows[3:].any()  # unchanged rows stay exactly θ_pre


def test_plan_runs_every_seed_from_p_0p9_and_only_extreme_methods_at_0p999():
    cells = plan_cells(["trec"], ["adamw", "lora"], METHODS, [0.5, 0.9, 0.999], [4, 5, 6], low_p_seeds=1)
    got: dict[tuple, list[int]] = {}
    for c in cells:
        got.setdefault((c.finetune, c.method, c.p), []).append(c.seed)
    assert got["adamw", "unpruned", 0.0] == [4]
    assert got["adamw", "dare", 0.5] == [4] and got["adamw", "dare", 0.9] == [4, 5, 6]
    assert got["adamw", "magnitude", 0.9] == [4] and got["adamw", "darex-q-grid", 0.999] == [4, 5, 6]
    assert {m for f, m, p in got if p == 0.999} == {"darex-q-grid", "darex-q-analytic", "magnitude", "wanda"}
    assert {m for f, m, _ in got if f == "lora"} == set(METHODS)  # a LoRA delta B·A is pruned every way
    assert len(cells) == len(set(cells))


def test_q_grid_is_geometric_between_1_minus_p_and_1():
    qs = q_grid(0.99, 5)
    assert qs[0] == pytest.approx(0.01) and qs[-1] == 1.0
    assert [qs[i + 1] / qs[i] for i in range(4)] == pytest.approx([10**0.5] * 4)


@pytest.mark.parametrize(
    "option, kwargs",
    [
        ("methods", {"methods": ["dare", "sparsegpt"]}),
        ("ps", {"ps": [0.9, 1.0]}),
        ("seeds", {"seeds": []}),
        ("finetunes", {"finetunes": ["sgd"]}),
        ("max_test", {"max_test": 0}),
        ("lora_methods", {"lora_methods": ["sparsegpt"]}),
        ("jobs", {"jobs": 0}),
        ("etas", {"etas": [0.5, 0.0]}),
    ],
)
def test_bad_options_are_value_errors_naming_the_option(tmp_path, option, kwargs):
    with pytest.raises(ValueError, match=option):
        prune_eval(cache_dir=str(tmp_path), out=str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_read_results_checks_the_columns(tmp_path):
    bad = tmp_path / "results.csv"
    bad.write_text("task,method,accuracy\ntrec,dare,0.5\n")
    with pytest.raises(ValueError, match="task,finetune,method,p,seed,accuracy"):
        read_results(bad)


# ----------------------------------------------------------------------------------- one tiny real fine-tune
ETAS = [0.5, 3.0]  # not the default grid: the option must reach the analytic q
TINY = {
    "epochs": 1,
    "max_train_examples": 24,
    "max_eval_examples": 12,
    "max_length": 8,
    "batch_size": 8,
    "progress": False,
}


@pytest.fixture(scope="module")
def study(module_tmp):
    """A tiny AdamW fine-tune, a LoRA fine-tune of the same base (random B, no training), and the study."""
    from lifelong_delta.text.finetune import finetune, finetune_dir
    from lifelong_delta.text.module import SequenceClassifier

    cache = module_tmp("finetunes")
    finetune("trec", "adamw", cache_dir=str(cache), **TINY)
    torch.manual_seed(0)
    lora = SequenceClassifier(model_dir=str(finetune_dir("trec", "base", cache)), lora_r=2, lora_alpha=4)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lora_dir = finetune_dir("trec", "lora", cache)
    lora.save_pretrained(lora_dir)
    info = json.loads((finetune_dir("trec", "adamw", cache) / "finetune.json").read_text())
    (lora_dir / "finetune.json").write_text(json.dumps({**info, "recipe": "lora"}))
    out = module_tmp("prune_eval")
    paths = prune_eval(
        cache_dir=str(cache),
        out=str(out),
        tasks=["trec"],
        finetunes=["adamw", "lora"],
        ps=[0.9],
        seeds=[0, 1],
        max_test=None,
        max_val=4,
        n_calib=4,
        q_grid_size=2,
        q_fine_steps=1,
        etas=ETAS,
        jobs=1,
        progress=False,
    )
    return cache, out, paths


def test_results_csv_has_the_exact_schema_and_the_planned_rows(study):
    _, out, paths = study
    assert paths["results"] == str(out / "results.csv")
    with open(paths["results"], newline="") as f:
        raw = list(csv.reader(f))
    assert tuple(raw[0]) == RESULT_COLUMNS == ("task", "finetune", "method", "p", "seed", "accuracy")
    rows = read_results(paths["results"])
    assert len(rows) == len(raw) - 1 == len(plan_cells(["trec"], ["adamw", "lora"], METHODS, [0.9], [0, 1])) == 26
    assert {r["p"] for r in rows} == {0.0, 0.9}
    assert {r["seed"] for r in rows} == {0, 1}
    assert all(r["task"] == "trec" and r["method"] in METHODS for r in rows)
    assert all(
        0.0 <= r["accuracy"] <= 1.0 and math.isclose(r["accuracy"] * 12, round(r["accuracy"] * 12), abs_tol=1e-4)
        for r in rows
    )  # 12 test examples
    seeds = {(r["finetune"], r["method"], r["p"]): set() for r in rows}
    for r in rows:
        seeds[r["finetune"], r["method"], r["p"]].add(r["seed"])
    assert seeds["adamw", "darex-q-unlabelled", 0.9] == {0, 1} and seeds["adamw", "unpruned", 0.0] == {0}
    assert seeds["adamw", "wanda", 0.9] == {0} and seeds["lora", "darex-q-analytic", 0.9] == {0, 1}
    assert seeds["lora", "wanda", 0.9] == {0} and seeds["lora", "structural", 0.9] == {0, 1}
    lora_only_dare = plan_cells(["trec"], ["adamw", "lora"], METHODS, [0.9], [0, 1], lora_methods=["dare"])
    assert {c.method for c in lora_only_dare if c.finetune == "lora"} == {"dare"}
    with open(paths["q_choices"], newline="") as f:
        qs = list(csv.DictReader(f))
    grid = [q for q in qs if q["finetune"] == "adamw" and q["method"] == "darex-q-grid" and q["p"] == "0.9"]
    assert len(grid) == 2 and all(0.1 - 1e-9 <= float(q["q"]) <= 1.0 for q in grid)
    analytic = [q for q in qs if q["method"] == "darex-q-analytic"]
    assert analytic and all(float(q["eta"]) in ETAS and int(q["candidates"]) == len(ETAS) for q in analytic)
    assert all(q["eta"] == "" for q in grid)  # η only exists for the analytic mode
    for name in ("summary", "plot", "recommend", "meta"):
        assert (out / paths[name].split("/")[-1]).stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    summary = (out / "summary.md").read_text()
    assert "## trec: test accuracy (%) after pruning" in summary and "What `lifelong-delta recommend` picks" in summary


def test_two_worker_processes_write_the_same_rows_as_one(study, tmp_path):
    cache, out, _paths = study
    two = prune_eval(
        cache_dir=str(cache),
        out=str(tmp_path / "two"),
        tasks=["trec"],
        finetunes=["adamw", "lora"],
        ps=[0.9],
        seeds=[0, 1],
        max_test=None,
        max_val=4,
        n_calib=4,
        q_grid_size=2,
        q_fine_steps=1,
        etas=ETAS,
        jobs=2,
        progress=False,
    )
    for name in ("results", "q_choices", "recommend"):
        assert (tmp_path / "two" / f"{name}.csv").read_bytes() == (out / f"{name}.csv").read_bytes(), name
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["jobs"] == 2
    assert two["results"] == str(tmp_path / "two" / "results.csv")


def test_unpruned_accuracy_equals_a_direct_evaluation(study):
    from transformers import AutoModelForSequenceClassification

    from lifelong_delta.text.data import TextClassificationDataModule
    from lifelong_delta.text.finetune import finetune_dir

    cache, _, paths = study
    rows = read_results(paths["results"])
    for ft in ("adamw", "lora"):
        path = finetune_dir("trec", ft, cache)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        dm = TextClassificationDataModule(
            "trec", max_length=8, max_train_examples=24, max_eval_examples=12, eval_batch_size=5
        )
        correct = total = 0
        with torch.no_grad():
            for b in dm.test_dataloader():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                correct += int((logits.argmax(-1) == b["labels"]).sum())
                total += len(b["labels"])
        (got,) = [r["accuracy"] for r in rows if r["finetune"] == ft and r["method"] == "unpruned"]
        assert total == 12 and got == pytest.approx(correct / total, abs=1e-6)
    recorded = json.loads((finetune_dir("trec", "adamw", cache) / "finetune.json").read_text())["test_acc"]
    (adamw,) = [r["accuracy"] for r in rows if r["finetune"] == "adamw" and r["method"] == "unpruned"]
    assert adamw == pytest.approx(recorded, abs=1e-6)  # the fine-tune's own Lightning test metric


def test_meta_records_a_command_that_repeats_the_study(study, monkeypatch):
    import functools
    import shlex
    from pathlib import Path

    import lifelong_delta.studies.prune_eval as mod
    from lifelong_delta.cli import main

    cache, _, paths = study
    cmd = json.loads(Path(paths["meta"]).read_text())["command"]
    assert cmd.startswith("lifelong-delta prune-eval --cache-dir ") and "--jobs" not in cmd and "--progress" not in cmd
    calls = []

    @functools.wraps(mod.prune_eval)
    def record(*args, **kwargs):
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(mod, "prune_eval", record)
    main(shlex.split(cmd)[1:])
    want = {
        "cache_dir": str(cache),
        "tasks": ["trec"],
        "finetunes": ["adamw", "lora"],
        "ps": [0.9],
        "seeds": [0, 1],
        "max_test": None,
        "max_val": 4,
        "n_calib": 4,
        "q_grid_size": 2,
    }
    assert {k: calls[0][k] for k in want} == want
    assert calls[0]["methods"] == list(METHODS)  # a default stays a default


# --------------------------------------------------------------- the study on a tiny MPNet (the mpnet backbone row)
@pytest.fixture(scope="module")
def tiny_mpnet_study(module_tmp):
    """Fine-tunes (AdamW, LoRA) of a tiny random MPNet on TREC, pruned by the study with ``backbone="mpnet"``."""
    from lifelong_delta.text.finetune import finetune

    with as_mpnet_row(write_tiny_mpnet(module_tmp("tiny_mpnet"))):
        cache = module_tmp("finetunes")
        for recipe in ("adamw", "lora"):
            finetune("trec", recipe, cache_dir=str(cache), backbone="mpnet", **TINY)
        out = module_tmp("prune_eval_base")
        paths = prune_eval(
            cache_dir=str(cache),
            out=str(out),
            tasks=["trec"],
            finetunes=["adamw", "lora"],
            ps=[0.9],
            seeds=[0],
            max_test=None,
            max_val=4,
            n_calib=4,
            q_grid_size=2,
            q_fine_steps=0,
            etas=[1.0],
            jobs=1,
            progress=False,
            backbone="mpnet",
        )
        yield cache, paths


def test_every_method_prunes_the_mpnet_deltas(tiny_mpnet_study):
    _, paths = tiny_mpnet_study
    rows = read_results(paths["results"])
    for ft in ("adamw", "lora"):
        assert {r["method"] for r in rows if r["finetune"] == ft} == set(METHODS)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    meta = json.loads(open(paths["meta"]).read())
    assert meta["backbone"] == "mpnet" and "--backbone mpnet" in meta["command"]
    assert open(paths["summary"]).readline().startswith("# Delta-pruning study: MPNet fine-tunes")


def test_calibration_hooks_every_mpnet_linear_and_leaves_the_head_alone(tiny_mpnet_study):
    from lifelong_delta.studies.prune_eval_data import finetune_hparams, task_splits
    from lifelong_delta.studies.prune_eval_run import FinetuneRun, Settings
    from lifelong_delta.text.finetune import finetune_dir

    cache, _ = tiny_mpnet_study
    ft = finetune_dir("trec", "adamw", cache, backbone="mpnet")
    s = Settings(
        max_test=None,
        max_val=4,
        n_calib=4,
        q_grid_size=2,
        q_fine_steps=0,
        etas=(1.0,),
        analytic_arithmetic="float16",
        analytic_tie_rtol=0.0,
        exclude=("classifier.*",),
        batch_size=8,
    )
    run = FinetuneRun(
        "trec",
        "adamw",
        ft,
        finetune_dir("trec", "base", cache, backbone="mpnet"),
        task_splits(finetune_hparams(ft), None, 4, 4, 8),
        s,
    )
    linears = {
        f"mpnet.encoder.layer.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.attn.q",
            "attention.attn.k",
            "attention.attn.v",
            "attention.attn.o",
            "intermediate.dense",
            "output.dense",
        )
    }
    means, norms = run._calibration()
    assert set(means) == linears
    assert linears <= set(norms) and all(n in run.delta for n in norms)
    assert "mpnet.encoder.relative_attention_bias.weight" in run.delta
    assert not [n for n in run.delta if n.startswith("classifier.")]
