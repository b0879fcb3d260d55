"""Delta statistics against brute force; name matching; the prune summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lifelong_delta.delta.matching import match_tensors
from lifelong_delta.delta.stats import DeltaStats, layer_stats, tensor_prune_stats
from lifelong_delta.delta.summary import PruneSummary, TensorPruneStats


def test_layer_stats_brute_force():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    ft = (base + 0.1 * torch.randn(7, 5, generator=g) + 0.02).to(torch.bfloat16)
    s = layer_stats("w", base, ft)
    d = ft.double().numpy() - base.double().numpy()
    assert s.shape == (7, 5) and s.numel == 35
    assert s.mean == pytest.approx(d.mean(), rel=1e-5)
    assert s.std == pytest.approx(d.std(), rel=1e-4)
    assert s.mean_abs == pytest.approx(np.abs(d).mean(), rel=1e-5)
    assert s.max_abs == pytest.approx(np.abs(d).max(), rel=1e-6)
    assert s.norm == pytest.approx(np.linalg.norm(d), rel=1e-5)
    assert s.rel_norm == pytest.approx(np.linalg.norm(d) / np.linalg.norm(base.double().numpy()), rel=1e-5)


def test_pooled_stats_equal_concatenated_tensor():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(10, generator=g), "c": torch.randn(2, 2, 2)}
    ft = {k: v + torch.randn(v.shape, generator=g) * (i + 1) * 0.1 for i, (k, v) in enumerate(base.items())}
    ft["ids"] = torch.arange(3)
    stats = DeltaStats.from_state_dicts(base, ft)
    assert [s.name for s in stats.layers] == ["a", "b", "c"]
    flat = layer_stats(
        "all", torch.cat([v.reshape(-1) for v in base.values()]), torch.cat([ft[k].reshape(-1) for k in base])
    )
    total = stats.total
    for attr in ("numel", "mean", "std", "mean_abs", "max_abs", "norm", "rel_norm"):
        assert getattr(total, attr) == pytest.approx(getattr(flat, attr), rel=1e-9), attr
    assert [s.name for s in stats.matrices] == ["a", "c"]
    assert [s.name for s in DeltaStats.from_state_dicts(base, ft, exclude=("a", "c*")).layers] == ["b"]


def test_rel_norm_edge_cases():
    zero = torch.zeros(3)
    assert layer_stats("z", zero, zero).rel_norm == 0.0
    assert layer_stats("z", zero, torch.ones(3)).rel_norm == math.inf
    empty = layer_stats("e", torch.zeros(0), torch.zeros(0))
    assert (empty.mean, empty.std, empty.mean_abs, empty.max_abs) == (0.0, 0.0, 0.0, 0.0)


def test_table_lists_top_layers():
    base = {f"l{i}": torch.ones(4, 4) for i in range(5)}
    ft = {k: v * (1 + 0.01 * i) for i, (k, v) in enumerate(base.items())}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(DeltaStats.from_state_dicts(base, ft).table(top=2))
    text = console.export_text()
    assert "l4" in text and "l3" in text and "l1 " not in text and "(all)" in text


class _Fake:
    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], str]]):
        self.shapes = shapes

    def names(self):
        return list(self.shapes)

    def shape(self, n):
        return self.shapes[n][0]

    def code(self, n):
        return self.shapes[n][1]

    def __contains__(self, n):
        return n in self.shapes


F, INT = "F32", "I64"


def test_match_tensors():
    base = _Fake({"a": ((2, 2), F), "ids": ((3,), INT), "b": ((3,), "BF16")})
    ft = _Fake({"b": ((3,), F), "a": ((2, 2), F), "ids": ((3,), INT), "head": ((1,), F)})
    m = match_tensors(base, ft, exclude=("head",))
    assert m.pruned == ["b", "a"] and m.copied == ["ids", "head"]
    with pytest.raises(
        ValueError,
        match=r"1 tensor\(s\) of the fine-tuned model are missing from the base model: "
        r"head \(pass --exclude",
    ):
        match_tensors(base, ft)
    with pytest.raises(ValueError, match="of the base model are missing from the fine-tuned model: b$|: b "):
        match_tensors(base, _Fake({"a": ((2, 2), F)}))
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \[2, 2\] in the base model but \[4\]"):
        match_tensors(base, _Fake({"a": ((4,), F), "b": ((3,), F)}))


def test_long_missing_list_is_abbreviated():
    base = _Fake({})
    ft = _Fake({f"t{i}": ((1,), F) for i in range(9)})
    with pytest.raises(ValueError, match=r"9 tensor\(s\).*t0, t1, t2, t3, t4 and 4 more") as e:
        match_tensors(base, ft)
    assert "\n" not in str(e.value)


def test_tensor_prune_stats_and_summary():
    base = torch.zeros(10)
    ft = torch.arange(1.0, 11.0)
    merged = torch.where(torch.arange(10) % 2 == 0, ft * 2, base)
    s = tensor_prune_stats("x", base, ft, merged)
    assert (s.nnz_before, s.nnz_after) == (10, 5)
    assert s.norm_before == pytest.approx(float(ft.norm()))
    assert s.norm_after == pytest.approx(float(merged.norm()))
    summary = PruneSummary("dare", 0.5, None, [s, TensorPruneStats("y", 4, 4, 1, 3.0, 4.0)], copied=["ids"])
    assert summary.kept_fraction == pytest.approx(6 / 14)
    assert summary.norm_before == pytest.approx(math.hypot(float(ft.norm()), 3.0))
    assert summary.as_dict()["tensors_pruned"] == 2


def test_match_tensors_through_a_prefix_both_ways():
    base = _Fake({"emb.w": ((4, 2), F), "enc.0.w": ((2, 2), F), "pooler.w": ((2, 2), F)})
    ft = _Fake(
        {
            "bert.emb.w": ((4, 2), F),
            "bert.ids": ((3,), INT),
            "bert.enc.0.w": ((2, 2), F),
            "bert.pooler.w": ((2, 2), F),
            "classifier.w": ((3, 2), F),
            "classifier.b": ((3,), F),
        }
    )
    m = match_tensors(base, ft)
    assert m.prefix == ("", "bert.")
    assert m.pruned == ["bert.emb.w", "bert.enc.0.w", "bert.pooler.w"]
    assert m.base_name("bert.enc.0.w") == "enc.0.w" and m.finetuned_only == ["classifier.w", "classifier.b"]
    assert m.copied == ["bert.ids", "classifier.w", "classifier.b"]
    assert "copied unchanged: classifier.w, classifier.b" in m.describe()
    # the reverse: the base carries the prefix (and a head the fine-tuned model does not have)
    r = match_tensors(ft, base)
    assert r.prefix == ("bert.", "") and r.pruned == ["emb.w", "enc.0.w", "pooler.w"]
    assert r.base_name("emb.w") == "bert.emb.w" and r.base_only == ["classifier.w", "classifier.b"]
    # excluded tensors stay out of the mapping
    assert match_tensors(base, ft, exclude=("classifier.*",)).finetuned_only == []


def test_prefix_mapping_still_checks_shapes_and_real_mismatches():
    base = _Fake({"emb.w": ((4, 2), F), "enc.w": ((2, 2), F)})
    with pytest.raises(
        ValueError,
        match=r"tensor 'bert.enc.w' has shape \[2, 3\] in the fine-tuned model but "
        r"\[2, 2\] as 'enc.w' in the base model",
    ):
        match_tensors(base, _Fake({"bert.emb.w": ((4, 2), F), "bert.enc.w": ((2, 3), F)}))
    # a prefixed tensor without a base counterpart is a real mismatch, not a head
    with pytest.raises(ValueError, match=r"missing from the base model: bert.emb.w, bert.enc.w, bert.dec.w"):
        match_tensors(base, _Fake({"bert.emb.w": ((4, 2), F), "bert.enc.w": ((2, 2), F), "bert.dec.w": ((2,), F)}))
    # a base tensor that nothing maps to is a real mismatch too
    with pytest.raises(ValueError, match=r"missing from the base model: bert.emb.w"):
        match_tensors(base, _Fake({"bert.emb.w": ((4, 2), F)}))
    # names that share nothing
    with pytest.raises(ValueError, match=r"2 tensor\(s\) of the fine-tuned model are missing from the base model"):
        match_tensors(base, _Fake({"x.w": ((4, 2), F), "y.w": ((2, 2), F)}))
