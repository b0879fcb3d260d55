"""``lifelong-delta prune --finetuned ADAPTER_DIR``: a synthetic PEFT adapter pruned and merged into a tiny base,
checked against a brute-force merge (masks from the counter stream, products in float64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lifelong_delta.delta.commands import prune
from lifelong_delta.delta.io import INDEX_FILE
from lifelong_delta.delta.masks import keep_mask
from tests.delta._checkpoints import leftovers, read_checkpoint, tiny_state, write_checkpoint

CLI = str(Path(sys.executable).parent / "lifelong-delta")
R, ALPHA = 2, 6.0  # scaling = alpha / r = 3
TARGETS = ("layers.0", "layers.2")


def _adapter(path: Path, prefix: str = "", *, head: bool = True) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA adapter on layers.0/2 (8x8) and, in full, the classifier (modules_to_save)."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for t in TARGETS:
        tensors[f"base_model.model.{prefix}{t}.lora_A.weight"] = torch.randn(R, 8, generator=g)
        tensors[f"base_model.model.{prefix}{t}.lora_B.weight"] = torch.randn(8, R, generator=g) * 0.1
    if head:
        tensors["base_model.model.classifier.weight"] = torch.randn(3, 8, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": R,
                "lora_alpha": ALPHA,
                "target_modules": ["layers.0", "layers.2"],
                "modules_to_save": ["classifier"] if head else None,
            }
        )
    )
    return tensors


def _setup(tmp_path: Path, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base_sd = tiny_state()
    write_checkpoint(tmp_path / "base", base_sd, "1KB")
    return base_sd, _adapter(tmp_path / "adapter", prefix)


def _dense(tensors, t, prefix=""):
    a = tensors[f"base_model.model.{prefix}{t}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{prefix}{t}.lora_B.weight"].double()
    return (ALPHA / R) * b @ a


def _dare_keep(name, numel, p, seed):
    return keep_mask(numel, p, seed=seed, name=name).double()


def test_cli_prunes_the_lora_product_like_a_brute_force_merge(tmp_path):
    base_sd, tensors = _setup(tmp_path)
    out, p, seed = tmp_path / "out", 0.6, 3
    res = subprocess.run(
        [
            CLI,
            "prune",
            "--base",
            str(tmp_path / "base"),
            "--finetuned",
            str(tmp_path / "adapter"),
            "--method",
            "dare",
            "--p",
            str(p),
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--out-shard-size",
            "1KB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prune summary" in res.stdout
    got = read_checkpoint(out)
    assert set(got) == set(base_sd) and (out / INDEX_FILE).exists() and (out / "config.json").exists()
    for name, b in base_sd.items():
        t = name.removesuffix(".weight")
        if t in TARGETS:
            delta = _dense(tensors, t)
        elif name == "classifier.weight":
            delta = tensors["base_model.model.classifier.weight"].double() - b.double()
        else:
            assert torch.equal(got[name], b), name  # untouched by the adapter: the base tensor
            continue
        keep = _dare_keep(name, b.numel(), p, seed).view(b.shape)
        want = b.double() + keep * delta / (1 - p)
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-5)
        assert torch.equal(got[name] != b, (keep > 0) & (delta != 0)), name


def test_prune_factors_and_magnitude_product(tmp_path):
    base_sd, tensors = _setup(tmp_path)
    p, q, seed = 0.5, 0.7, 1
    prune(
        str(tmp_path / "base"),
        str(tmp_path / "adapter"),
        str(tmp_path / "f"),
        method="darex-q",
        p=p,
        q=q,
        seed=seed,
        lora_prune="factors",
        exclude=["layers.2.*"],
        progress=False,
    )
    got = read_checkpoint(tmp_path / "f")
    a_key, b_key = "base_model.model.layers.0.lora_A.weight", "base_model.model.layers.0.lora_B.weight"
    a = tensors[a_key].double() * _dare_keep(a_key, R * 8, p, seed).view(R, 8) / q
    b = tensors[b_key].double() * _dare_keep(b_key, 8 * R, p, seed).view(8, R) / q
    want = base_sd["layers.0.weight"].double() + (ALPHA / R) * b @ a
    torch.testing.assert_close(got["layers.0.weight"].double(), want, rtol=0, atol=1e-5)
    # excluded: the adapter's delta merged unpruned
    want2 = base_sd["layers.2.weight"].double() + _dense(tensors, "layers.2")
    torch.testing.assert_close(got["layers.2.weight"].double(), want2, rtol=0, atol=1e-5)

    summary = prune(
        str(tmp_path / "base"),
        str(tmp_path / "adapter"),
        str(tmp_path / "m"),
        method="magnitude",
        p=0.75,
        progress=False,
    )
    got = read_checkpoint(tmp_path / "m")
    delta = _dense(tensors, "layers.0")
    for i in range(8):  # top round(0.25 * 8) = 2 |δ| of each row, no rescale
        top = set(delta[i].abs().topk(2).indices.tolist())
        for j in range(8):
            want = base_sd["layers.0.weight"][i, j].double() + (delta[i, j] if j in top else 0.0)
            assert got["layers.0.weight"][i, j].double() == pytest.approx(float(want), abs=1e-5)
    assert summary.kept_fraction == pytest.approx(0.25, abs=0.01)


def test_adapter_names_with_a_prefix_map_onto_the_base(tmp_path):
    base_sd = tiny_state()
    write_checkpoint(tmp_path / "base", base_sd, "1KB")
    tensors = _adapter(tmp_path / "adapter", prefix="model.", head=False)
    prune(
        str(tmp_path / "base"),
        str(tmp_path / "adapter"),
        str(tmp_path / "out"),
        method="darex-q",
        p=0.0,
        q=1.0,
        progress=False,
    )
    got = read_checkpoint(tmp_path / "out")
    want = base_sd["layers.2.weight"].double() + _dense(tensors, "layers.2", prefix="model.")
    torch.testing.assert_close(got["layers.2.weight"].double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "wanda"}, "--method wanda needs --calib_data FILE"),
        ({"method": "darex-q", "q_mode": "unlabelled", "calib_data": "x.csv"}, "--calib_data x.csv: not found"),
        (
            {"method": "wanda", "lora_prune": "factors", "calib_data": "CALIB"},
            "--method wanda calibrates the merged model, so it prunes the LoRA product B·A; drop --lora_prune factors",
        ),
        ({"method": "dare", "lora_prune": "both"}, "--lora_prune 'both' is not one of"),
    ],
)
def test_bad_lora_options(tmp_path, kwargs, match):
    _setup(tmp_path)
    if kwargs.get("calib_data") == "CALIB":
        kwargs["calib_data"] = str(tmp_path / "calib.csv")
        (tmp_path / "calib.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=match) as e:
        prune(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False, **kwargs)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_adapter_that_does_not_fit_the_base(tmp_path):
    base_sd = tiny_state()
    write_checkpoint(tmp_path / "base", base_sd, "1KB")
    _adapter(tmp_path / "adapter", prefix="decoder.")
    with pytest.raises(ValueError, match=r"2 tensor\(s\) of the LoRA adapter have no counterpart") as e:
        prune(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    # a shape that does not fit: found while streaming, and still nothing at --out
    write_checkpoint(tmp_path / "base2", {**base_sd, "layers.2.weight": torch.zeros(8, 9)}, "1KB")
    _adapter(tmp_path / "a2")
    with pytest.raises(
        ValueError,
        match=r"tensor 'layers.2.weight' has shape \[8, 9\] in the base model but the "
        r"adapter's delta has shape \[8, 8\]",
    ):
        prune(str(tmp_path / "base2"), str(tmp_path / "a2"), str(tmp_path / "out"), progress=False)
    # --lora_prune factors with a full checkpoint
    write_checkpoint(tmp_path / "ft", tiny_state(), "1KB")
    with pytest.raises(ValueError, match="--lora_prune factors needs a PEFT adapter directory"):
        prune(str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "out"), lora_prune="factors", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_stats_and_recommend_read_an_adapter_as_its_product(tmp_path, monkeypatch):
    """``stats`` / ``recommend`` on an adapter see δ = scaling·B·A (zero where it adapts nothing), like on the model
    merged by hand; and ``recommend`` knows the delta is low-rank, so it never picks importance pruning."""
    import tempfile

    from lifelong_delta.delta.commands import recommend, stats

    base_sd, tensors = _setup(tmp_path)
    merged = dict(base_sd)
    for t in TARGETS:
        merged[f"{t}.weight"] = (base_sd[f"{t}.weight"].double() + _dense(tensors, t)).float()
    merged["classifier.weight"] = tensors["base_model.model.classifier.weight"]
    write_checkpoint(tmp_path / "by_hand", merged, "1KB")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    kw = {"exclude": ["classifier.*"], "progress": False}
    got = {s.name: s for s in stats(str(tmp_path / "base"), str(tmp_path / "adapter"), **kw).layers}
    want = {s.name: s for s in stats(str(tmp_path / "base"), str(tmp_path / "by_hand"), **kw).layers}
    assert got.keys() == want.keys() and "layers.1.weight" in got
    for name, s in want.items():
        assert got[name].norm == pytest.approx(s.norm, rel=1e-5, abs=1e-7), name
    assert got["layers.1.weight"].norm == 0.0
    assert got["layers.0.weight"].norm == pytest.approx(float(_dense(tensors, "layers.0").norm()), rel=1e-5)

    rec_kw = {"target_p": 0.5, "has_labelled_data": True, "can_refinetune": False, **kw}
    full = recommend(str(tmp_path / "base"), str(tmp_path / "by_hand"), **rec_kw)
    lora = recommend(str(tmp_path / "base"), str(tmp_path / "adapter"), **rec_kw)
    assert full.numbers["rel_norm"] > 0.1 and full.method == "wanda"  # a large delta
    assert lora.numbers["rel_norm"] == pytest.approx(full.numbers["rel_norm"], rel=1e-5)
    assert lora.method == "darex-q" and "LoRA product" in lora.reason
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary merges are gone
