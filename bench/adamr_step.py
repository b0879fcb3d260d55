"""Optimiser-step cost of AdamR against AdamW (weight_decay=0) on MiniLM-shaped parameters, in the same run.

AdamR = AdamW's step + a decoupled pull toward θ_pre scaled by 1/√mean(v̂). The L2 pull is one fused pass over θ and
θ_pre (``torch._foreach_lerp_``); mean(v̂) reads Adam's second moment once more, summed in float64 so that it does
not drift. This script times the optimiser step alone (random gradients, no forward/backward), interleaving the
optimisers, and reports the ratio.
A MiniLM training step (forward + backward + optimiser, batch 32, length 32-48) takes about 1.4 s here, so the
optimiser-step difference divided by that is the fine-tuning overhead.

    python bench/adamr_step.py [--steps 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lifelong_delta.optim import AdamR

# all-MiniLM-L6-v2: vocab 30522, hidden 384, 6 layers, intermediate 1536, 512 positions (22.7 M parameters)
HIDDEN, INTER, LAYERS, VOCAB, POS = 384, 1536, 6, 30522, 512


def minilm_shapes() -> list[tuple[int, ...]]:
    shapes = [(VOCAB, HIDDEN), (POS, HIDDEN), (2, HIDDEN), (HIDDEN,), (HIDDEN,)]
    for _ in range(LAYERS):
        shapes += [(HIDDEN, HIDDEN), (HIDDEN,)] * 4 + [(HIDDEN,), (HIDDEN,)]
        shapes += [(INTER, HIDDEN), (INTER,), (HIDDEN, INTER), (HIDDEN,), (HIDDEN,), (HIDDEN,)]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = minilm_shapes()

    def make(kind: str) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
        if kind == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        else:
            opt = AdamR(params, lr=1e-4, reg=0.1, variant=kind)
        return params, opt

    runs = {k: make(k) for k in ("adamw", "l2", "l1")}
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for step in range(args.steps + 2):
        for kind, (params, opt) in runs.items():
            for p, gr in zip(params, grads):
                p.grad = gr
            t0 = time.perf_counter()
            opt.step()
            if step >= 2:  # warm-up: state allocation
                times[kind].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in runs["adamw"][0])
    base = statistics.median(times["adamw"])
    print(f"{len(shapes)} tensors, {n / 1e6:.1f} M parameters, {args.threads} threads, median of {args.steps} steps")
    print("| optimiser | step (ms) | ratio to AdamW |\n|---|---|---|")
    for kind, label in (("adamw", "AdamW (weight_decay=0)"), ("l2", "AdamR-L2"), ("l1", "AdamR-L1")):
        t = statistics.median(times[kind])
        print(f"| {label} | {1e3 * t:.1f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
