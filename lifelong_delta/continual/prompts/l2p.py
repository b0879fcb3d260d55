"""L2P: Learning to Prompt for continual learning (Wang et al., CVPR 2022, https://arxiv.org/abs/2112.08654).

A pool of ``pool_size`` prompts, each ``length`` tokens with a key. The frozen backbone's query picks the
``top_k`` keys of highest cosine similarity; their prompts are prepended to the tokens (prompt-tuning) and the
classifier reads the mean of the prompt tokens' outputs. A surrogate loss pulls the chosen keys toward the
query: ``pull_weight * mean_b Σ_{i in top-k} (1 − cos(q_b, k_i))``. Defaults are the paper's: pool 10, length 5,
top-k 5, λ = 0.1 (https://github.com/google-research/l2p).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lifelong_delta.continual.prefix import vit_tokens
from lifelong_delta.continual.prompts.base import PromptModule

__all__ = ["L2P", "L2PPool", "select_prompts"]


def select_prompts(query: Tensor, keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k key–query matching by cosine similarity.

    Args:
        query: [B, D] queries.
        keys: [M, D] prompt keys.
        top_k: number of prompts per example.

    Returns:
        ``(indices [B, top_k] in decreasing similarity, cosine similarities [B, M])``.
    """
    sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    return sim.topk(top_k, dim=1).indices, sim


class L2PPool(nn.Module):
    """Prompt pool with keys: ``keys`` [M, D_key], ``prompts`` [M, L, D] (uniform in [-1, 1], as in L2P).

    Args:
        pool_size: number of prompts M.
        length: tokens per prompt L.
        top_k: prompts chosen per example.
        embed_dim: token width D.
        key_dim: query/key width.
    """

    def __init__(self, pool_size: int, length: int, top_k: int, embed_dim: int, key_dim: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim).uniform_(-1.0, 1.0))
        self.prompts = nn.Parameter(torch.empty(pool_size, length, embed_dim).uniform_(-1.0, 1.0))

    def forward(self, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt tokens for ``query`` [B, D_key].

        Returns:
            ``(tokens [B, top_k * L, D], indices [B, top_k], pull loss (scalar, unweighted))``.
        """
        idx, sim = select_prompts(query.detach(), self.keys, self.top_k)
        tokens = self.prompts[idx].flatten(1, 2)
        pull = (1.0 - sim.gather(1, idx)).sum(dim=1).mean()
        return tokens, idx, pull


class L2P(PromptModule):
    """L2P on a frozen timm ViT (prompt-tuning with a keyed prompt pool).

    Args:
        pool_size: prompts in the pool (paper: 10).
        length: tokens per prompt (paper: 5).
        top_k: prompts per example (paper: 5), prepended together: ``top_k * length`` tokens.
        pull_weight: λ of the key pull loss (paper: 0.1).
        feature: classifier input: ``"prompt"`` (mean of the prompt tokens' outputs, as in L2P) or ``"pool"`` (the
            backbone's own pooling over its tokens, prompts left out).
        **kwargs: :class:`PromptModule` / ``ContinualModule`` options.
    """

    def __init__(
        self,
        pool_size: int = 10,
        length: int = 5,
        top_k: int = 5,
        pull_weight: float = 0.1,
        feature: Literal["prompt", "pool"] = "prompt",
        **kwargs: Any,
    ) -> None:
        for option, value in (("pool_size", pool_size), ("length", length), ("top_k", top_k)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if top_k > pool_size:
            raise ValueError(f"top_k={top_k} exceeds pool_size={pool_size}")
        if pull_weight < 0:
            raise ValueError(f"pull_weight must be >= 0, got {pull_weight}")
        if feature not in ("prompt", "pool"):
            raise ValueError(f"feature must be 'prompt' or 'pool', got {feature!r}")
        self.pool_size, self.length, self.top_k = pool_size, length, top_k
        self.pull_weight, self.feature = pull_weight, feature
        super().__init__(**kwargs)

    def _build_prompts(self) -> None:
        net = self.net
        self.prompts = L2PPool(self.pool_size, self.length, self.top_k, net.embed_dim, net.num_features)

    def _prompted_features(self, x: Tensor, query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, _, pull = self.prompts(query)
        out = vit_tokens(self.net, x, tokens=tokens)
        net, n, p = self.net, self.net.num_prefix_tokens, tokens.shape[1]
        if self.feature == "prompt":
            feats = net.head_drop(net.fc_norm(out[:, n : n + p].mean(dim=1)))
        else:
            feats = net.forward_head(torch.cat([out[:, :n], out[:, n + p :]], dim=1), pre_logits=True)
        return feats, {"pull": self.pull_weight * pull}
