"""Per-sample diagonal Fisher: torch.func vmap(grad) against a Python loop over samples, in the same run.

Goal (issue 3): the vmap estimator is >= 3x faster than the loop on a small ViT.

    python bench/fisher_per_sample.py [--samples 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from lifelong_delta.anchors.fisher import diagonal_fisher, head_loss


def loop_fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The brute force: one forward/backward per sample."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        loss = head_loss(model(x[i : i + 1]), y[i : i + 1], "softmax").sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            total[n] += g.square()
    return {n: t / len(x) for n, t in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: diagonal_fisher picks it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=10,
    ).eval()
    x, y = torch.randn(args.samples, 1, 28, 28), torch.randint(0, 10, (args.samples,))
    names = [n for n, _ in model.named_parameters()]

    def run_vmap():
        return diagonal_fisher(model, names, [(x, y)], estimator="per_sample", chunk_size=args.chunk_size)

    def run_loop():
        return loop_fisher(model, x, y)

    ref, fast = run_loop(), run_vmap()  # warm-up + correctness
    err = max(((ref[n] - fast[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item() for n in names)
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    cpu: dict[str, list[float]] = {"loop": [], "vmap": []}
    for _ in range(args.repeats):  # interleaved
        for key, fn in (("loop", run_loop), ("vmap", run_vmap)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    loop_t, vmap_t = min(times["loop"]), min(times["vmap"])
    loop_c, vmap_c = min(cpu["loop"]), min(cpu["vmap"])
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: ViT 28px patch 4, dim 64, depth 2 ({n_params:,} params); {args.samples} samples, "
        f"{args.threads} threads, best of {args.repeats}; max rel. diff {err:.1e}"
    )
    print("| estimator | wall (s) | samples/s | wall speed-up | CPU (s) | CPU speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| Python loop over samples | {loop_t:.3f} | {args.samples / loop_t:.0f} | 1.00x | {loop_c:.3f} | 1.00x |")
    print(
        f"| vmap(grad), chunk {args.chunk_size or 'auto'} | {vmap_t:.3f} | {args.samples / vmap_t:.0f} | "
        f"{loop_t / vmap_t:.2f}x | {vmap_c:.3f} | {loop_c / vmap_c:.2f}x |"
    )


if __name__ == "__main__":
    main()
