"""Calibration for the data-driven prune options: DAREx-q's ``q_mode`` and WANDA's input norms.

Loads the fine-tuned Hugging Face model (the class named in its ``config.json``) and a small text file, and
computes what the streaming prune needs: one global q (grid on labelled accuracy for a classifier, or on the
perplexity of the text for a causal LM; or the unlabelled last-layer output change), per-tensor q (analytic), or
per-tensor input norms ‖x_j‖₂. The math lives in
:mod:`lifelong_delta.delta.darex`, :mod:`lifelong_delta.delta.analytic_q` and :mod:`lifelong_delta.delta.importance`;
this module only wires data to it.
Tensor names are the model's ``state_dict`` names, which equal the checkpoint's for the class it was saved from.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lifelong_delta.delta.analytic_q import Arithmetic, analytic_q_per_layer
from lifelong_delta.delta.darex import MaskedDelta, QSearchResult, select_q_grid, select_q_unlabelled
from lifelong_delta.delta.importance import collect_input_stats, is_input_major
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.methods import PruneSpec, keep_mask_for

__all__ = ["analytic_q", "causal_lm_perplexity", "grid_q", "input_norms", "is_causal_lm", "load", "masked_delta",
           "read_text_data", "unlabelled_q"]

Batch = dict[str, torch.Tensor]


def read_text_data(path: str | os.PathLike[str], *, need_labels: bool, limit: int | None = None,
                   label2id: dict[str, int] | None = None) -> tuple[list[str], list[int] | None]:
    """Read ``text`` (and ``label``) columns from a CSV, TSV or JSONL file.

    Labels may be integers or names found in ``label2id`` (a model config's mapping).

    Raises:
        ValueError: unknown format, missing column or bad label, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calib_data {path}: file not found")
    suffix = path.suffix.lower()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if suffix in (".jsonl", ".json"):
                rows: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
            elif suffix in (".csv", ".tsv"):
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            else:
                raise ValueError(f"--calib_data {path}: use a .csv, .tsv or .jsonl file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--calib_data {path}: cannot read it ({e})") from None
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"--calib_data {path}: no rows")
    need = ("text", "label") if need_labels else ("text",)
    for col in need:
        if not all(isinstance(r, dict) and col in r for r in rows):
            cols = sorted(rows[0]) if isinstance(rows[0], dict) else []
            raise ValueError(f"--calib_data {path}: every row needs a '{col}' column (found columns {cols})")
    texts = [str(r["text"]) for r in rows]
    if not need_labels:
        return texts, None
    labels = []
    for r in rows:
        raw = r["label"]
        try:
            labels.append(int(raw))
        except (TypeError, ValueError):
            if label2id and str(raw) in label2id:
                labels.append(int(label2id[str(raw)]))
            else:
                raise ValueError(f"--calib_data {path}: label {raw!r} is neither an integer nor one of the model's "
                                 f"labels {sorted(label2id or {})}") from None
    return texts, labels




def is_causal_lm(arch: str) -> bool:
    """Whether a ``config.json`` architecture name is a causal LM (Llama, Qwen2, Mistral, GPT-2, ...)."""
    return arch.endswith(("ForCausalLM", "LMHeadModel"))


def load(
    finetuned: str, calib_data: str, *, need_labels: bool, samples: int, batch_size: int, max_length: int
) -> tuple[nn.Module, list[Batch], list[torch.Tensor] | None]:
    """Load the fine-tuned model (fp32, eval mode), its tokenizer and tokenized calibration batches.

    Args:
        need_labels: The caller scores q on labelled data (``--q_mode grid``): a sequence classifier then needs a
            ``label`` column; a causal LM is scored on the text itself (perplexity), so it needs none.

    Returns:
        ``(model, batches, labels)``; ``labels`` is one ``LongTensor[batch]`` per batch, or None (no labels asked
        for, or a causal LM).
    """
    import transformers

    if not (Path(finetuned) / "config.json").is_file():
        raise ValueError(f"--finetuned {finetuned}: calibration needs a Hugging Face model directory with "
                         "config.json (and tokenizer files)")
    config = transformers.AutoConfig.from_pretrained(finetuned)
    arch = (config.architectures or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    if is_causal_lm(arch):
        need_labels = False
    elif need_labels and not arch.endswith("ForSequenceClassification"):
        raise ValueError(f"--q_mode grid scores a classifier's accuracy or a causal LM's perplexity, but {finetuned} "
                         f"is a {arch or 'model'} with neither head; use --q_mode unlabelled or analytic")
    texts, labels = read_text_data(calib_data, need_labels=need_labels, limit=samples,
                                   label2id=getattr(config, "label2id", None))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(finetuned)
    except (OSError, ValueError) as e:
        raise ValueError(f"--finetuned {finetuned}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None and batch_size > 1:
        raise ValueError(f"--finetuned {finetuned}: its tokenizer has no padding, end-of-text or unknown token to "
                         "pad calibration batches with; use --batch_size 1")
    model = _model_from_checkpoint(cls, config, finetuned)
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    pad_id = tokenizer.pad_token_id
    if vocab is not None and batch_size > 1 and pad_id is not None and pad_id >= vocab:
        raise ValueError(f"--finetuned {finetuned}: its tokenizer pads with token id {pad_id}, outside the model's "
                         f"{vocab} embeddings; use --batch_size 1")
    batches = [dict(tokenizer(texts[i : i + batch_size], padding=batch_size > 1, truncation=True,
                              max_length=max_length, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    label_batches = None
    if labels is not None:
        label_batches = [torch.tensor(labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
    return model, batches, label_batches


def _model_from_checkpoint(cls: type, config: Any, finetuned: str) -> nn.Module:
    """``cls`` with exactly the tensors :class:`CheckpointReader` reads from ``finetuned`` (fp32, eval mode).

    ``from_pretrained(finetuned)`` would pick its own weight file (a ``pytorch_model.bin`` next to an oddly named
    ``*.safetensors``, say), so the model that decides q could differ from the one pruned.
    """
    with CheckpointReader(finetuned) as reader:
        state = {name: tensor.to(torch.float32) if tensor.is_floating_point() else tensor
                 for name, tensor in reader}
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                          output_loading_info=True)
    except (OSError, RuntimeError, KeyError) as e:
        raise ValueError(f"--finetuned {finetuned}: cannot build a {cls.__name__} from its weights "
                         f"({str(e).splitlines()[0]})") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"--finetuned {finetuned}: its weights lack {len(missing)} tensor(s) that a "
                         f"{cls.__name__} needs, e.g. {missing[0]!r}; calibration needs the complete model")
    return model.eval()


def _forward(model: nn.Module, batch: Batch) -> Any:
    return model(**batch)


def _last_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def input_norms(model: nn.Module, batches: Sequence[Batch], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{weight name: [in] ‖x_j‖₂}`` for the 2-D tensors among ``names``.

    ``nn.Linear`` weights get their measured input norms. GPT-2's ``Conv1D`` weights, stored ``[in, out]``, get
    them as ``[in, 1]``, which tells WANDA to rank within output columns. Other matrices (embeddings, tied heads)
    have no per-column input, so they get all-ones norms: WANDA then ranks by |δ| within each row (magnitude).
    """
    norms = _input_vectors(model, batches, names, "norm")
    sd = model.state_dict()
    for n in names:
        if n in sd and sd[n].ndim == 2 and n not in norms:
            norms[n] = torch.ones(sd[n].shape[1])
    return norms


def _measured_weights(model: nn.Module, names: Sequence[str]) -> dict[str, bool]:
    """``{weight name: stored input-major}`` for the weights among ``names`` whose inputs are measured: those of
    ``nn.Linear`` (``[out, in]``) and of GPT-2's ``Conv1D`` (``[in, out]``)."""
    wanted = set(names)
    return {f"{m}.weight": is_input_major(mod) for m, mod in model.named_modules()
            if (isinstance(mod, nn.Linear) or is_input_major(mod)) and f"{m}.weight" in wanted}


def _input_vectors(model: nn.Module, batches: Sequence[Batch], names: Sequence[str],
                   which: Literal["norm", "mean"]) -> dict[str, torch.Tensor]:
    """``{weight name: ‖x‖ or mean(x)}`` of the measured weights among ``names``: ``[in]`` for an output-major
    weight, ``[in, 1]`` for an input-major one (which WANDA and the analytic q read transposed)."""
    measured = _measured_weights(model, names)
    stats = collect_input_stats(model, batches, _forward, names=list(measured))
    vectors = {n: getattr(s, which) for n, s in stats.items()}
    return {n: v[:, None] if measured[n] else v for n, v in vectors.items()}


@torch.no_grad()
def masked_delta(model: nn.Module, base: str, names: Sequence[str], spec: PruneSpec,
                 input_norms: Mapping[str, torch.Tensor] | None = None,
                 base_names: Mapping[str, str] | None = None) -> MaskedDelta:
    """The masked delta of ``model`` (fine-tuned weights) against the ``base`` checkpoint, over ``names``.

    The mask is the one ``spec``'s method applies (:func:`~lifelong_delta.delta.methods.keep_mask_for`: DARE's
    random mask, the magnitude/WANDA top-k or the structural rows/columns), so a q found on it is the q of the
    streamed prune. ``base_names`` maps a fine-tuned tensor name to its base name when they differ by a prefix.
    """
    sd = model.state_dict()
    names = [n for n in names if n in sd]
    if not names:
        raise ValueError(f"none of the checkpoint's tensor names is a parameter of the loaded "
                         f"{type(model).__name__}; q_mode needs the model class the checkpoint was saved from")
    with CheckpointReader(base) as rb:
        base_sd = {n: rb.get((base_names or {}).get(n, n)) for n in names}
    norms = input_norms or {}
    return MaskedDelta.build(base_sd, {n: sd[n] for n in names}, spec.p, seed=spec.seed,
                             keep_fn=lambda n, d: keep_mask_for(n, d, spec, input_norms=norms.get(n)))


def analytic_q(
    model: nn.Module, masked: MaskedDelta, batches: Sequence[Batch], eta: float = 0.37,
    arithmetic: Arithmetic = "float16", tie_rtol: float = 0.0,
) -> dict[str, float]:
    """Per-tensor q from c_ij = Δw_ij·mean(x_j) (DAREx-q analytic, the authors' tail-bound objective with η)."""
    means = _input_vectors(model, batches, masked.names, "mean")
    return analytic_q_per_layer(masked, means, eta=eta, arithmetic=arithmetic, tie_rtol=tie_rtol)


def grid_q(model: nn.Module, masked: MaskedDelta, batches: Sequence[Batch],
           labels: Sequence[torch.Tensor] | None, p: float) -> QSearchResult:
    """Global q by a coarse then fine grid: the highest accuracy on the labelled calibration set for a classifier,
    the lowest perplexity of the calibration text for a causal LM (``labels`` None)."""

    @torch.no_grad()
    def accuracy(q: float) -> float:
        masked.apply_(model, q)
        correct = total = 0
        for batch, y in zip(batches, labels or ()):
            correct += int((model(**batch).logits.argmax(-1) == y).sum())
            total += len(y)
        return correct / total

    @torch.no_grad()
    def perplexity(q: float) -> float:
        masked.apply_(model, q)
        return causal_lm_perplexity(model, batches)

    if labels is None:
        if not is_causal_lm(type(model).__name__):
            raise ValueError(f"--q_mode grid needs labels to score a {type(model).__name__}")
        return select_q_grid(perplexity, p, mode="min")
    return select_q_grid(accuracy, p, mode="max")


@torch.no_grad()
def causal_lm_perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """exp(mean next-token cross-entropy) over every real (unpadded) token of ``batches``."""
    total = count = 0.0
    for batch in batches:
        ids, mask = batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        logits = model(**batch).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    if not count:
        raise ValueError("--calib_data: no text to score (every row is at most one token long)")
    return float(torch.exp(torch.tensor(total / count)))


def unlabelled_q(model: nn.Module, masked: MaskedDelta, batches: Sequence[Batch], p: float) -> QSearchResult:
    """Global q minimising the mean last-layer output change (no labels)."""
    return select_q_unlabelled(model, masked, list(batches), _last_hidden, p)
