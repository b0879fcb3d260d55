"""The prompted ViT forward: exactly timm's with no prompts, brute-force attention with a prefix."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from lifelong_delta.continual.prefix import check_vit, prefix_attention, query_features, vit_tokens

KW = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2}
POOLS = {"avg": {"class_token": False, "global_pool": "avg"}, "token": {}}


def _vit(pool: str = "avg", fused: bool = True) -> torch.nn.Module:
    net = timm.create_model("vit_tiny_patch16_224", num_classes=4, **KW, **POOLS[pool]).eval()
    for blk in net.blocks:
        blk.attn.fused_attn = fused
    return net


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_empty_prompts_equal_the_timm_forward_exactly(pool: str, fused: bool) -> None:
    net = _vit(pool, fused)
    x = torch.randn(5, 1, 8, 8)
    empty = torch.zeros(5, 0, 32)
    with torch.no_grad():
        ref = net.forward_features(x)
        assert torch.equal(vit_tokens(net, x), ref)
        assert torch.equal(vit_tokens(net, x, tokens=empty, prefixes={i: (empty, empty) for i in range(3)}), ref)
        assert torch.equal(prefix_attention(net.blocks[1].attn, ref, (empty, empty)), net.blocks[1].attn(ref))


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_attention_equals_brute_force(fused: bool) -> None:
    torch.manual_seed(1)
    attn = _vit("token", fused).blocks[0].attn
    B, N, L, C, H = 2, 5, 3, 32, 2
    x, pk, pv = torch.randn(B, N, C), torch.randn(B, L, C), torch.randn(B, L, C)
    with torch.no_grad():
        out = prefix_attention(attn, x, (pk, pv))
        # by hand, one head at a time: softmax(q [pk; k]^T / sqrt(d)) [pv; v], then the output projection
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
        k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        d = C // H
        heads = []
        for h in range(H):
            s = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
            heads.append(weights @ v[..., s])
        ref = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.shape == (B, N, C)  # a prefix adds keys, not output tokens


def test_prompt_tokens_follow_the_class_token_and_keep_the_patches() -> None:
    net = _vit("token")
    x, tokens = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 32)
    with torch.no_grad():
        out = vit_tokens(net, x, tokens=tokens)
    assert out.shape == (2, 1 + 3 + 4, 32)
    # with blocks and norm removed, the sequence is [cls, prompts, patches] exactly
    net.blocks, net.norm = torch.nn.Sequential(), torch.nn.Identity()
    with torch.no_grad():
        plain = net.forward_features(x)
        out = vit_tokens(net, x, tokens=tokens)
    assert torch.equal(out[:, :1], plain[:, :1]) and torch.equal(out[:, 1:4], tokens)
    assert torch.equal(out[:, 4:], plain[:, 1:])


def test_query_features() -> None:
    x = torch.randn(3, 1, 8, 8)
    avg, tok = _vit("avg"), _vit("token")
    with torch.no_grad():
        assert torch.equal(query_features(avg, x), avg.forward_head(avg.forward_features(x), pre_logits=True))
        assert torch.equal(query_features(tok, x, "cls"), tok.forward_features(x)[:, 0])
        assert torch.equal(query_features(tok, x, "mean"), tok.forward_features(x)[:, 1:].mean(1))
    assert not query_features(avg, x).requires_grad
    with pytest.raises(ValueError, match="class token"):
        query_features(avg, x, "cls")


def test_check_vit_rejects_other_models_and_missing_blocks() -> None:
    net = _vit()
    check_vit(net, [0, 2])
    with pytest.raises(ValueError, match="blocks 0..2"):
        check_vit(net, [3])
    with pytest.raises(TypeError, match="VisionTransformer"):
        check_vit(torch.nn.Linear(2, 2))
