"""``PromptModule``: the shared part of the prompt baselines (L2P, DualPrompt, CODA-P) on a frozen timm ViT.

A prompt method is a :class:`~lifelong_delta.continual.module.ContinualModule` (same task stream, head, masked
loss, metrics, optimizer restart per task and configs) whose forward is:

1. the **query**: one forward of the frozen backbone without prompts, no gradient (:func:`query_features`);
2. the **prompts** chosen or assembled from the query by the method's pool (``_prompted_features``);
3. the **prompted forward** of the backbone (:func:`~lifelong_delta.continual.prefix.vit_tokens`), its pooled
   features and the shared linear head.

Only the prompts (pools, keys) and ``trainable`` (default: the head) train. A method's own loss terms (key pull,
orthogonality) are returned by ``extra_losses`` and logged as ``train/<name>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lifelong_delta.continual.module import ContinualModule
from lifelong_delta.continual.prefix import check_vit, query_features

__all__ = ["PromptModule"]

QueryKind = Literal["pool", "cls", "mean"]


class PromptModule(ContinualModule):
    """Base class of prompt methods: a frozen timm ViT queried once per batch, prompts and head trained.

    Args:
        query: the query feature: ``"pool"`` (the backbone's pre-logits features: class token or normed mean
            token, whichever the backbone pools), ``"cls"`` or ``"mean"`` (see :func:`query_features`).
        trainable: globs over backbone parameters that train besides the prompts (default: the head only).
        **kwargs: the :class:`ContinualModule` options (backbone, pretrained, loss, optimizer, ...). PredKD and
            FeatKD are not part of these methods (their teacher would not see the prompts) and must stay 0.
            Anchors penalise backbone parameters; a Fisher-type anchor sees the backbone without prompts.

    Subclasses build their pool in ``_build_prompts`` (``self.prompts``) and implement ``_prompted_features``.
    """

    def __init__(self, query: QueryKind = "pool", trainable: Sequence[str] = ("head.*",), **kwargs: Any) -> None:
        if query not in ("pool", "cls", "mean"):
            raise ValueError(f"query must be 'pool', 'cls' or 'mean', got {query!r}")
        for option in ("pred_kd", "feat_kd"):
            if kwargs.get(option):
                raise ValueError(f"{option} must be 0 for prompt methods (the teacher would not see the prompts)")
        self.query = query
        self.prompts: nn.Module | None = None
        self._aux: dict[str, Tensor] = {}
        super().__init__(trainable=trainable, **kwargs)

    # ------------------------------------------------------------------ structure
    def _build_net(self, num_classes: int, pretrained: bool | str) -> None:
        super()._build_net(num_classes, pretrained)
        check_vit(self.net, self.prompt_layers())
        self._build_prompts()
        n_prompt = sum(p.numel() for p in self.prompts.parameters() if p.requires_grad)
        rank_zero_info(f"{type(self).__name__}: + {n_prompt:,} trainable prompt parameters")

    def prompt_layers(self) -> list[int]:
        """Blocks that receive prefixes (checked against the backbone depth)."""
        return []

    def _build_prompts(self) -> None:
        raise NotImplementedError

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        prompt_params = [(f"prompts.{n}", p) for n, p in self.prompts.named_parameters() if p.requires_grad]
        return super().trainable_parameters() + prompt_params

    # ------------------------------------------------------------------ forward
    def tasks_seen(self) -> int:
        """Tasks the prompts may use now: up to the one training (fit) or the last trained (eval)."""
        if self._trainer is not None and self._tasks:
            return self._seen_tasks()
        return max(self._optimizer_task + 1, 1)

    def _prompted_features(self, x: Tensor, query: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Pre-logits features [B, D] of ``x`` with the prompts chosen by ``query`` [B, Dq], and loss terms."""
        raise NotImplementedError

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q = query_features(self.net, x, self.query)
        feats, aux = self._prompted_features(x, q)
        if self.training:
            self._aux = aux
        return feats, self.net.get_classifier()(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] of images ``x`` [B, C, H, W], through the prompts."""
        return self.features_and_logits(x)[1]

    def extra_losses(self) -> dict[str, Tensor]:
        aux, self._aux = self._aux, {}
        return aux
