"""DualPrompt (Wang et al., ECCV 2022, https://arxiv.org/abs/2204.04799).

Two kinds of prefix-tuning prompts on a frozen ViT:

* a **G-prompt** (general), shared by all tasks, in blocks ``g_layers`` (paper: 0–1, length 5);
* **E-prompts** (expert), a pool of ``pool_size`` (paper: 10) prompts with one key each, in blocks ``e_layers``
  (paper: 2–4, length 20). While task ``t`` trains, E-prompt ``t`` is used and its key is pulled toward the
  queries (task-identity matching, ``pull_weight * mean_b (1 − cos(q_b, k_t))``); at test time each example
  uses the E-prompt whose key best matches its query.

A prompt of length L gives L key and L value prefix positions (``[2, L, D]`` per block), as in the authors' JAX
code (https://github.com/google-research/l2p); the CODA-P authors' re-implementation instead splits one length-L
prompt into L/2 keys and L/2 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lifelong_delta.continual.prefix import Prefix, vit_tokens
from lifelong_delta.continual.prompts.base import PromptModule

__all__ = ["DualPrompt", "DualPromptPool"]


def _layers(option: str, layers: Sequence[int]) -> list[int]:
    layers = [int(i) for i in layers]
    if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
        raise ValueError(f"{option} must be distinct block indices >= 0, got {layers}")
    return layers


class DualPromptPool(nn.Module):
    """G-prompts ``g`` [n_g, 2, L_g, D], E-prompts ``e`` [M, n_e, 2, L_e, D] and E-keys ``keys`` [M, D_key].

    Initialised uniformly in [-1, 1], as L2P's prompts.
    """

    def __init__(
        self,
        g_layers: list[int],
        g_length: int,
        e_layers: list[int],
        e_length: int,
        pool_size: int,
        embed_dim: int,
        key_dim: int,
    ) -> None:
        super().__init__()
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        self.g = nn.Parameter(torch.empty(len(g_layers), 2, g_length, embed_dim).uniform_(-1.0, 1.0))
        self.e = nn.Parameter(torch.empty(pool_size, len(e_layers), 2, e_length, embed_dim).uniform_(-1.0, 1.0))
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim).uniform_(-1.0, 1.0))

    def forward(self, query: Tensor, task: int | None) -> tuple[dict[int, Prefix], Tensor, Tensor]:
        """Prefixes for ``query`` [B, D_key].

        Args:
            query: the frozen backbone's features.
            task: the training task (its E-prompt is used and pulled); ``None`` matches keys (inference).

        Returns:
            ``({block: (p_k, p_v)}, E-prompt index [B], pull loss (scalar, unweighted; 0 at inference))``.
        """
        B = query.shape[0]
        sim = F.normalize(query.detach(), dim=-1) @ F.normalize(self.keys, dim=-1).T  # [B, M]
        if task is None:
            idx = sim.argmax(dim=1)
            pull = sim.new_zeros(())
        else:
            idx = torch.full((B,), task, dtype=torch.long, device=query.device)
            pull = (1.0 - sim[:, task]).mean()
        prefixes: dict[int, Prefix] = {}
        e = self.e[idx]  # [B, n_e, 2, L_e, D]
        for j, layer in enumerate(self.e_layers):
            prefixes[layer] = (e[:, j, 0], e[:, j, 1])
        for j, layer in enumerate(self.g_layers):
            gk, gv = (self.g[j, c].expand(B, -1, -1) for c in (0, 1))
            if layer in prefixes:  # a block in both sets gets both prompts
                ek, ev = prefixes[layer]
                gk, gv = torch.cat([ek, gk], dim=1), torch.cat([ev, gv], dim=1)
            prefixes[layer] = (gk, gv)
        return prefixes, idx, pull


class DualPrompt(PromptModule):
    """DualPrompt on a frozen timm ViT (prefix-tuning with G- and E-prompts).

    Args:
        g_layers: blocks of the G-prompt (paper: [0, 1]).
        g_length: G-prompt length (paper: 5).
        e_layers: blocks of the E-prompts (paper: [2, 3, 4]).
        e_length: E-prompt length (paper: 20).
        pool_size: E-prompts (paper: 10); at least the number of tasks.
        pull_weight: λ of the E-key pull loss (paper: 1.0).
        **kwargs: :class:`PromptModule` / ``ContinualModule`` options.
    """

    def __init__(
        self,
        g_layers: Sequence[int] = (0, 1),
        g_length: int = 5,
        e_layers: Sequence[int] = (2, 3, 4),
        e_length: int = 20,
        pool_size: int = 10,
        pull_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.g_layers, self.e_layers = _layers("g_layers", g_layers), _layers("e_layers", e_layers)
        for option, value in (("g_length", g_length), ("e_length", e_length)):
            if value < 0:
                raise ValueError(f"{option} must be >= 0, got {value}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        if pull_weight < 0:
            raise ValueError(f"pull_weight must be >= 0, got {pull_weight}")
        self.g_length, self.e_length, self.pool_size, self.pull_weight = g_length, e_length, pool_size, pull_weight
        super().__init__(**kwargs)

    def prompt_layers(self) -> list[int]:
        return sorted(set(self.g_layers) | set(self.e_layers))

    def _build_prompts(self) -> None:
        net = self.net
        dim = net.blocks[0].attn.attn_dim
        self.prompts = DualPromptPool(
            self.g_layers, self.g_length, self.e_layers, self.e_length, self.pool_size, dim, net.num_features
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if len(self._tasks) > self.pool_size:
            raise ValueError(
                f"DualPrompt needs one E-prompt per task: pool_size={self.pool_size} < n_tasks={len(self._tasks)}"
            )

    def _prompted_features(self, x: Tensor, query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        task = self.tasks_seen() - 1 if self.training else None
        prefixes, _, pull = self.prompts(query, task)
        out = vit_tokens(self.net, x, prefixes=prefixes)
        return self.net.forward_head(out, pre_logits=True), {"pull": self.pull_weight * pull}
