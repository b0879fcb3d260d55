"""LoRA adapters read without peft, checked against peft's own merge."""

import copy
import json

import pytest
import torch
from torch import nn

from lifelong_delta.delta.lora import (
    load_lora_adapter,
    lora_deltas,
    lora_scaling,
    prune_lora_factors,
    replaced_tensors,
)

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.proj(self.lin(self.emb(x))))


def _peft_roundtrip(tmp_path, base, **cfg):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                prm.copy_(torch.randn_like(prm) * 0.5)
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload().state_dict()
    return merged


@pytest.mark.parametrize("use_rslora", [False, True])
def test_deltas_equal_peft_merge(tmp_path, use_rslora):
    torch.manual_seed(0)
    base = Tiny()
    merged = _peft_roundtrip(
        tmp_path,
        base,
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        target_modules=["emb", "lin", "conv", "proj"],
        modules_to_save=["head"],
        rank_pattern={"proj": 2},
        alpha_pattern={"conv": 3},
    )
    adapter = load_lora_adapter(tmp_path)
    deltas = lora_deltas(adapter)
    assert set(deltas) == {"emb.weight", "lin.weight", "conv.weight", "proj.weight"}
    pre = base.state_dict()
    for name, d in deltas.items():
        assert d.shape == pre[name].shape
        torch.testing.assert_close(pre[name] + d, merged[name], rtol=1e-5, atol=1e-5)
    full = replaced_tensors(adapter)
    assert set(full) == {"head.weight", "head.bias"}
    torch.testing.assert_close(full["head.weight"], merged["head.weight"])
    assert lora_scaling(adapter.config, "proj") == pytest.approx(8 / (2**0.5 if use_rslora else 2))


def test_fan_in_fan_out_matches_peft(tmp_path):
    from transformers.pytorch_utils import Conv1D

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(9, 5)  # weight [in=5, out=9]

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(1)
    base = G()
    merged = _peft_roundtrip(tmp_path, base, r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True)
    d = lora_deltas(load_lora_adapter(tmp_path))["c_attn.weight"]
    torch.testing.assert_close(base.c_attn.weight + d, merged["c_attn.weight"], rtol=1e-5, atol=1e-5)


def test_bin_weights_and_bad_directories(tmp_path):
    torch.manual_seed(0)
    _peft_roundtrip(tmp_path / "a", Tiny(), r=2, lora_alpha=2, target_modules=["lin"])
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    (tmp_path / "b").mkdir()
    torch.save(tensors, tmp_path / "b" / "adapter_model.bin")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    a, b = lora_deltas(load_lora_adapter(tmp_path / "a")), lora_deltas(load_lora_adapter(tmp_path / "b"))
    assert torch.equal(a["lin.weight"], b["lin.weight"])
    with pytest.raises(ValueError, match="adapter_config.json not found"):
        load_lora_adapter(tmp_path / "missing")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_lora_adapter(tmp_path / "c")
    (tmp_path / "c" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_lora_adapter(tmp_path / "c")
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="DoRA"):
        load_lora_adapter(tmp_path / "c")
    (tmp_path / "c" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        load_lora_adapter(tmp_path / "c")


def test_prune_factors_is_unbiased_and_uses_independent_masks(tmp_path):
    torch.manual_seed(0)
    _peft_roundtrip(tmp_path, Tiny(), r=4, lora_alpha=4, target_modules=["lin"])
    adapter = load_lora_adapter(tmp_path)
    exact = lora_deltas(adapter)["lin.weight"]
    p, n = 0.5, 600
    mean = sum(lora_deltas(prune_lora_factors(adapter, p, seed=s))["lin.weight"] for s in range(n)) / n
    # E[B'A'] = BA: the error shrinks like 1/sqrt(n); a biased estimator (e.g. one shared mask) would not
    assert (mean - exact).abs().max() < 0.15 * exact.abs().max()
    pruned = prune_lora_factors(adapter, p, seed=0)
    a_key = next(k for k in adapter.tensors if k.endswith("lora_A.weight"))
    assert adapter.tensors[a_key].ne(0).all()  # input not modified
    assert 0.3 < pruned.tensors[a_key].eq(0).float().mean() < 0.7
