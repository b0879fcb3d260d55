"""CODA-Prompt (Smith et al., CVPR 2023, https://arxiv.org/abs/2211.13218).

Each prompted block ``l`` holds ``pool_size`` components ``P_m`` [2, L, D] (key and value prefixes) with a key
``K_m`` and an attention vector ``A_m`` [D_key]. The prompt of an example is a weighted sum of the components,

    α_m = cos(q ⊙ A_m, K_m),      p = Σ_m α_m P_m,

trained end to end through the classification loss (no key pull). The pool is cut into equal parts per task:
task ``t`` adds components ``[s, f) = [t·M/T, (t+1)·M/T)``, those of earlier tasks are used but frozen (detached)
and later ones are unused. When a task starts its new components are re-drawn orthonormal and orthogonal to the
older ones (Gram–Schmidt; the authors' ImageNet-R runs rely on this and set the penalty weight to 0). The
optional regulariser ``ortho_weight * Σ_l [ortho(K_l) + ortho(A_l) + ortho(P_l)]`` with
``ortho(X) = mean((X Xᵀ − I)²)`` (the authors' code has an extra factor 1e-6 inside) keeps them so.

Paper defaults: pool 100, length 8, blocks 0–4, prefix-tuning. A length-L prompt gives L key and L value positions
here (the authors' code splits one length-8 prompt into 4 + 4; use ``length: 4`` to match its count).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lifelong_delta.continual.data import mix_seed
from lifelong_delta.continual.prefix import Prefix, vit_tokens
from lifelong_delta.continual.prompts.base import PromptModule

__all__ = ["CodaPrompt", "CodaPromptPool", "gram_schmidt_", "orthogonality_loss"]


def orthogonality_loss(rows: Tensor) -> Tensor:
    """``mean((X Xᵀ − I)²)`` of the rows X [M, d]: 0 iff the rows are orthonormal."""
    gram = rows @ rows.T
    return (gram - torch.eye(len(rows), dtype=rows.dtype, device=rows.device)).pow(2).mean()


@torch.no_grad()
def gram_schmidt_(weight: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> None:
    """Re-draw rows ``start:stop`` of ``weight`` [M, d] in place: orthonormal, and orthogonal to rows ``:start``.

    The new rows are Gaussian draws with the span of the older rows projected out, then orthonormalised (QR in
    float64, i.e. Gram–Schmidt).

    Raises:
        ValueError: if ``stop > d`` (more than d orthogonal rows cannot exist).
    """
    d = weight.shape[1]
    if stop > d:
        raise ValueError(f"cannot make {stop} orthogonal components of dimension {d}: lower pool_size")
    new = torch.randn(stop - start, d, generator=generator, dtype=torch.float64)
    if start > 0:
        basis, _ = torch.linalg.qr(weight[:start].double().cpu().T)  # [d, start]
        new = new - (new @ basis) @ basis.T
    q, r = torch.linalg.qr(new.T)  # [d, n]
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    weight[start:stop] = q.T.to(weight.dtype).to(weight.device)


class CodaPromptPool(nn.Module):
    """Components ``prompts`` [n_layers, M, 2, L, D], keys ``keys`` and attention ``attn`` [n_layers, M, D_key].

    All three start orthonormal over the M components (per block, as the authors' ``tensor_prompt(ortho=True)``).
    Buffers (they travel in checkpoints): ``task_initialised``, the last task whose components were re-drawn, and
    ``n_tasks``, the length of the stream (so a model loaded without its data still splits the pool right).
    """

    def __init__(self, layers: list[int], pool_size: int, length: int, embed_dim: int, key_dim: int) -> None:
        super().__init__()
        if pool_size > key_dim:
            raise ValueError(
                f"pool_size={pool_size} exceeds the key width {key_dim}: CODA-P's keys and attention "
                "vectors are orthogonal, so pool_size must be <= the backbone's embedding width"
            )
        self.layers = list(layers)
        n = len(layers)
        self.prompts = nn.Parameter(torch.empty(n, pool_size, 2, length, embed_dim))
        self.keys = nn.Parameter(torch.empty(n, pool_size, key_dim))
        self.attn = nn.Parameter(torch.empty(n, pool_size, key_dim))
        with torch.no_grad():
            for j in range(n):
                nn.init.orthogonal_(self.prompts[j].view(pool_size, -1))
                nn.init.orthogonal_(self.keys[j])
                nn.init.orthogonal_(self.attn[j])
        self.register_buffer("task_initialised", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_tasks", torch.zeros((), dtype=torch.long))  # of the stream, set by the module

    @property
    def pool_size(self) -> int:
        return self.keys.shape[1]

    def _components(self, p: Tensor, start: int, stop: int, freeze_old: bool) -> Tensor:
        return torch.cat([p[:start].detach(), p[start:stop]]) if freeze_old and start > 0 else p[:stop]

    def forward(
        self, query: Tensor, start: int, stop: int, training: bool
    ) -> tuple[dict[int, Prefix], Tensor, list[Tensor]]:
        """Prefixes for ``query`` [B, D_key] from components ``[0, stop)``; ``[0, start)`` frozen when training.

        Returns:
            ``({block: (p_k, p_v)}, weights α [n_layers, B, stop], per-block component matrices for the
            orthogonality loss)``.
        """
        prefixes: dict[int, Prefix] = {}
        alphas, mats = [], []
        for j, layer in enumerate(self.layers):
            K, A, P = (self._components(p[j], start, stop, training) for p in (self.keys, self.attn, self.prompts))
            aq = F.normalize(query.unsqueeze(1) * A.unsqueeze(0), dim=2)  # [B, k, d]: q ⊙ A_m
            alpha = torch.einsum("bkd,kd->bk", aq, F.normalize(K, dim=1))
            p = torch.einsum("bk,kcld->bcld", alpha, P)  # [B, 2, L, D]
            prefixes[layer] = (p[:, 0], p[:, 1])
            alphas.append(alpha)
            mats += [K, A, P.flatten(1)]
        return prefixes, torch.stack(alphas), mats

    @torch.no_grad()
    def start_task_(self, task: int, start: int, stop: int, seed: int = 0) -> bool:
        """Re-draw components ``[start, stop)`` of ``task`` orthogonal to the older ones, once (in place).

        Deterministic in (seed, task, block), so every DDP rank draws the same values.

        Returns:
            Whether anything was re-drawn (False if ``task`` was already initialised).
        """
        if task <= int(self.task_initialised):
            return False
        for j in range(len(self.layers)):
            for name, p in (
                ("keys", self.keys[j]),
                ("attn", self.attn[j]),
                ("prompts", self.prompts[j].view(self.pool_size, -1)),
            ):
                g = torch.Generator().manual_seed(mix_seed(seed, "coda-p", task, j, name))
                gram_schmidt_(p, start, stop, g)
        self.task_initialised.fill_(task)
        return True


class CodaPrompt(PromptModule):
    """CODA-P on a frozen timm ViT (attention-weighted prompt components, prefix-tuning).

    Args:
        layers: prompted blocks (paper: [0, 1, 2, 3, 4]).
        pool_size: components M in all (paper: 100), split evenly over the tasks; at most the embedding width.
        length: prefix positions per component (paper: 8).
        ortho_weight: weight of the orthogonality regulariser (the authors' ImageNet-R runs: 0, Gram–Schmidt
            initialisation only).
        **kwargs: :class:`PromptModule` / ``ContinualModule`` options. Use an optimizer without weight decay:
            frozen components get zero gradients, but decoupled weight decay would still move them.
    """

    def __init__(
        self,
        layers: Sequence[int] = (0, 1, 2, 3, 4),
        pool_size: int = 100,
        length: int = 8,
        ortho_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        layers = [int(i) for i in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct block indices, got {layers}")
        if pool_size < 1 or length < 1:
            raise ValueError(f"pool_size and length must be >= 1, got {pool_size}, {length}")
        if ortho_weight < 0:
            raise ValueError(f"ortho_weight must be >= 0, got {ortho_weight}")
        self.layers, self.pool_size, self.length, self.ortho_weight = layers, pool_size, length, ortho_weight
        super().__init__(**kwargs)

    def prompt_layers(self) -> list[int]:
        return list(self.layers)

    def _build_prompts(self) -> None:
        net = self.net
        dim = net.blocks[0].attn.attn_dim
        self.prompts = CodaPromptPool(self.layers, self.pool_size, self.length, dim, net.num_features)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.pool_size < len(self._tasks):
            raise ValueError(
                f"CODA-P needs >= 1 component per task: pool_size={self.pool_size} < n_tasks={len(self._tasks)}"
            )
        self.prompts.n_tasks.fill_(len(self._tasks))

    def component_range(self, task: int) -> tuple[int, int]:
        """Components ``[start, stop)`` that ``task`` adds (``pool_size // n_tasks`` each)."""
        per = self.pool_size // max(len(self._tasks) or int(self.prompts.n_tasks), 1)
        return task * per, (task + 1) * per

    def _start_prompt_task(self) -> None:
        t = self.current_task
        if t > 0:
            start, stop = self.component_range(t)
            self.prompts.start_task_(t, start, stop, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._start_prompt_task()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._start_prompt_task()

    def _prompted_features(self, x: Tensor, query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.tasks_seen() - 1
        start, stop = self.component_range(t)
        prefixes, _, mats = self.prompts(query, start, stop, self.training)
        out = vit_tokens(self.net, x, prefixes=prefixes)
        aux = {}
        if self.training and self.ortho_weight > 0:
            aux["ortho"] = self.ortho_weight * sum(orthogonality_loss(m) for m in mats)
        return self.net.forward_head(out, pre_logits=True), aux
