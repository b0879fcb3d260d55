"""The decoder study's two kinds of model: the pretrained base and its fine-tunes, each built once and cached.

:func:`pretrained_base` trains the BPE tokenizer and the Llama of an :class:`~.decoder_train.LMSpec` on the
pretraining corpus; :func:`finetuned` starts from that base and trains on the fine-tune corpus with one recipe of
:data:`RECIPES`. Both go through :func:`~.decoder_train.ensure_model`, so a rerun with the same settings loads them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lifelong_delta.delta.calibration import causal_lm_perplexity
from lifelong_delta.studies.decoder_data import batches, pack, train_tokenizer
from lifelong_delta.studies.decoder_train import LMSpec, TrainSpec, ensure_model, train_lm_, weights_sha256
from lifelong_delta.studies.log import StudyLog

__all__ = ["RECIPES", "Recipe", "finetuned", "load_lm", "pretrained_base"]


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune differs from plain AdamW: the optimiser and AdamR's λ (the rest is the study's)."""

    optimizer: str
    reg: float = 0.0
    note: str = ""


#: The fine-tunes of the study: the standard one and DAREx-L2 (AdamR's decoupled L2 pull toward the base).
RECIPES: dict[str, Recipe] = {
    "adamw": Recipe("adamw", note="the standard fine-tune (AdamW, no weight decay)"),
    "adamr-l2": Recipe("adamr", reg=0.05, note="DAREx-L2: AdamR's decoupled L2 pull toward the base"),
}


@contextlib.contextmanager
def _no_hf_bars() -> Iterator[None]:
    """Without transformers' "Loading weights" / "Writing model shards" bars, which would cut into our progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_lm(directory: str | Path) -> Any:
    """The ``LlamaForCausalLM`` saved in ``directory``, fp32, in eval mode."""
    from transformers import LlamaForCausalLM

    with _no_hf_bars():
        return LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _save(lm: Any, tokenizer: Any, directory: Path) -> None:
    with _no_hf_bars():
        lm.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))


def _fit(model: Any, blocks: torch.Tensor, spec: TrainSpec, log: StudyLog, label: str) -> list[float]:
    tokens = spec.steps * spec.batch_size * blocks.shape[1]
    log.say(
        f"{label}: {spec.steps} steps of {spec.batch_size} x {blocks.shape[1]} tokens "
        f"({tokens / 1e6:.2f} M tokens, {tokens / max(blocks.numel(), 1):.2f} epochs), {spec.optimizer} "
        f"lr {spec.lr:g}" + (f" λ {spec.reg:g}" if spec.reg else "")
    )
    with log.bar(label, spec.steps, unit="steps") as bar:

        def on_step(step: int, loss: float) -> None:
            bar.update(1, detail=f"loss {loss:.3f}")

        losses = train_lm_(model, blocks, spec, on_step)
    return losses


def _curve(losses: Sequence[float], points: int = 20) -> list[list[float]]:
    """``[[step, mean loss of the steps since the previous point], ...]`` at about ``points`` steps."""
    every = max(1, len(losses) // points)
    return [
        [i + every, round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4)]
        for i in range(0, len(losses), every)
    ]


def pretrained_base(
    path: Path,
    docs: dict[str, list[str]],
    corpus: dict[str, Any],
    model: LMSpec,
    spec: TrainSpec,
    log: StudyLog,
    *,
    force: bool = False,
) -> Path:
    """The pretrained base in ``path``: a BPE tokenizer and a Llama trained on ``docs["train"]``.

    Args:
        path: the cache directory of the base.
        docs: the pretraining corpus split into ``train`` and ``val`` documents.
        corpus: facts about the corpus for the record (its path, package, sizes).
        model: the Llama's shape.
        spec: the pretraining run.
        log: where progress goes.
        force: retrain even if cached.
    """
    hparams = {"model": vars(model), "train": spec.as_dict(), "corpus": corpus}

    def build(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        tok = train_tokenizer(docs["train"], model.vocab_size)
        train, val = pack(tok, docs["train"], model.seq_len), pack(tok, docs["val"], model.seq_len)
        log.say(
            f"pretraining corpus: {len(docs['train'])} documents, {train.numel() / 1e6:.2f} M tokens "
            f"(BPE vocabulary {tok.vocab_size}, trained in {time.perf_counter() - start:.1f} s); "
            f"held out {len(docs['val'])} documents, {val.numel()} tokens"
        )
        torch.manual_seed(spec.seed)
        lm = _new_lm(model, log)
        losses = _fit(lm, train, spec, log, "pretraining")
        ppl = causal_lm_perplexity(lm, batches(val, 32)) if len(val) else float("nan")
        log.say(f"pretrained: held-out perplexity {ppl:.1f} (loss {losses[-1]:.3f} at the last step)")
        _save(lm, tok, tmp)
        return {
            "parameters": sum(p.numel() for p in lm.parameters()),
            "train_tokens": train.numel(),
            "val_tokens": val.numel(),
            "val_perplexity": ppl,
            "loss_curve": _curve(losses),
        }

    out, built = ensure_model(path, hparams, build, force=force)
    if not built:
        log.say(f"cached: pretrained base {out}")
    return out


def _new_lm(model: LMSpec, log: StudyLog) -> Any:
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(model.config())
    n = sum(p.numel() for p in lm.parameters())
    log.say(
        f"Llama: {n / 1e6:.1f} M parameters ({model.layers} layers, width {model.hidden_size}, "
        f"{model.heads} heads / {model.kv_heads} key-value heads, vocabulary {model.vocab_size})"
    )
    return lm


def finetuned(
    path: Path,
    base: Path,
    recipe: str,
    blocks: torch.Tensor,
    val: torch.Tensor,
    corpus: dict[str, Any],
    spec: TrainSpec,
    log: StudyLog,
    *,
    force: bool = False,
) -> Path:
    """A fine-tune of ``base`` on ``blocks`` (the fine-tune corpus's training blocks) with ``recipe``.

    ``spec`` gives the steps, batch and learning rate; the recipe sets the optimiser and λ. ``val`` blocks give
    the recorded validation perplexity.
    """
    r = RECIPES[recipe]
    spec = replace(spec, optimizer=r.optimizer, reg=r.reg, weight_decay=0.0)
    hparams = {"recipe": recipe, "train": spec.as_dict(), "corpus": corpus, "base_sha256": weights_sha256(base)}

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        lm = load_lm(base)
        losses = _fit(lm, blocks, spec, log, f"fine-tuning {recipe}")
        ppl = causal_lm_perplexity(lm, batches(val, 32))
        log.say(f"fine-tuned {recipe}: validation perplexity {ppl:.2f}")
        _save(lm, AutoTokenizer.from_pretrained(str(base)), tmp)
        return {
            "recipe": recipe,
            "note": r.note,
            "base": str(base),
            "val_perplexity": ppl,
            "loss_curve": _curve(losses),
        }

    out, built = ensure_model(path, hparams, build, force=force)
    if not built:
        log.say(f"cached: fine-tune {recipe} {out}")
    return out
