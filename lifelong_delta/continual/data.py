"""``ClassIncrementalDataModule``: split any labelled image dataset into a stream of tasks by class.

Class-incremental protocol as in Smith et al., https://arxiv.org/abs/2203.17269: the classes are put in an order
drawn from ``class_order_seed`` and cut into ``n_tasks`` contiguous groups; labels are remapped to the position in
that order, so task ``t`` owns the contiguous ids ``task_classes(t)``. A validation split is held out of the
training data (stratified per class, fixed by ``seed``); the test split is the dataset's own (or a stratified
``test_fraction`` of the training data when the source has none, e.g. sklearn digits or a flat ImageNet-R folder).

Loaders yield ``(images, labels)``: float [B, C, H, W] (normalised) and int64 [B] (remapped). The uint8 images are
converted per batch in :class:`BatchTransform`, so the pipeline stays cheap next to a model step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lifelong_delta.continual.sources import BatchTransform, ImageSubset, hf_image_mode, load_source

__all__ = ["ClassIncrementalDataModule", "mix_seed"]

SplitName = Literal["train", "val", "test"]


def mix_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _perm(n: int, *seed_parts: object) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(*seed_parts)))


class _SeededShuffle(torch.utils.data.Sampler[int]):
    """A random permutation of ``range(n)`` that is a pure function of ``seed``, however often it is iterated."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())


class ClassIncrementalDataModule(L.LightningDataModule):
    """A class-incremental task stream over one labelled image dataset.

    Args:
        dataset: ``mnist``, ``fashion_mnist``, ``digits`` (offline), ``imagefolder`` (with ``data_root``), or any
            Hugging Face dataset name loadable offline from the cache (e.g. ``cifar100``).
        n_tasks: number of tasks.
        classes_per_task: classes per task; None splits all classes as evenly as possible (earlier tasks get
            one more when it does not divide). With a value, only the first ``n_tasks * classes_per_task`` classes
            of the order are used.
        class_order_seed: seed of the class order; None keeps the natural (sorted) order.
        seed: seed of the validation/test hold-out, the per-class caps and the per-epoch shuffling.
        val_fraction: fraction of each class's training examples held out for validation (0 = no validation).
        test_fraction: fraction held out as test set, only for sources without a test split.
        batch_size: training batch size.
        eval_batch_size: batch size of the validation/test loaders (default ``batch_size``).
        num_workers: DataLoader workers.
        data_root: directory of the data (IDX files for MNIST/Fashion-MNIST, the image folder for imagefolder).
        image_size: output side length in pixels (square); None keeps the native size.
        channels: 1 or 3 to convert; None keeps the native number.
        normalize: map pixels from [0, 1] to ``(x - mean) / std``.
        mean: per-channel mean for ``normalize`` (default 0.5, as timm's augreg ViTs).
        std: per-channel std for ``normalize`` (default 0.5).
        max_per_class: cap on training examples per class (tiny tests and demos).
        max_eval_per_class: cap on validation and test examples per class.
        image_key: image column of a Hugging Face dataset.
        label_key: label column of a Hugging Face dataset.
        hf_kwargs: extra keyword arguments of ``datasets.load_dataset`` (e.g. ``name``, ``cache_dir``).
    """

    def __init__(
        self,
        dataset: str = "mnist",
        n_tasks: int = 5,
        classes_per_task: int | None = None,
        class_order_seed: int | None = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        data_root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        normalize: bool = True,
        max_per_class: int | None = None,
        max_eval_per_class: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        hf_kwargs: dict[str, Any] | None = None,
        test_fraction: float = 0.2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        if classes_per_task is not None and classes_per_task < 1:
            raise ValueError(f"classes_per_task must be >= 1 or None, got {classes_per_task}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size}, {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (native), got {channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None (native), got {image_size}")
        for name, cap in (("max_per_class", max_per_class), ("max_eval_per_class", max_eval_per_class)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {cap}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.n_tasks = n_tasks
        self.classes_per_task = classes_per_task
        self.class_order_seed = class_order_seed
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.data_root = data_root
        self.image_size = image_size
        self.channels = channels
        self.normalize = normalize
        self.mean = mean
        self.std = std
        self.max_per_class = max_per_class
        self.max_eval_per_class = max_eval_per_class
        self.image_key = image_key
        self.label_key = label_key
        self.hf_kwargs = dict(hf_kwargs or {})
        #: task whose training data ``train_dataloader`` serves when no trainer module tells (settable).
        self.current_task = 0
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        """Nothing to download: every source is offline (a missing one fails in ``setup`` with where to put it)."""

    def setup(self, stage: str | None = None) -> None:
        """Load the source and build the class order and splits (idempotent; also run on first attribute use)."""
        self._ensure_ready()

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        train, test = load_source(self.dataset, self.data_root, self.image_key, self.label_key, self.hf_kwargs)
        classes = [c for c in torch.unique(train.labels).tolist() if c >= 0]  # -1 = unlabelled in some HF sets
        if not classes:
            raise ValueError(f"dataset {self.dataset!r} has no labelled training examples; check label_key=")
        if test is None:
            test_idx = self._stratified_holdout(train.labels, classes, self.test_fraction, "test")
            test = train
        else:
            test_idx = None
        order = self._class_order(classes)
        self._class_order_list = order
        self._bounds = self._task_bounds(len(order))
        top = max([max(classes)] + ([int(test.labels.max())] if len(test.labels) else []))
        lut = torch.full((top + 1,), -1, dtype=torch.long)
        lut[torch.tensor(order)] = torch.arange(len(order))
        self._lut = lut

        exclude = torch.zeros(len(train), dtype=torch.bool)
        if test_idx is not None:
            exclude[torch.cat(list(test_idx.values()))] = True
        val_idx: dict[int, torch.Tensor] = {}
        train_idx: dict[int, torch.Tensor] = {}
        for c in order:
            idx = torch.nonzero((train.labels == c) & ~exclude).flatten()
            idx = idx[_perm(len(idx), self.seed, "val", c)]
            n_val = min(int(round(self.val_fraction * len(idx))), len(idx) - 1) if self.val_fraction > 0 else 0
            val_idx[c] = idx[:n_val][: self.max_eval_per_class]
            train_idx[c] = idx[n_val:][: self.max_per_class]
        if test_idx is None:
            test_idx = {}
            for c in order:
                idx = torch.nonzero(test.labels == c).flatten()
                if self.max_eval_per_class is not None and len(idx) > self.max_eval_per_class:
                    idx = idx[_perm(len(idx), self.seed, "test-cap", c)[: self.max_eval_per_class]]
                test_idx[c] = idx
        else:
            test_idx = {c: v[: self.max_eval_per_class] for c, v in test_idx.items()}

        mode = hf_image_mode(train, self.channels)
        self._subsets: dict[str, list[ImageSubset]] = {}
        for split_name, source, per_class in (
            ("train", train, train_idx),
            ("val", train, val_idx),
            ("test", test, test_idx),
        ):
            subsets = []
            for t in range(self.n_tasks):
                chunks = [per_class[c] for c in order[self._bounds[t] : self._bounds[t + 1]]]
                idx = torch.sort(torch.cat(chunks)).values
                subsets.append(ImageSubset(source, idx, lut[source.labels[idx]], mode, self.image_size))
            self._subsets[split_name] = subsets
        self._transform = BatchTransform(self.image_size, self.channels, self.normalize, self.mean, self.std)
        self._ready = True

    def _class_order(self, classes: list[int]) -> list[int]:
        if self.class_order_seed is None:
            order = list(classes)
        else:
            g = torch.Generator().manual_seed(mix_seed(self.class_order_seed, "class-order"))
            order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
        if self.classes_per_task is not None:
            need = self.n_tasks * self.classes_per_task
            if need > len(order):
                raise ValueError(
                    f"n_tasks * classes_per_task = {need} exceeds the {len(order)} classes of {self.dataset!r}: "
                    "lower n_tasks or classes_per_task"
                )
            order = order[:need]
        elif len(order) < self.n_tasks:
            raise ValueError(f"{self.dataset!r} has {len(order)} classes, fewer than n_tasks={self.n_tasks}")
        return order

    def _task_bounds(self, n_classes: int) -> list[int]:
        base, extra = divmod(n_classes, self.n_tasks)
        bounds = [0]
        for t in range(self.n_tasks):
            bounds.append(bounds[-1] + base + (1 if t < extra else 0))
        return bounds

    def _stratified_holdout(
        self, labels: torch.Tensor, classes: list[int], fraction: float, tag: str
    ) -> dict[int, torch.Tensor]:
        out = {}
        for c in classes:
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[_perm(len(idx), self.seed, tag, c)]
            out[c] = idx[: max(1, int(round(fraction * len(idx))))] if len(idx) > 1 else idx[:0]
        return out

    # ------------------------------------------------------------ class layout
    @property
    def num_classes(self) -> int:
        """Number of classes in the stream (head width)."""
        self._ensure_ready()
        return len(self._class_order_list)

    @property
    def class_order(self) -> list[int]:
        """Original label ids in stream order: remapped id ``k`` is original label ``class_order[k]``."""
        self._ensure_ready()
        return list(self._class_order_list)

    def task_classes(self, t: int) -> range:
        """Remapped class ids of task ``t`` (contiguous)."""
        self._ensure_ready()
        if not 0 <= t < self.n_tasks:
            raise ValueError(f"task index {t} out of range for n_tasks={self.n_tasks}")
        return range(self._bounds[t], self._bounds[t + 1])

    def task_sizes(self, split: SplitName = "test") -> list[int]:
        """Number of examples of each task in ``split`` (weights for the average accuracy)."""
        self._ensure_ready()
        return [len(s) for s in self._split(split)]

    @property
    def task_sizes_test(self) -> list[int]:
        """Test examples per task."""
        return self.task_sizes("test")

    def remap(self, labels: torch.Tensor) -> torch.Tensor:
        """Map original label ids to stream ids (-1 for classes not in the stream)."""
        self._ensure_ready()
        labels = labels.long().cpu()
        out = torch.full_like(labels, -1)
        known = (labels >= 0) & (labels < len(self._lut))
        out[known] = self._lut[labels[known]]
        return out

    # -------------------------------------------------------------- loaders
    def _split(self, split: str) -> list[ImageSubset]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return self._subsets[split]

    def _task_now(self) -> int:
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        task = getattr(module, "current_task", None)
        return int(task) if task is not None else int(self.current_task)

    def _loader(self, subset: ImageSubset, batch_size: int, generator: torch.Generator | None) -> DataLoader:
        # The permutation must not depend on how often the loader is iterated: Lightning calls iter() twice per
        # epoch except in the first epoch after a resume, and every DataLoader.__iter__ draws its base seed from
        # `generator`. So the sampler re-seeds its own generator in each __iter__.
        sampler = None if generator is None else _SeededShuffle(len(subset), generator.initial_seed())
        return DataLoader(
            subset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self._transform,
            drop_last=False,
        )

    def task_dataloader(
        self, t: int, split: SplitName = "train", shuffle: bool = False, batch_size: int | None = None
    ) -> DataLoader:
        """Loader over task ``t`` of ``split`` (e.g. for Fisher estimation); shuffling is seeded by (seed, t)."""
        self._ensure_ready()
        self.task_classes(t)  # validates t
        g = torch.Generator().manual_seed(mix_seed(self.seed, "task", t, split)) if shuffle else None
        size = batch_size or (self.batch_size if split == "train" else self.eval_batch_size)
        return self._loader(self._split(split)[t], size, g)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the current task's training data; the order is a function of (seed, task, epoch).

        The generator is seeded afresh on every call, so with ``reload_dataloaders_every_n_epochs=1`` a run
        resumed from a checkpoint sees the same batches as an uninterrupted run. Under DDP Lightning swaps the
        RandomSampler for a DistributedSampler (its own seed, ``set_epoch`` each epoch).
        """
        self._ensure_ready()
        t = self._task_now()
        self.task_classes(t)
        epoch = int(self.trainer.current_epoch) if self.trainer is not None else 0
        g = torch.Generator().manual_seed(mix_seed(self.seed, "train", t, epoch))
        return self._loader(self._split("train")[t], self.batch_size, g)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task (all tasks, in task order); empty list when ``val_fraction == 0``."""
        self._ensure_ready()
        if self.val_fraction == 0:
            return []
        return [self._loader(s, self.eval_batch_size, None) for s in self._split("val")]

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task (all tasks, in task order)."""
        self._ensure_ready()
        return [self._loader(s, self.eval_batch_size, None) for s in self._split("test")]

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"current_task": int(self.current_task)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_task = int(state_dict.get("current_task", 0))
