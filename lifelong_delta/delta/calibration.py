"""Calibration for the data-driven prune options: DAREx-q's ``q_mode`` and WANDA's input norms.

:func:`load` opens the fine-tuned Hugging Face checkpoint (the class named in its ``config.json``) as a
:class:`~lifelong_delta.delta.layered.LayeredModel` and tokenizes a small text file
(:mod:`lifelong_delta.delta.calibration_data`). :class:`Calibration` then computes what the streaming prune needs:
one global q (grid on labelled accuracy for a classifier, or on the perplexity of the text for a causal LM; or the
unlabelled last-layer output change), per-tensor q (analytic), or per-tensor input norms ‖x_j‖₂. Every forward pass
runs one layer at a time, so memory holds one layer's weights in fp32 and the batches' activations, whatever the
model's size, and the results equal those of the model loaded whole in fp32.

By default the input statistics (WANDA's norms, the analytic q's means) come from one pass of the fine-tuned model.
With a :class:`SequentialPrune` they come block by block from inputs that went through the blocks before it as
pruned (:meth:`~lifelong_delta.delta.layered.LayeredModel.run_sequential`, the reference code's layer-wise prune).

The math lives in :mod:`lifelong_delta.delta.darex`, :mod:`lifelong_delta.delta.analytic_q` and
:mod:`lifelong_delta.delta.importance`; this module only wires data to it. :func:`input_norms` and
:func:`causal_lm_perplexity` also take a model already in memory (the studies' small models).
Tensor names are the model's ``state_dict`` names, which equal the checkpoint's for the class it was saved from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lifelong_delta.delta.analytic_q import Arithmetic, analytic_weight_q, spread_weight_q
from lifelong_delta.delta.calibration_data import (
    Batch,
    is_causal_lm,
    label_batches,
    load_tokenizer,
    model_class,
    read_text_data,
    tokenize,
)
from lifelong_delta.delta.darex import QSearchResult, select_q_grid
from lifelong_delta.delta.importance import InputStats, collect_input_stats, is_input_major
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.layered import Candidate, LayeredModel, Pruning
from lifelong_delta.delta.methods import PruneSpec, keep_mask_for, prune_tensor

__all__ = [
    "Calibration",
    "SequentialPrune",
    "causal_lm_perplexity",
    "input_norms",
    "is_causal_lm",
    "load",
    "read_text_data",
]


def load(
    finetuned: str, calib_data: str, *, need_labels: bool, samples: int, batch_size: int, max_length: int
) -> Calibration:
    """Open the fine-tuned model layer by layer, with its tokenizer and tokenized calibration batches.

    Args:
        need_labels: The caller scores q on labelled data (``--q_mode grid``): a sequence classifier then needs a
            ``label`` column; a causal LM is scored on the text itself (perplexity), so it needs none.

    Returns:
        A :class:`Calibration`; close it (or use it as a context manager) to close the checkpoint.
    """
    config, cls, causal = model_class(finetuned, need_labels=need_labels)
    texts, labels = read_text_data(
        calib_data, need_labels=need_labels and not causal, limit=samples, label2id=getattr(config, "label2id", None)
    )
    tokenizer = load_tokenizer(finetuned, batch_size)
    reader = CheckpointReader(finetuned)
    try:
        model = LayeredModel(cls, config, reader, what=f"--finetuned {finetuned}")
        vocab = (
            model.model.get_input_embeddings().num_embeddings if hasattr(model.model, "get_input_embeddings") else None
        )
    except BaseException:
        reader.close()
        raise
    pad_id = tokenizer.pad_token_id
    if vocab is not None and batch_size > 1 and pad_id is not None and pad_id >= vocab:
        reader.close()
        raise ValueError(
            f"--finetuned {finetuned}: its tokenizer pads with token id {pad_id}, outside the model's "
            f"{vocab} embeddings; use --batch_size 1"
        )
    batches = tokenize(tokenizer, texts, batch_size, max_length)
    return Calibration(model, batches, label_batches(labels, batch_size), causal=causal)


@dataclass(frozen=True)
class SequentialPrune:
    """How the sequential statistics prune each block before it feeds the next one (``--calib_sequential``).

    A block runs pruned as the streamed prune writes it: ``prune_tensor(name, θ_pre, θ_ft, spec, ...)`` of each of
    its tensors, in the checkpoint's dtype (the same bits as the written file), then read as fp32.

    Attributes:
        spec: The prune's method and settings.
        base: The pretrained checkpoint θ_pre.
        base_names: Fine-tuned tensor name → base tensor name, where they differ.
    """

    spec: PruneSpec
    base: CheckpointReader
    base_names: Mapping[str, str] = field(default_factory=dict)

    def written(
        self, name: str, finetuned: CheckpointReader, *, input_norms: torch.Tensor | None = None, q: float | None = None
    ) -> torch.Tensor:
        """The tensor the prune writes for ``name``."""
        base = self.base.get(self.base_names.get(name, name))
        return prune_tensor(name, base, finetuned.get(name), self.spec, input_norms=input_norms, q=q)


class Calibration:
    """A fine-tuned model on disk, run one layer at a time over tokenized calibration batches.

    Attributes:
        model: The :class:`~lifelong_delta.delta.layered.LayeredModel`.
        batches: Tokenized batches.
        labels: One ``LongTensor[batch]`` per batch, or None (no labels asked for, or a causal LM).
        causal: The model is a causal LM (the grid q scores perplexity).
    """

    def __init__(
        self, model: LayeredModel, batches: list[Batch], labels: list[torch.Tensor] | None, *, causal: bool
    ) -> None:
        self.model, self.batches, self.labels, self.causal = model, batches, labels, causal

    def close(self) -> None:
        self.model.ft.close()

    def __enter__(self) -> Calibration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pruning(
        self,
        spec: PruneSpec,
        base: CheckpointReader,
        base_names: Mapping[str, str] | None = None,
        input_norms: Mapping[str, torch.Tensor] | None = None,
    ) -> Pruning:
        """How ``spec``'s method prunes, for the q candidates: its keep-mask (DARE's random mask, the
        magnitude/WANDA top-k or the structural rows/columns), so a q found on it is the q of the streamed prune."""
        norms = dict(input_norms or {})
        return Pruning(
            spec.p,
            spec.seed,
            lambda n, d: keep_mask_for(n, d, spec, input_norms=norms.get(n)),
            base,
            dict(base_names or {}),
        )

    def _stats(self, names: Sequence[str]) -> tuple[dict[str, InputStats], dict[str, bool]]:
        """Input statistics of the measured weights among ``names`` on the fine-tuned model, and whether each
        is stored input-major."""
        measured = _measured_weights(self.model.model, names)
        stats = self.model.run(self.batches, [None], lambda *_: None, measure=list(measured))
        return stats, measured

    def input_norms(self, names: Sequence[str], sequential: SequentialPrune | None = None) -> dict[str, torch.Tensor]:
        """``{weight name: ‖x_j‖₂}`` as :func:`input_norms` gives for the whole model.

        With ``sequential``, block i's norms are measured on inputs that went through blocks 0 … i−1 pruned by
        WANDA with their own norms (the reference code's ``prune_wanda``); the outer weights (embeddings, final
        norm, head) stay fine-tuned in the pass, and a head after the blocks is measured on the last pruned block's
        outputs.
        """
        if sequential is None:
            stats, measured = self._stats(names)
            return self._norms(names, stats, measured)
        measured = _measured_weights(self.model.model, names)
        wanted = set(names)

        def prune_block(block: list[str], stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
            mine = [n for n in block if n in wanted]
            norms = self._norms(mine, stats, measured)
            return {n: sequential.written(n, self.model.ft, input_norms=norms.get(n)) for n in mine}

        stats = self.model.run_sequential(self.batches, prune_block, measure=list(measured))
        return self._norms(names, stats, measured)

    def _norms(
        self, names: Sequence[str], stats: Mapping[str, InputStats], measured: Mapping[str, bool]
    ) -> dict[str, torch.Tensor]:
        """The measured norms oriented for WANDA, and all-ones norms for the model's other matrices in ``names``."""
        norms = _oriented({n: s.norm for n, s in stats.items()}, measured)
        known = set(self.model.names())
        for n in names:
            shape = self.model.ft.shape(n) if n in self.model.ft else ()
            if n in known and len(shape) == 2 and n not in norms:
                norms[n] = torch.ones(shape[1])
        return norms

    def analytic_q(
        self,
        pruning: Pruning,
        names: Sequence[str],
        eta: float = 0.37,
        arithmetic: Arithmetic = "float16",
        tie_rtol: float = 0.0,
        sequential: SequentialPrune | None = None,
    ) -> dict[str, float]:
        """Per-tensor q from c_ij = Δw_ij·mean(x_j) (DAREx-q analytic, the authors' tail-bound objective with η).

        One pass measures mean(x_j) on the fine-tuned model; then each stage's deltas are read in turn.

        With ``sequential``, block i's means are measured on inputs that went through blocks 0 … i−1 pruned with
        their q's, so block i's q's exist before block i+1 runs. A block's other tensors (its norms) then take the
        mean q of that block's weights (or 1 − p), not the mean over every layer, which the later blocks decide;
        the outer tensors (embeddings, final norm) take the mean over every weight as without it, and a head after
        the blocks its own q from the last pruned block's outputs.
        """
        if sequential is not None:
            return self._analytic_q_sequential(pruning, names, sequential, eta, arithmetic, tie_rtol)
        stats, measured = self._stats(names)
        means = _oriented({n: s.mean for n, s in stats.items()}, measured)
        biases = {n[: -len("weight")] + "bias" for n in means}
        wanted = [n for n in names if n in means or n in biases]
        no_mask = Pruning(pruning.p, pruning.seed, _no_mask, pruning.base, pruning.base_names)
        weight_q: dict[str, float] = {}
        for stage in self.model.stages:
            masked = self.model.masked(stage, no_mask, wanted)
            if masked is not None and masked.names:
                weight_q.update(analytic_weight_q(masked, means, eta=eta, arithmetic=arithmetic, tie_rtol=tie_rtol))
        return spread_weight_q([n for n in names if n in set(self.model.names())], weight_q, pruning.p)

    def _analytic_q_sequential(
        self,
        pruning: Pruning,
        names: Sequence[str],
        sequential: SequentialPrune,
        eta: float,
        arithmetic: Arithmetic,
        tie_rtol: float,
    ) -> dict[str, float]:
        measured = _measured_weights(self.model.model, names)
        known = set(self.model.names())
        order = [n for n in names if n in known]
        no_mask = Pruning(pruning.p, pruning.seed, _no_mask, pruning.base, pruning.base_names)
        weight_q: dict[str, float] = {}
        block_q: dict[str, float] = {}

        def stage_weight_q(stage: set[str], stats: Mapping[str, InputStats]) -> dict[str, float]:
            means = _oriented({n: s.mean for n, s in stats.items()}, measured)
            biases = {n[: -len("weight")] + "bias" for n in means}
            wanted = [n for n in order if n in stage and (n in means or n in biases)]
            masked = self.model.masked_tensors(wanted, no_mask)
            if not masked.names:
                return {}
            return analytic_weight_q(masked, means, eta=eta, arithmetic=arithmetic, tie_rtol=tie_rtol)

        def prune_block(block: list[str], stats: dict[str, InputStats]) -> dict[str, torch.Tensor]:
            mine = set(block)
            found = stage_weight_q(mine, stats)
            weight_q.update(found)
            qs = spread_weight_q([n for n in order if n in mine], found, pruning.p)
            block_q.update(qs)
            return {n: sequential.written(n, self.model.ft, q=q) for n, q in qs.items()}

        stats = self.model.run_sequential(self.batches, prune_block, measure=list(measured))
        outer = {self.model.source[f] for f in self.model.stages[0]}
        weight_q.update(stage_weight_q(outer, {n: s for n, s in stats.items() if n in outer}))
        return {**spread_weight_q(order, weight_q, pruning.p), **block_q}

    def grid_q(self, pruning: Pruning, names: Sequence[str]) -> QSearchResult:
        """Global q by a coarse then fine grid: the highest accuracy on the labelled calibration set for a
        classifier, the lowest perplexity of the calibration text for a causal LM."""
        if self.causal:
            return select_q_grid(
                lambda qs: self._evaluate(qs, pruning, names, _TokenLoss), pruning.p, mode="min", batched=True
            )
        if self.labels is None:
            raise ValueError(f"--q_mode grid needs labels to score a {type(self.model.model).__name__}")
        labels = self.labels
        return select_q_grid(
            lambda qs: self._evaluate(qs, pruning, names, lambda: _Accuracy(labels)),
            pruning.p,
            mode="max",
            batched=True,
        )

    def _evaluate(
        self, qs: list[float], pruning: Pruning, names: Sequence[str], metric: Callable[[], Any]
    ) -> list[float]:
        scores = [metric() for _ in qs]
        self.model.run(
            self.batches, qs, lambda c, b, out: scores[c].add(b, self.batches[b], out), pruning=pruning, pruned=names
        )
        return [s.value() for s in scores]

    def unlabelled_q(self, pruning: Pruning, names: Sequence[str]) -> QSearchResult:
        """Global q minimising the mean last-layer output change ``mean |h_last(ft) − h_last(pruned)|``."""
        ref: dict[int, torch.Tensor] = {}

        def distances(qs: list[float]) -> list[float]:
            candidates: list[Candidate] = ([] if ref else [None]) + list(qs)
            diffs: list[list[torch.Tensor]] = [[] for _ in candidates]

            def finish(c: int, b: int, out: Any) -> None:
                h = out.hidden_states[-1].to(torch.float32)
                if candidates[c] is None:
                    ref[b] = h
                else:
                    diffs[c].append((h - ref[b]).abs().mean())

            self.model.run(self.batches, candidates, finish, pruning=pruning, pruned=names, output_hidden_states=True)
            return [float(torch.stack(d).mean()) for c, d in zip(candidates, diffs) if c is not None]

        return select_q_grid(distances, pruning.p, mode="min", batched=True)


def _no_mask(name: str, delta: torch.Tensor) -> torch.Tensor:
    """A keep-all mask that costs no memory: the analytic q reads only the deltas."""
    return torch.ones((), dtype=torch.bool).expand(delta.shape)


class _Accuracy:
    def __init__(self, labels: Sequence[torch.Tensor]) -> None:
        self.labels, self.correct, self.total = labels, 0, 0

    def add(self, b: int, batch: Batch, out: Any) -> None:
        y = self.labels[b]
        self.correct += int((out.logits.argmax(-1) == y).sum())
        self.total += len(y)

    def value(self) -> float:
        return self.correct / self.total


class _TokenLoss:
    """Summed next-token cross-entropy over the real (unpadded) tokens; its value is the perplexity."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, b: int, batch: Batch, out: Any) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        logits = out.logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        self.total += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        self.count += int((target != -100).sum())

    def value(self) -> float:
        if not self.count:
            raise ValueError("--calib_data: no text to score (every row is at most one token long)")
        return float(torch.exp(torch.tensor(self.total / self.count)))


@torch.no_grad()
def causal_lm_perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """exp(mean next-token cross-entropy) over every real (unpadded) token of ``batches``, for a model in memory."""
    loss = _TokenLoss()
    for b, batch in enumerate(batches):
        loss.add(b, batch, model(**batch))
    return loss.value()


@torch.no_grad()
def input_norms(model: nn.Module, batches: Sequence[Batch], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{weight name: [in] ‖x_j‖₂}`` for the 2-D tensors among ``names``, for a model in memory.

    ``nn.Linear`` weights get their measured input norms. GPT-2's ``Conv1D`` weights, stored ``[in, out]``, get
    them as ``[in, 1]``, which tells WANDA to rank within output columns. Other matrices (embeddings, tied heads)
    have no per-column input, so they get all-ones norms: WANDA then ranks by |δ| within each row (magnitude).
    """
    measured = _measured_weights(model, names)
    stats = collect_input_stats(model, batches, lambda m, b: m(**b), names=list(measured))
    norms = _oriented({n: s.norm for n, s in stats.items()}, measured)
    sd = model.state_dict()
    for n in names:
        if n in sd and sd[n].ndim == 2 and n not in norms:
            norms[n] = torch.ones(sd[n].shape[1])
    return norms


def _measured_weights(model: nn.Module, names: Sequence[str]) -> dict[str, bool]:
    """``{weight name: stored input-major}`` for the weights among ``names`` whose inputs are measured: those of
    ``nn.Linear`` (``[out, in]``) and of GPT-2's ``Conv1D`` (``[in, out]``)."""
    wanted = set(names)
    return {
        f"{m}.weight": is_input_major(mod)
        for m, mod in model.named_modules()
        if (isinstance(mod, nn.Linear) or is_input_major(mod)) and f"{m}.weight" in wanted
    }


def _oriented(vectors: Mapping[str, torch.Tensor], input_major: Mapping[str, bool]) -> dict[str, torch.Tensor]:
    """``[in]`` vectors of output-major weights, ``[in, 1]`` of input-major ones (which WANDA and the analytic q
    read transposed)."""
    return {n: v[:, None] if input_major[n] else v for n, v in vectors.items()}
