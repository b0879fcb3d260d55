"""EWC anchor: ω = diagonal Fisher information, accumulated over tasks.

Elastic Weight Consolidation, Kirkpatrick et al., 2017, https://arxiv.org/abs/1612.00796; online accumulation
with decay γ from Schwarz et al., *Progress & Compress*, 2018, https://arxiv.org/abs/1805.06370.

The loss term is ``strength · Σ F (θ − θ*)²``. Checked against Avalanche 0.6: the Fisher is identical to its
``EWCPlugin``'s and the term equals its ``ewc_lambda · Σ F (θ − θ*)²``, so ``strength`` is Avalanche's
``ewc_lambda`` and Kirkpatrick et al.'s λ/2 (their term is ``λ/2 · Σ F (θ − θ*)²``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lifelong_delta.anchors.base import ParameterAnchor
from lifelong_delta.anchors.fisher import _ESTIMATORS, _HEADS, _LABELS, LogitsFn, diagonal_fisher

__all__ = ["EWCAnchor"]


class EWCAnchor(ParameterAnchor):
    """Anchor weighted by the diagonal Fisher of the data passed to :meth:`snapshot_`.

    Args:
        include: ``fnmatch`` patterns over parameter names.
        exclude: patterns removed from the selection.
        strength: λ of the loss term ``strength * penalty(model)``: Avalanche's ``ewc_lambda``, Kirkpatrick et al.'s
            λ/2.
        label: targets of the log-likelihood: ``"true"`` (given labels; empirical Fisher), ``"argmax"`` (the
            model's prediction) or ``"sampled"`` (drawn from the model's predictive distribution;
            true Fisher).
        estimator: ``"per_sample"`` (mean of squared per-sample gradients, torch.func vmap+grad) or
            ``"batch"`` (mean over mini-batches of the squared batch gradient, as common reference code does).
        accumulate: ``"sum"``: ω ← ω_old + F_new; ``"online"``: ω ← γ·ω_old + F_new.
        gamma: decay γ ∈ [0, 1] of ``accumulate="online"``.
        n_samples: use at most this many samples per snapshot (``None``: all the batches given).
        seed: seed of the label sampling (``label="sampled"``); combined with the snapshot count and the rank.
        chunk_size: samples per vmap call of the per-sample estimator (memory ∝ chunk_size × #parameters);
            ``None`` picks one that keeps the per-sample gradients near 1 GiB.

    Call ``anchor.snapshot_(model, batches=loader, logits_fn=..., head="bce")`` at the end of each task.

    Example (YAML for LightningCLI)::

        class_path: lifelong_delta.anchors.EWCAnchor
        init_args: {include: ["blocks.*"], strength: 1000.0, label: sampled, accumulate: online, gamma: 0.9}
    """

    def __init__(
        self,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        strength: float = 1.0,
        label: Literal["true", "argmax", "sampled"] = "true",
        estimator: Literal["per_sample", "batch"] = "per_sample",
        accumulate: Literal["online", "sum"] = "sum",
        gamma: float = 1.0,
        n_samples: int | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(include, exclude, strength)
        if label not in _LABELS:
            raise ValueError(f"label must be one of {list(_LABELS)}, got {label!r}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
        if accumulate not in ("online", "sum"):
            raise ValueError(f"accumulate must be 'online' or 'sum', got {accumulate!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
        if accumulate == "sum" and gamma != 1.0:
            raise ValueError(f"gamma={gamma} only applies with accumulate='online'; set accumulate: online")
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
            raise ValueError(f"n_samples must be a positive integer or null, got {n_samples!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or null, got {chunk_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.label = label
        self.estimator = estimator
        self.accumulation = accumulate  # `accumulate` is the method that applies it
        self.gamma = float(gamma)
        self.n_samples = n_samples
        self.seed = seed
        self.chunk_size = chunk_size

    def compute_importance(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        *,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        logits_fn: LogitsFn | None = None,
        head: Literal["bce", "softmax"] = "softmax",
        **context: Any,
    ) -> dict[str, Tensor]:
        """Diagonal Fisher of ``params`` on ``batches`` (see :func:`.fisher.diagonal_fisher`).

        Args:
            model: the network.
            params: the selected parameters.
            batches: ``(x, y)`` pairs of the task just finished (e.g. its DataLoader); moved to the
                model's device.
            logits_fn: ``logits_fn(model, x) -> [B, C]``, e.g. masking other tasks' classes; default
                ``model(x)``.
            head: ``"softmax"`` or ``"bce"``, the head the model is trained with.
            **context: ignored (other anchors' context).
        """
        if batches is None:
            raise ValueError(
                "EWCAnchor.snapshot_ needs batches=... (an iterable of (x, y) from the task just finished)"
            )
        if head not in _HEADS:
            raise ValueError(f"head must be one of {list(_HEADS)}, got {head!r}")
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        generator = torch.Generator().manual_seed(_fold_seed(self.seed, self.num_snapshots, rank))
        return diagonal_fisher(
            model,
            list(params),
            batches,
            logits_fn=logits_fn,
            head=head,
            label=self.label,
            estimator=self.estimator,
            n_samples=self.n_samples,
            generator=generator,
            chunk_size=self.chunk_size,
        )

    def accumulate(self, old: Tensor | None, new: Tensor) -> Tensor:
        """``online``: γ·ω_old + F_new; ``sum``: ω_old + F_new (``old`` is already zero-padded to ``new``)."""
        if old is None:
            return new
        old = old.to(device=new.device, dtype=new.dtype)
        return torch.add(new, old, alpha=self.gamma if self.accumulation == "online" else 1.0)

    def _config_repr(self) -> str:
        extra = f", label={self.label!r}, estimator={self.estimator!r}, accumulate={self.accumulation!r}"
        if self.accumulation == "online":
            extra += f", gamma={self.gamma:g}"
        if self.n_samples is not None:
            extra += f", n_samples={self.n_samples}"
        return super()._config_repr() + extra

    def _extra_state(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "estimator": self.estimator,
            "accumulate": self.accumulation,
            "gamma": self.gamma,
        }

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        return None  # the options are configuration; they are saved only for inspection


def _fold_seed(seed: int, snapshot: int, rank: int) -> int:
    """A 63-bit seed that differs per (seed, snapshot, rank)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + snapshot * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 63)
    return int(mixed)
