"""Training-step overhead of the parameter anchors on a small ViT, measured in the same run (interleaved).

Goal (issue 3): step time with an L2 or EWC anchor over all parameters <= 1.05 x the step time without.
Also times the penalty alone (forward + backward): the foreach implementation against a naive per-tensor loop.

    python bench/anchor_overhead.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lifelong_delta.anchors import EWCAnchor, L2Anchor, ParameterAnchor


def small_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=128,
        depth=4,
        num_heads=4,
        num_classes=10,
    )


def naive_penalty(anchor: ParameterAnchor, model: nn.Module) -> torch.Tensor:
    """What the anchor avoids: one small Python-level expression per tensor."""
    named = dict(model.named_parameters())
    total = torch.zeros(())
    for name, ref in anchor.reference.items():
        total = total + (anchor.importance[name] * (named[name] - ref) ** 2).sum()
    return total


class Variant:
    def __init__(self, name: str, model: nn.Module, anchor: ParameterAnchor | None, mode: str = "penalty") -> None:
        self.name, self.model, self.anchor, self.mode = name, model, anchor, mode
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        if self.anchor is not None and self.mode == "penalty":
            loss = loss + self.anchor.strength * self.anchor.penalty(self.model)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.anchor is not None and self.mode == "pull":
            self.anchor.pull_(self.model, rate=1e-4)
        self.opt.step()


def time_penalty(fn, model: nn.Module, repeats: int) -> tuple[float, float]:
    """Fastest (wall, CPU) seconds of ``fn(model).backward()``."""
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(model).backward()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    return min(times), min(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = small_vit()
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(args.batch_size, 1, 28, 28, generator=g),
        torch.randint(0, 10, (args.batch_size,), generator=g),
    )
    l2 = L2Anchor(strength=1.0)
    l2.snapshot_(base)
    ewc = EWCAnchor(strength=1.0, estimator="batch")
    ewc.snapshot_(base, batches=[(x[:32], y[:32])])  # Fisher precomputed once; its cost is not a step cost
    variants = [
        Variant("no anchor", copy.deepcopy(base), None),
        Variant("L2Anchor penalty (all params)", copy.deepcopy(base), l2),
        Variant("EWCAnchor penalty (all params)", copy.deepcopy(base), ewc),
        Variant("L2Anchor pull_ (decoupled)", copy.deepcopy(base), l2, mode="pull"),
    ]
    for v in variants:  # warm-up (allocator, Adam state)
        for _ in range(2):
            v.step(x, y)
    for r in range(args.steps):  # one step per variant per round, order rotated: paired, drift-robust timing
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            t0, c0 = time.perf_counter(), time.process_time()
            v.step(x, y)
            v.times.append(time.perf_counter() - t0)
            v.cpu_times.append(time.process_time() - c0)

    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = sum(1 for _ in base.parameters())
    ref, ref_cpu = variants[0].times, variants[0].cpu_times
    print(
        f"ViT 28px patch 4, dim 128, depth 4, 4 heads ({n_params:,} params in {n_tensors} tensors); batch "
        f"{args.batch_size}, Adam, {args.threads} threads, {args.steps} interleaved rounds of one step per "
        "variant"
    )
    print("(best: fastest step of each variant, the least disturbed by other jobs; paired: median over rounds of")
    print(" step time / the no-anchor step of the same round, wall and process CPU time)")
    print("| variant | best step (ms) | best ratio | paired wall ratio | paired CPU ratio |")
    print("|---|---|---|---|---|")
    for v in variants:
        ratio = statistics.median(t / t_ref for t, t_ref in zip(v.times, ref))
        cpu_ratio = statistics.median(t / t_ref for t, t_ref in zip(v.cpu_times, ref_cpu))
        print(
            f"| {v.name} | {1e3 * min(v.times):.1f} | {min(v.times) / min(ref):.3f} | {ratio:.3f} | {cpu_ratio:.3f} |"
        )

    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    rows = [
        ("EWC penalty, foreach (anchor.penalty)", ewc.penalty),
        ("EWC penalty, naive per-tensor loop", lambda m: naive_penalty(ewc, m)),
        ("L2 penalty, foreach (anchor.penalty)", l2.penalty),
        ("L2 penalty, naive per-tensor loop", lambda m: naive_penalty(l2, m)),
    ]
    for _, fn in rows:  # warm-up
        time_penalty(fn, model, 3)
    print()
    print("(fastest of 30; implied step ratio: 1 + penalty wall time / fastest no-anchor step: the penalty timed alone")
    print(" is a low-noise estimate of the per-step overhead)")
    print("| penalty forward + backward | wall (ms) | CPU (ms) | implied step ratio |")
    print("|---|---|---|---|")
    for label, fn in rows:
        wall, cpu = time_penalty(fn, model, 30)
        print(f"| {label} | {1e3 * wall:.2f} | {1e3 * cpu:.2f} | {1 + wall / min(ref):.3f} |")


if __name__ == "__main__":
    main()
