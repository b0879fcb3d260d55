"""A timm ViT forward with prompts: prompt-tuning tokens and prefix-tuning key/value prefixes.

* **Prompt-tuning** (L2P, Wang et al., https://arxiv.org/abs/2112.08654): learned tokens are inserted into the
  token sequence after the positional embedding (after the class/register tokens) and go through every block.
* **Prefix-tuning** (DualPrompt, https://arxiv.org/abs/2204.04799; CODA-P, https://arxiv.org/abs/2211.13218):
  in the chosen blocks, learned prefixes ``p_k, p_v`` [B, L, D] are prepended to the attention's keys and values
  (after the QKV projection, so they live in key/value space), ``softmax(q [p_k; k]ᵀ/√d) [p_v; v]``; the number
  of output tokens does not change.

:func:`vit_tokens` re-runs timm's ``VisionTransformer.forward_features`` block by block and calls timm's own
modules, so with no prompts it is exactly ``net.forward_features(x)``; blocks with a prefix use
:func:`prefix_attention`, a copy of timm's ``Attention.forward`` with the two concatenations.

Pure functions of (timm modules, tensors); no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Prefix", "block_forward", "check_vit", "prefix_attention", "query_features", "vit_tokens"]

#: Key and value prefixes of one block, each [B, L, attn_dim] (L may differ per block, and may be 0).
Prefix = tuple[Tensor, Tensor]


def check_vit(net: nn.Module, blocks: list[int] | tuple[int, ...] = ()) -> None:
    """Raise ``TypeError`` unless ``net`` is a timm ``VisionTransformer`` whose ``blocks`` are timm ``Block``s.

    Args:
        net: the backbone.
        blocks: block indices that will get prefixes (checked to exist).

    Raises:
        TypeError: for another architecture (prompt methods need a ``vit_*`` timm model).
        ValueError: for a block index outside ``0..depth-1``.
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(net, VisionTransformer):
        raise TypeError(f"prompt methods need a timm VisionTransformer (vit_*), got {type(net).__name__}")
    depth = len(net.blocks)
    for i in blocks:
        if not 0 <= i < depth:
            raise ValueError(f"prompt layer {i} does not exist: the backbone has blocks 0..{depth - 1}")
        blk = net.blocks[i]
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"prefix-tuning supports timm Block/Attention, block {i} is {type(blk).__name__}/"
                f"{type(blk.attn).__name__}"
            )


def prefix_attention(attn: nn.Module, x: Tensor, prefix: Prefix | None = None) -> Tensor:
    """timm ``Attention.forward`` with key/value prefixes prepended after the QKV projection.

    Args:
        attn: a ``timm.layers.Attention`` module (its weights, norms, dropout and fused/unfused setting are used).
        x: input tokens [B, N, C].
        prefix: ``(p_k, p_v)``, each [B, L, attn_dim] (``attn_dim = num_heads * head_dim``); ``None`` or L = 0
            is plain attention.

    Returns:
        Output tokens [B, N, C_out].
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None and prefix[0].shape[1] > 0:
        pk, pv = prefix
        if pk.shape != pv.shape or pk.shape[0] != B or pk.shape[2] != H * hd:
            raise ValueError(f"prefixes must be [B={B}, L, {H * hd}] each, got {tuple(pk.shape)}, {tuple(pv.shape)}")
        L = pk.shape[1]
        k = torch.cat([pk.reshape(B, L, H, hd).transpose(1, 2).to(k.dtype), k], dim=2)
        v = torch.cat([pv.reshape(B, L, H, hd).transpose(1, 2).to(v.dtype), v], dim=2)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def block_forward(blk: nn.Module, x: Tensor, prefix: Prefix | None = None) -> Tensor:
    """timm ``Block.forward`` (pre-norm residual attention + MLP) with :func:`prefix_attention`."""
    if prefix is None:
        return blk(x)
    x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), prefix)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def vit_tokens(
    net: nn.Module,
    x: Tensor,
    tokens: Tensor | None = None,
    prefixes: Mapping[int, Prefix] | None = None,
) -> Tensor:
    """``net.forward_features(x)`` with prompt tokens inserted and key/value prefixes in chosen blocks.

    Args:
        net: a timm ``VisionTransformer`` (see :func:`check_vit`).
        x: images [B, C, H, W].
        tokens: prompt tokens [B, P, D] inserted after the class/register tokens (before the patches); they get no
            positional embedding.
        prefixes: ``{block index: (p_k, p_v)}``.

    Returns:
        Final-normed tokens [B, n_prefix + P + N_patches, D]; the P prompt outputs sit at
        ``[net.num_prefix_tokens, net.num_prefix_tokens + P)``.
    """
    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
    if tokens is not None and tokens.shape[1] > 0:
        n = net.num_prefix_tokens
        x = torch.cat([x[:, :n], tokens.to(x.dtype), x[:, n:]], dim=1)
    prefixes = prefixes or {}
    for i, blk in enumerate(net.blocks):
        x = block_forward(blk, x, prefixes.get(i))
    return net.norm(x)


def query_features(net: nn.Module, x: Tensor, query: Literal["pool", "cls", "mean"] = "pool") -> Tensor:
    """The prompt query of images ``x``: a forward of the backbone without prompts, no gradient.

    Args:
        net: a timm ``VisionTransformer``.
        x: images [B, C, H, W].
        query: ``"pool"``: the backbone's own pre-logits features (the class token for ``global_pool='token'``,
            the normed mean of the patch tokens for ``global_pool='avg'``, as the offline ViT has); ``"cls"``: the
            final class token (needs ``class_token=True``); ``"mean"``: the mean of the final patch tokens.

    Returns:
        Query [B, D].
    """
    with torch.no_grad():
        feats = net.forward_features(x)
        if query == "pool":
            return net.forward_head(feats, pre_logits=True)
        if query == "cls":
            if getattr(net, "cls_token", None) is None:
                raise ValueError("query='cls' needs a backbone with a class token; use query='pool' or 'mean'")
            return feats[:, 0]
        if query == "mean":
            return feats[:, net.num_prefix_tokens :].mean(dim=1)
    raise ValueError(f"query must be 'pool', 'cls' or 'mean', got {query!r}")
