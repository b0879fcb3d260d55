"""A pretrained-looking MPNet directory made on the spot, for tests of the ``mpnet`` backbone row without real
weights (``tests/text/test_backbones.py`` and the prune-eval study's tests)."""

import contextlib
import dataclasses
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lifelong_delta.text.backbones import BACKBONES

TINY = {
    "epochs": 1,
    "max_train_examples": 16,
    "max_eval_examples": 12,
    "max_length": 12,
    "batch_size": 8,
    "progress": False,
}
"""Fine-tune settings that train the tiny MPNet in a second or two."""


def write_tiny_mpnet(path: Path) -> Path:
    """Write a 2-layer ``MPNetModel`` (no head) and a character-level WordPiece tokenizer to ``path``."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    letters = string.ascii_lowercase + string.digits + "?.,'-"
    words = [
        "<s>",
        "<pad>",
        "</s>",
        "[UNK]",
        "<mask>",
        *letters,
        *(f"##{c}" for c in letters),
        "what",
        "is",
        "the",
        "who",
        "how",
        "film",
        "of",
    ]
    MPNetTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
    )  # 32 buckets: MPNet hard-codes them
    MPNetModel(config).save_pretrained(path)
    return path


@contextlib.contextmanager
def as_mpnet_row(path: Path) -> Iterator[Path]:
    """Point the ``mpnet`` row of ``BACKBONES`` at ``path`` while the context is open."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKBONES, "mpnet", dataclasses.replace(BACKBONES["mpnet"], locate=lambda: path))
        yield path
