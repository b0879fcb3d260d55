"""ImageNet-R: the fixed hash split on a fake directory, the 10 x 20 stream, and the missing-directory message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lifelong_delta.cli import lightning_main
from lifelong_delta.continual import ClassIncrementalDataModule
from lifelong_delta.continual.imagenet_r import IMAGENET_R_ENV, imagenet_r_split, is_test_image, wnids

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the extracted archive: <root>/imagenet-r/<wnid>/<style>_<k>.jpg, 5 images a class."""
    root = tmp_path_factory.mktemp("data") / "imagenet-r"
    for label, wnid in enumerate(wnids()):
        (root / wnid).mkdir(parents=True)
        for k, style in enumerate(("art", "sketch", "toy", "origami", "cartoon")):
            colour = (label, 40 * k, 255 - label)
            Image.new("RGB", (10 + k, 12), colour).save(root / wnid / f"{style}_{k}.jpg")
    return root.parent


def test_the_class_list_and_the_rule_are_shipped() -> None:
    spec = json.loads((ROOT / "lifelong_delta" / "data" / "imagenet_r.json").read_text())
    assert len(spec["wnids"]) == 200 and spec["wnids"] == sorted(set(spec["wnids"])) == wnids()
    assert spec["split"]["test_fraction"] == 0.2
    # the rule is frozen: changing it would silently change everybody's test set
    assert [is_test_image("n01443537", f"art_{k}.jpg") for k in range(8)] == [
        is_test_image("n01443537", f"art_{k}.jpg") for k in range(8)
    ]
    names = [f"img_{k}.jpg" for k in range(4000)]
    share = sum(is_test_image("n02009912", n) for n in names) / len(names)
    assert 0.18 < share < 0.22


def test_split_is_a_per_file_rule_with_labels_by_wnid(fake_root: Path) -> None:
    split = imagenet_r_split(fake_root)  # the parent of imagenet-r/ is accepted too
    items = split["train"] + split["test"]
    assert len(items) == 1000 and len(split["test"]) > 0
    classes = wnids()
    for path, label in items:
        p = Path(path)
        assert classes[label] == p.parent.name
        assert ((path, label) in split["test"]) == is_test_image(p.parent.name, p.name)
    (Path(split["train"][0][0])).rename(Path(split["train"][0][0]).with_suffix(".txt"))  # a file goes away
    again = imagenet_r_split(fake_root / "imagenet-r")
    assert again["test"] == split["test"] and again["train"] == split["train"][1:]  # nothing else moves


def test_stream_of_10_tasks_by_20_classes(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGENET_R_ENV, str(fake_root / "imagenet-r"))
    dm = ClassIncrementalDataModule(
        dataset="imagenet_r", n_tasks=10, classes_per_task=20, image_size=8, channels=3, val_fraction=0.0, batch_size=16
    )
    dm.setup("fit")
    assert dm.num_classes == 200 and dm.task_classes(9) == range(180, 200)
    split = imagenet_r_split(fake_root)
    assert dm.task_sizes("train") and sum(dm.task_sizes("train")) == len(split["train"])
    assert sum(dm.task_sizes("test")) == len(split["test"])
    x, y = next(iter(dm.task_dataloader(0, "train")))
    assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
    assert torch.all((y >= 0) & (y < 20))


def test_missing_directory_is_one_line_saying_where(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv(IMAGENET_R_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=IMAGENET_R_ENV):
        imagenet_r_split()
    with pytest.raises(FileNotFoundError, match="not found at .*nope.*n01443537"):
        imagenet_r_split(tmp_path / "nope")
    (tmp_path / "partial" / "n01443537").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="lacks 199 of its 200 class folders"):
        imagenet_r_split(tmp_path / "partial")

    cfg = ROOT / "configs" / "cl_eval" / "imagenet_r"
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(
            [
                "fit",
                "-c",
                str(cfg / "base.yaml"),
                "-c",
                str(cfg / "l2p.yaml"),
                "--model.init_args.num_classes",
                "null",
                "--data.init_args.num_workers",
                "0",
                "--data.init_args.data_root",
                str(tmp_path / "nope"),
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ImageNet-R not found at") and IMAGENET_R_ENV in err
