"""Prompt baselines on a frozen timm ViT, as ``ContinualModule`` subclasses (same stream, head, metrics, configs).

* :class:`L2P` — keyed prompt pool, top-k prompt-tuning (https://arxiv.org/abs/2112.08654);
* :class:`DualPrompt` — G- and E-prompts, prefix-tuning (https://arxiv.org/abs/2204.04799);
* :class:`CodaPrompt` — attention-weighted prompt components, prefix-tuning (https://arxiv.org/abs/2211.13218).

The ViT forward with prompts is in :mod:`lifelong_delta.continual.prefix`.
"""

from lifelong_delta.continual.prompts.base import PromptModule
from lifelong_delta.continual.prompts.coda import CodaPrompt, CodaPromptPool, gram_schmidt_, orthogonality_loss
from lifelong_delta.continual.prompts.dualprompt import DualPrompt, DualPromptPool
from lifelong_delta.continual.prompts.l2p import L2P, L2PPool, select_prompts

__all__ = [
    "L2P",
    "CodaPrompt",
    "CodaPromptPool",
    "DualPrompt",
    "DualPromptPool",
    "L2PPool",
    "PromptModule",
    "gram_schmidt_",
    "orthogonality_loss",
    "select_prompts",
]
