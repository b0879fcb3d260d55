"""ImageNet-R from a local directory, with the fixed 80/20 train/test split shipped in ``lifelong_delta/data``.

ImageNet-R (Hendrycks et al., https://arxiv.org/abs/2006.16241) has 30,000 renditions of 200 ImageNet classes and
no official split. Continual-learning papers (L2P, DualPrompt, CODA-P, Smith et al.) use 80/20 train/test and a
10-task x 20-class stream. The authors' per-file split lists are not available offline, so the split here is a
rule shipped with the 200 class ids in ``lifelong_delta/data/imagenet_r.json``: an image ``<wnid>/<file>`` is a
test image iff ``sha256("imagenet-r-split/v1/<wnid>/<file>")`` (first 64 bits) falls below 0.2 · 2⁶⁴. It is a pure
function of the file name, so every user with the standard archive gets the same split, and a missing or extra
file moves no other file. About 20 % of each class is test (not exactly: each file is decided on its own).

Labels are the index of the wnid in the sorted list of the 200 (``ClassIncrementalDataModule`` then draws the class
order from its seed). Images are decoded lazily with PIL, per batch.

No Lightning here.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["IMAGENET_R_ENV", "ImageFiles", "imagenet_r_split", "is_test_image", "wnids"]

#: Environment variable naming the ImageNet-R directory when ``data_root`` is not given.
IMAGENET_R_ENV = "IMAGENET_R_ROOT"
_SPLIT_FILE = Path(__file__).resolve().parents[1] / "data" / "imagenet_r.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DOWNLOAD = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


@lru_cache(maxsize=1)
def _split_spec() -> dict[str, Any]:
    return json.loads(_SPLIT_FILE.read_text())


def wnids() -> list[str]:
    """The 200 ImageNet-R class ids (WordNet ids), sorted; label ``i`` is ``wnids()[i]``."""
    return list(_split_spec()["wnids"])


def is_test_image(wnid: str, filename: str) -> bool:
    """Whether ``<wnid>/<filename>`` belongs to the fixed test split (the rule of ``imagenet_r.json``)."""
    split = _split_spec()["split"]
    digest = hashlib.sha256(f"{split['salt']}/{wnid}/{filename}".encode()).hexdigest()
    return int(digest[:16], 16) < int(split["test_fraction"] * 2**64)


class ImageFiles:
    """Image files decoded lazily, indexed like a Hugging Face dataset (what ``ImageSubset`` reads).

    ``files[i]`` is ``{"image": PIL.Image}``; ``files[[i, j]]`` is ``{"image": [PIL.Image, PIL.Image]}``.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @staticmethod
    def _open(path: str) -> Any:
        from PIL import Image

        image = Image.open(path)
        image.load()  # reads the pixels and closes the file
        return image

    def __getitem__(self, index: int | list[int]) -> dict[str, Any]:
        if isinstance(index, list):
            return {"image": [self._open(self.paths[i]) for i in index]}
        return {"image": self._open(self.paths[index])}


def _resolve_root(data_root: str | os.PathLike[str] | None) -> Path:
    root = data_root if data_root is not None else os.environ.get(IMAGENET_R_ENV) or None
    where = f"put ImageNet-R ({_DOWNLOAD}, extracted) there so that <dir>/n01443537/*.jpg exists"
    if root is None:
        raise FileNotFoundError(f"ImageNet-R needs a directory: set {IMAGENET_R_ENV}=DIR or data_root=DIR and {where}")
    path = Path(os.path.expandvars(os.path.expanduser(str(root))))
    if path.is_dir() and not (path / wnids()[0]).is_dir() and (path / "imagenet-r").is_dir():
        path = path / "imagenet-r"  # the archive's own top-level folder
    if not path.is_dir():
        raise FileNotFoundError(
            f"ImageNet-R not found at {path}: {where} (or point {IMAGENET_R_ENV} / data_root at it)"
        )
    return path


def imagenet_r_split(data_root: str | os.PathLike[str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """``{"train": [(path, label), ...], "test": [...]}`` of a local ImageNet-R directory, by the fixed rule.

    Args:
        data_root: the directory holding the 200 ``<wnid>/`` folders (or its parent holding ``imagenet-r/``);
            ``None`` reads ``$IMAGENET_R_ROOT``.

    Raises:
        FileNotFoundError: if the directory or some class folders are missing, saying where to put the data.
    """
    root = _resolve_root(data_root)
    classes = wnids()
    missing = [w for w in classes if not (root / w).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet-R at {root} lacks {len(missing)} of its 200 class folders (e.g. {missing[0]}): extract the "
            f"whole archive ({_DOWNLOAD}) there"
        )
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, wnid in enumerate(classes):
        names = sorted(f.name for f in os.scandir(root / wnid) if f.name.lower().endswith(_IMAGE_SUFFIXES))
        for name in names:
            out["test" if is_test_image(wnid, name) else "train"].append((str(root / wnid / name), label))
    return out
