"""``lifelong-delta probe``: how good are a cached backbone's frozen features on a continual stream's data?

Two numbers that decide whether a class-incremental comparison on that stream can say anything
(docs/reproduction.md): the accuracy of a linear probe trained jointly on every class (an upper bound for
methods that keep the backbone), and ``A_N`` of per-task heads trained one task after another on the frozen
features with past logits masked (what rehearsal-free methods must beat).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["probe"]


@torch.no_grad()
def _features(net: torch.nn.Module, dm, split: str, progress: bool = False) -> tuple[Tensor, Tensor]:
    from lifelong_delta.continual.backbones import features_and_logits
    from lifelong_delta.progress import Progress

    xs, ys = [], []
    with Progress(f"features ({split})", dm.n_tasks, unit="tasks", enabled=progress) as bar:
        for t in range(dm.n_tasks):
            bar.update(0, detail=f"task {t}")
            for x, y in dm.task_dataloader(t, split, batch_size=512):
                xs.append(features_and_logits(net, x)[0])
                ys.append(y)
            bar.update(1)
    return torch.cat(xs), torch.cat(ys)


def _linear_probe(x: Tensor, y: Tensor, classes: int, l2: float = 1e-4) -> torch.nn.Linear:
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe(
    pretrained: str = "~/.cache/lifelong_delta/vit28_fmnist",
    dataset: str = "mnist",
    n_tasks: int = 5,
    classes_per_task: int = 2,
    max_per_class: int | None = 1000,
    seed: int = 0,
    epochs: int = 1,
    progress: bool = True,
) -> dict[str, float]:
    """Frozen-feature probes of ``pretrained`` on a class-incremental split of ``dataset``.

    Args:
        pretrained: a backbone directory written by ``lifelong-delta pretrain``.
        dataset: an offline source of :class:`ClassIncrementalDataModule`.
        n_tasks: tasks of the stream.
        classes_per_task: classes per task.
        max_per_class: training images per class.
        seed: class order, split and head initialisation.
        epochs: epochs of each per-task head (Adam 3e-3, batch 32, masked BCE as in ``ContinualModule``).
        progress: progress of the feature extraction and the per-task heads (a bar on a terminal, else lines).

    Returns:
        ``{"joint_linear_probe": ..., "per_task_heads_average_accuracy": ...}`` (validation accuracy), also
        printed as JSON.
    """
    from lifelong_delta.continual import ClassIncrementalDataModule, backbones
    from lifelong_delta.continual.heads import masked_loss

    path = backbones.expand_path(pretrained)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a directory written by lifelong-delta pretrain")
    config = json.loads((path / "config.json").read_text())
    name, kwargs = config.get("backbone", "vit_tiny_patch16_224"), dict(config["backbone_kwargs"])
    dm = ClassIncrementalDataModule(
        dataset=dataset,
        n_tasks=n_tasks,
        classes_per_task=classes_per_task,
        class_order_seed=seed,
        seed=seed,
        val_fraction=0.1,
        max_per_class=max_per_class,
        max_eval_per_class=300,
        image_size=kwargs.get("img_size"),
        channels=kwargs.get("in_chans"),
    )
    dm.setup("fit")
    classes = n_tasks * classes_per_task
    net = backbones.build_backbone(name, classes, str(path), kwargs).eval()
    xtr, ytr = _features(net, dm, "train", progress)
    xva, yva = _features(net, dm, "val", progress)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    joint = _linear_probe((xtr - mean) / std, ytr, classes)
    joint_acc = float((joint((xva - mean) / std).argmax(1) == yva).float().mean())

    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
        head.bias.zero_()
    from lifelong_delta.progress import Progress

    with Progress("per-task heads", n_tasks, unit="tasks", enabled=progress) as bar:
        for t in range(n_tasks):
            bar.update(0, detail=f"task {t}")
            active = dm.task_classes(t)
            sel = (ytr >= active.start) & (ytr < active.stop)
            x, y = xtr[sel], ytr[sel]
            opt = torch.optim.Adam(head.parameters(), lr=3e-3)
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), 32):
                    idx = order[i : i + 32]
                    loss = masked_loss(head(x[idx]), y[idx], active, "bce")
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            bar.update(1)
    with torch.no_grad():
        seq_acc = float((head(xva).argmax(1) == yva).float().mean())
    result = {"joint_linear_probe": joint_acc, "per_task_heads_average_accuracy": seq_acc}
    print(json.dumps({"pretrained": str(path), "dataset": dataset, **result}), flush=True)
    return result
