"""A small Llama pretrained and fine-tuned on CPU, cached as Hugging Face directories (safetensors + tokenizer).

Layout of the cache (default ``$LIFELONG_DELTA_CACHE/decoder``, i.e. ``~/.cache/lifelong_delta/decoder``)::

    base/        the pretrained model θ_pre and the BPE tokenizer trained on the pretraining corpus
    <recipe>/    a fine-tune of base/ (``adamw``, ``adamr-l2``): θ_ft
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json  train.json

``train.json`` records the hyper-parameters, the corpus, the parameter count, the loss curve and the wall time. A
directory is written to a temporary sibling and renamed, so an interrupted run leaves no half model; a cached
directory is reused when its hyper-parameters equal the asked ones (a fine-tune's include the SHA-256 of the base
weights) and is a ``ValueError`` otherwise. The pair works as ``lifelong-delta prune --base <cache>/base
--finetuned <cache>/<recipe>``.

The training loop is plain torch: packed blocks in a seeded order, linear warm-up then linear decay of the learning
rate to 0, gradient clipping at norm 1. The weights depend on torch's thread count (CPU reductions), which
``train.json`` records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lifelong_delta import outputs

__all__ = ["INFO_FILE", "LMSpec", "TrainSpec", "cache_root", "ensure_model", "read_info", "train_lm_", "weights_sha256"]

INFO_FILE = "train.json"


def cache_root() -> Path:
    """``$LIFELONG_DELTA_CACHE/decoder`` (default ``~/.cache/lifelong_delta/decoder``), variables expanded."""
    root = os.path.expandvars(os.environ.get("LIFELONG_DELTA_CACHE", "~/.cache/lifelong_delta"))
    return Path(root).expanduser() / "decoder"


@dataclass(frozen=True)
class LMSpec:
    """Shape of the Llama (``transformers.LlamaConfig``): RMSNorm, rotary positions, SwiGLU, grouped-query attention.

    The default has 10.5 M parameters: 8 layers of width 256 (4 heads of 64, 2 key/value heads), a SwiGLU of 768,
    a vocabulary of 8 192 and untied input and output embeddings (4.2 M of the parameters).
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    seq_len: int = 128
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be a multiple of model.heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads={self.heads} must be a multiple of model.kv_heads={self.kv_heads}")

    def config(self) -> Any:
        """The ``LlamaConfig`` (end-of-text, id 0, is BOS, EOS and padding)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.seq_len,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )


@dataclass(frozen=True)
class TrainSpec:
    """One training run.

    Attributes:
        steps: optimiser steps.
        lr: peak learning rate (linear warm-up over ``warmup_fraction`` of the steps, then linear decay to 0).
        batch_size: blocks per step.
        optimizer: ``adamw`` (``torch.optim.AdamW``) or ``adamr`` (:class:`lifelong_delta.optim.AdamR`, whose
            decoupled pull toward the starting weights is DAREx-L2, arXiv 2410.09344).
        reg: AdamR's λ (``adamr`` only).
        weight_decay: AdamW's decoupled weight decay of the 2-D weights (``adamw`` only).
        betas: Adam's (β1, β2).
        warmup_fraction: share of the steps spent warming up.
        seed: seed of the block order.
    """

    steps: int
    lr: float
    batch_size: int = 32
    optimizer: Literal["adamw", "adamr"] = "adamw"
    reg: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "adamr"):
            raise ValueError(f"optimizer={self.optimizer!r} is not one of 'adamw', 'adamr'")
        if self.optimizer == "adamw" and self.reg:
            raise ValueError("reg (AdamR's λ) is set but optimizer='adamw'")
        if self.optimizer == "adamr" and self.weight_decay:
            raise ValueError("weight_decay is set but optimizer='adamr' decays toward the base with reg")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def _optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamr":
        from lifelong_delta.optim import AdamR

        return AdamR(params, lr=spec.lr, betas=spec.betas, reg=spec.reg, variant="l2")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def _schedule(step: int, spec: TrainSpec) -> float:
    """Learning-rate factor of ``step`` (0-based): linear warm-up, then linear decay to 0 at ``spec.steps``."""
    warm = max(1, round(spec.warmup_fraction * spec.steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (spec.steps - step) / max(1, spec.steps - warm))


def train_lm_(
    model: torch.nn.Module, blocks: torch.Tensor, spec: TrainSpec, on_step: Callable[[int, float], None] | None = None
) -> list[float]:
    """Train the causal LM ``model`` IN PLACE on ``blocks`` (``LongTensor[n, seq_len]``) for ``spec.steps`` steps.

    Each epoch visits the blocks in a fresh order from ``torch.Generator`` seeded with ``spec.seed``; a step takes
    the next ``spec.batch_size`` blocks (an epoch's last partial batch is skipped).

    Returns:
        The training loss of every step.
    """
    if len(blocks) < spec.batch_size:
        raise ValueError(f"{len(blocks)} training blocks are fewer than batch_size={spec.batch_size}")
    gen = torch.Generator().manual_seed(spec.seed)
    opt = _optimizer(model, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, spec))
    per_epoch = len(blocks) // spec.batch_size
    order = torch.randperm(len(blocks), generator=gen)
    losses = []
    model.train()
    for step in range(spec.steps):
        k = step % per_epoch
        if k == 0 and step:
            order = torch.randperm(len(blocks), generator=gen)
        x = blocks[order[k * spec.batch_size : (k + 1) * spec.batch_size]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise ValueError(f"training diverged at step {step + 1} (loss {losses[-1]}); lower the learning rate")
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def weights_sha256(directory: str | os.PathLike[str]) -> str:
    """SHA-256 of ``<directory>/model.safetensors`` (ties a fine-tune to the exact base it started from)."""
    h = hashlib.sha256()
    with open(Path(directory) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_info(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``train.json`` of a cached model directory (None if absent or unreadable)."""
    try:
        return json.loads((Path(directory) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_model(
    path: Path, hparams: dict[str, Any], build: Callable[[Path], dict[str, Any]], *, force: bool = False
) -> tuple[Path, bool]:
    """The cached model directory ``path``, built once by ``build(tmp_dir)`` (which returns facts for train.json).

    Returns:
        ``(path, built)``: ``built`` is False when a directory with the same ``hparams`` was reused.

    Raises:
        ValueError: ``path`` holds a model made with other hyper-parameters (and ``force`` is False), naming them.
    """
    hparams = json.loads(json.dumps(hparams))  # tuples as lists, as read back from train.json
    info = read_info(path)
    if info is not None and not force:
        old = info.get("hparams", {})
        diff = sorted(k for k in set(old) | set(hparams) if old.get(k) != hparams.get(k))
        if not diff:
            return path, False
        what = ", ".join(f"{k}={old.get(k)!r} (asked {hparams.get(k)!r})" for k in diff)
        raise ValueError(f"{path} was made with {what}; pass --force to redo it, or another --cache_dir")
    if info is None and path.exists() and any(path.iterdir()) and not force:
        raise ValueError(f"{path} exists but has no readable {INFO_FILE}; remove it or pass --force")
    start = time.perf_counter()
    with outputs.atomic_dir(path) as tmp:
        facts = build(tmp)
        record = {
            "hparams": hparams,
            **facts,
            "wall_time_s": round(time.perf_counter() - start, 1),
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
        }
        (tmp / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return path, True


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
