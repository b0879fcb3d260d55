"""ClassIncrementalDataModule: class split and remap, held-out splits, seeded loaders, sources and errors."""

import pickle
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from lifelong_delta.continual.data import ClassIncrementalDataModule
from lifelong_delta.continual.sources import DATA_ROOT_ENV, BatchTransform, UInt8Batch


def _digits(**kw):
    kw.setdefault("n_tasks", 5)
    return ClassIncrementalDataModule("digits", **kw)


def _rows(loader):
    """Original rows and remapped labels behind a task loader."""
    ds = loader.dataset
    return ds.indices, ds.labels, ds.split.labels[ds.indices]


def _train_batches(dm, epoch, task=0):
    dm.trainer = SimpleNamespace(current_epoch=epoch, lightning_module=SimpleNamespace(current_task=task))
    return [y.tolist() for _, y in dm.train_dataloader()]


def test_every_class_in_exactly_one_task_and_labels_remapped():
    dm = _digits(class_order_seed=3)
    assert dm.num_classes == 10 and sorted(dm.class_order) == list(range(10))
    ranges = [dm.task_classes(t) for t in range(5)]
    assert [list(r) for r in ranges] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for split in ("train", "val", "test"):
        for t in range(5):
            _, remapped, original = _rows(dm.task_dataloader(t, split))
            assert set(remapped.tolist()) == set(ranges[t])
            assert [dm.class_order[k] for k in remapped.tolist()] == original.tolist()
            torch.testing.assert_close(dm.remap(original), remapped)


def test_class_order_follows_the_seed():
    a, b, c = _digits(class_order_seed=0), _digits(class_order_seed=0), _digits(class_order_seed=1)
    assert a.class_order == b.class_order
    assert a.class_order != c.class_order
    assert a.class_order != list(range(10))
    assert _digits(class_order_seed=None).class_order == list(range(10))


def test_unequal_and_partial_splits_and_errors():
    dm = _digits(n_tasks=3, class_order_seed=None)
    assert [len(dm.task_classes(t)) for t in range(3)] == [4, 3, 3]
    dm = _digits(n_tasks=3, classes_per_task=3)
    assert dm.num_classes == 9 and dm.task_classes(2) == range(6, 9)
    assert sum(dm.task_sizes("test")) < sum(_digits(n_tasks=3).task_sizes("test"))
    with pytest.raises(ValueError, match="n_tasks"):
        _digits(n_tasks=11).setup()
    with pytest.raises(ValueError, match="classes_per_task"):
        _digits(n_tasks=4, classes_per_task=3).setup()
    with pytest.raises(ValueError, match="val_fraction"):
        _digits(val_fraction=1.0)
    with pytest.raises(ValueError, match="channels"):
        _digits(channels=2)
    with pytest.raises(ValueError, match="task index"):
        _digits().task_classes(5)


def test_validation_split_is_disjoint_and_stratified():
    dm = _digits(val_fraction=0.2, seed=7)
    n_total = 1797
    seen = []
    for t in range(5):
        tr_rows, tr_lab, _ = _rows(dm.task_dataloader(t, "train"))
        va_rows, va_lab, _ = _rows(dm.task_dataloader(t, "val"))
        te_rows, _, _ = _rows(dm.task_dataloader(t, "test"))  # digits has no test split: carved out of train
        assert not set(tr_rows.tolist()) & set(va_rows.tolist())
        assert not set(te_rows.tolist()) & (set(tr_rows.tolist()) | set(va_rows.tolist()))
        for c in dm.task_classes(t):
            n_tr, n_va = int((tr_lab == c).sum()), int((va_lab == c).sum())
            assert n_va == round(0.2 * (n_tr + n_va))
        seen += tr_rows.tolist() + va_rows.tolist() + te_rows.tolist()
    assert sorted(seen) == list(range(n_total))
    other = _digits(val_fraction=0.2, seed=8)
    assert not torch.equal(_rows(other.task_dataloader(0, "val"))[0], _rows(dm.task_dataloader(0, "val"))[0])


def test_caps_per_class():
    dm = _digits(max_per_class=4, max_eval_per_class=2, val_fraction=0.3)
    assert dm.task_sizes("train") == [8] * 5
    assert dm.task_sizes("val") == [4] * 5
    assert dm.task_sizes_test == [4] * 5


def test_loader_order_is_a_function_of_seed_and_epoch():
    a, b = _digits(seed=1, max_per_class=20), _digits(seed=1, max_per_class=20)
    assert _train_batches(a, epoch=3) == _train_batches(b, epoch=3) == _train_batches(a, epoch=3)
    assert _train_batches(a, epoch=3) != _train_batches(a, epoch=4)
    assert _train_batches(a, epoch=3) != _train_batches(_digits(seed=2, max_per_class=20), epoch=3)
    assert {y for batch in _train_batches(a, epoch=0, task=2) for y in batch} == set(a.task_classes(2))


def test_current_task_without_trainer_and_eval_loaders():
    dm = _digits(batch_size=16, eval_batch_size=1000)
    dm.current_task = 3
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert set(labels.tolist()) == set(dm.task_classes(3))
    for name in ("val_dataloader", "test_dataloader"):
        loaders = getattr(dm, name)()
        assert len(loaders) == 5
        for t, dl in enumerate(loaders):
            first = [y.tolist() for _, y in dl]
            assert first == [y.tolist() for _, y in dl]  # no shuffling
            assert set(sum(first, [])) == set(dm.task_classes(t))
    assert _digits(val_fraction=0.0).val_dataloader() == []


def test_batches_are_float_images_with_int64_labels_and_pickle():
    dm = _digits(image_size=16, channels=3, max_per_class=3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0 and torch.equal(x[:, 0], x[:, 1])
    pickle.dumps(dm.train_dataloader().dataset), pickle.dumps(dm.train_dataloader().collate_fn)


def test_batch_transform_math():
    images = torch.tensor([[[[0, 255]], [[51, 255]], [[102, 255]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    x, y = BatchTransform(channels=1, mean=[0.2], std=[0.5])(UInt8Batch(images, torch.tensor([4])))
    luma = (0.299 * 0 + 0.587 * 51 + 0.114 * 102) / 255
    torch.testing.assert_close(x, torch.tensor([[[[(luma - 0.2) / 0.5, (1 - 0.2) / 0.5]]]]))
    assert y.tolist() == [4]
    x, _ = BatchTransform(image_size=4, normalize=False)([(images[0], 1), (images[0], 2)])
    assert x.shape == (2, 3, 4, 4) and x.min() >= 0.0 and x.max() <= 1.0


def test_mnist_shapes_and_sizes():
    dm = ClassIncrementalDataModule("mnist", n_tasks=5, max_per_class=5, max_eval_per_class=3, batch_size=8)
    assert dm.num_classes == 10
    assert dm.task_sizes("train") == [10] * 5 and dm.task_sizes("val") == [6] * 5 and dm.task_sizes_test == [6] * 5
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() <= 1.0
    x, _ = next(iter(dm.test_dataloader()[4]))
    assert x.shape == (6, 1, 28, 28)


def test_use_distributed_sampler_replacement_works():
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = _digits(n_tasks=2, max_per_class=10, batch_size=8)
    loader = dm.train_dataloader()
    halves = []
    for rank in (0, 1):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        dl = _update_dataloader(loader, sampler)
        assert isinstance(dl.sampler, DistributedSampler)
        rows = [y for _, y in dl]
        halves.append(torch.cat(rows))
        assert rows[0].dtype == torch.int64 and len(rows[0]) == 8
    assert len(halves[0]) == len(halves[1]) == 25


class _Probe(L.LightningModule):
    """Task = epoch; records the labels it trains on and the val loader indices."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        self.train_labels: dict[int, set] = {}
        self.val_loaders: set = set()

    @property
    def current_task(self) -> int:
        return self.trainer.current_epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_labels.setdefault(self.current_epoch, set()).update(y.tolist())
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val_loaders.add(dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_serves_the_modules_current_task():
    dm = _digits(n_tasks=2, max_per_class=6, max_eval_per_class=2, batch_size=16)
    module = _Probe()
    trainer = L.Trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module.train_labels == {0: set(dm.task_classes(0)), 1: set(dm.task_classes(1))}
    assert module.val_loaders == {0, 1}


def _png(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).convert(mode).save(path)


def test_hf_imagefolder_source(tmp_path):
    root = tmp_path / "imgs"
    for c, name in enumerate(["cat", "dog", "eel"]):
        for k in range(5):
            _png(root / name / f"{k}.png", (10 + k, 12), mode="L" if (c, k) == (1, 3) else "RGB", seed=10 * c + k)
    dm = ClassIncrementalDataModule(
        "imagefolder",
        data_root=str(root),
        n_tasks=3,
        class_order_seed=None,
        image_size=8,
        val_fraction=0.0,
        batch_size=4,
        hf_kwargs={"cache_dir": str(tmp_path / "hf")},
    )
    assert dm.class_order == [0, 1, 2] and dm.num_classes == 3
    assert dm.task_sizes("train") == [4, 4, 4] and dm.task_sizes_test == [1, 1, 1]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 0, 0]
    x, y = next(iter(dm.task_dataloader(1, "train", batch_size=10)))  # holds the grayscale image
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) == {1}
    pickle.dumps(dm.train_dataloader().dataset)


def test_hf_imagefolder_with_train_and_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for name in ("a", "b"):
            for k in range(n):
                _png(tmp_path / "d" / split / name / f"{k}.png", (6, 6), seed=k)
    dm = ClassIncrementalDataModule(
        "imagefolder",
        data_root=str(tmp_path / "d"),
        n_tasks=2,
        val_fraction=0.0,
        channels=1,
        hf_kwargs={"cache_dir": str(tmp_path / "hf")},
    )
    assert dm.task_sizes("train") == [3, 3] and dm.task_sizes_test == [2, 2]
    x, _ = next(iter(dm.test_dataloader()[0]))
    assert x.shape == (2, 1, 6, 6)


def test_missing_data_says_where_to_put_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST not found in .*make data.*data_root="):
        ClassIncrementalDataModule("fashion_mnist", data_root=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        ClassIncrementalDataModule("mnist", data_root=str(tmp_path)).setup()
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(ValueError, match=f"data_root=DIR.*{DATA_ROOT_ENV}"):
        ClassIncrementalDataModule("imagefolder").setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClassIncrementalDataModule("imagefolder", data_root=str(tmp_path / "nope")).setup()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not be loaded offline.*HF_HOME"):
        ClassIncrementalDataModule("lifelong-delta/no-such-dataset", hf_kwargs={"cache_dir": str(tmp_path)}).setup()


def test_missing_column_names_the_option(tmp_path):
    _png(tmp_path / "i" / "a" / "0.png", (4, 4))
    _png(tmp_path / "i" / "b" / "0.png", (4, 4))
    dm = ClassIncrementalDataModule(
        "imagefolder",
        data_root=str(tmp_path / "i"),
        n_tasks=2,
        label_key="fine_label",
        hf_kwargs={"cache_dir": str(tmp_path / "hf")},
    )
    with pytest.raises(ValueError, match="label_key="):
        dm.setup()
