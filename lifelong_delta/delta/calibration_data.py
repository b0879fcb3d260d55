"""The calibration data of the data-driven prune options (``--calib_data``): read, checked and tokenized.

:func:`read_text_data` reads the ``text`` (and ``label``) columns of a CSV, TSV or JSONL file;
:func:`model_class` reads the fine-tuned checkpoint's ``config.json`` and says which Hugging Face class to build and
whether it is scored on labels; :func:`load_tokenizer` and :func:`tokenize` turn the texts into padded batches.
:func:`lifelong_delta.delta.calibration.load` puts these together with the model, opened layer by layer.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["Batch", "is_causal_lm", "label_batches", "load_tokenizer", "model_class", "read_text_data", "tokenize"]

Batch = dict[str, torch.Tensor]


def read_text_data(
    path: str | os.PathLike[str], *, need_labels: bool, limit: int | None = None, label2id: dict[str, int] | None = None
) -> tuple[list[str], list[int] | None]:
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
                raise ValueError(
                    f"--calib_data {path}: label {raw!r} is neither an integer nor one of the model's "
                    f"labels {sorted(label2id or {})}"
                ) from None
    return texts, labels


def is_causal_lm(arch: str) -> bool:
    """Whether a ``config.json`` architecture name is a causal LM (Llama, Qwen2, Mistral, GPT-2, ...)."""
    return arch.endswith(("ForCausalLM", "LMHeadModel"))


def model_class(finetuned: str, *, need_labels: bool) -> tuple[Any, type, bool]:
    """The fine-tuned model's config, the Hugging Face class to build it with, and whether it is a causal LM.

    Raises:
        ValueError: ``finetuned`` has no ``config.json``, or ``need_labels`` (as
            :func:`lifelong_delta.delta.calibration.load` takes it) asks labels of a model with neither a
            classifier's nor a causal LM's head.
    """
    import transformers

    if not (Path(finetuned) / "config.json").is_file():
        raise ValueError(
            f"--finetuned {finetuned}: calibration needs a Hugging Face model directory with "
            "config.json (and tokenizer files)"
        )
    config = transformers.AutoConfig.from_pretrained(finetuned)
    arch = (config.architectures or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
    causal = is_causal_lm(arch)
    if not causal and need_labels and not arch.endswith("ForSequenceClassification"):
        raise ValueError(
            f"--q_mode grid scores a classifier's accuracy or a causal LM's perplexity, but {finetuned} "
            f"is a {arch or 'model'} with neither head; use --q_mode unlabelled or analytic"
        )
    return config, cls, causal


def load_tokenizer(finetuned: str, batch_size: int) -> Any:
    """The fine-tuned model's tokenizer, with a padding token wherever ``batch_size > 1`` needs one.

    Raises:
        ValueError: the tokenizer does not load, or batches need padding and it has no token to pad with.
    """
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(finetuned)
    except (OSError, ValueError) as e:
        raise ValueError(f"--finetuned {finetuned}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None and batch_size > 1:
        raise ValueError(
            f"--finetuned {finetuned}: its tokenizer has no padding, end-of-text or unknown token to "
            "pad calibration batches with; use --batch_size 1"
        )
    return tokenizer


def tokenize(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[Batch]:
    """``texts`` in batches of ``batch_size``, padded (when more than one) and truncated to ``max_length`` tokens."""
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size],
                padding=batch_size > 1,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def label_batches(labels: list[int] | None, batch_size: int) -> list[torch.Tensor] | None:
    """``labels`` as one ``LongTensor[batch]`` per batch of :func:`tokenize`; None for none."""
    if labels is None:
        return None
    return [torch.tensor(labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]
