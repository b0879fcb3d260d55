"""DAREx-q's analytic per-row q scan: the blocked float64 scan of ``analytic_row_q`` against the authors'
one-q-at-a-time loop, measured in the same run on MiniLM-sized layers, with the results checked equal. The last
column times the default float16 scan (the authors' arithmetic, one q at a time; ties usually end it early).

The scan runs once per layer and per η candidate in ``make prune-eval`` (6 η × 36 MiniLM matrices per analytic
cell); with the sequential loop it takes about a quarter of the study's time.

    python bench/analytic_q.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lifelong_delta.delta.analytic_q import analytic_row_q, analytic_row_q_sequential


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    # MiniLM's matrices: attention 384x384 (x4 per layer), intermediate 1536x384, output 384x1536
    layers = [
        torch.randn(r, k + 1, generator=gen, dtype=torch.float64) * 1e-4
        for r, k in [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    ]
    print(f"analytic q over 6 MiniLM-sized matrices, {args.threads} thread(s), median of {args.repeats}")
    print("| p | η | float64 sequential loop (ms) | float64 blocked scan (ms) | speed-up | float16 scan (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for p, eta in ((0.5, 0.37), (0.9, 0.37), (0.99, 0.37), (0.99, 1.5)):
        times = {"seq": [], "blk": [], "f16": []}
        for _ in range(args.repeats):
            for key, fn in (
                ("seq", lambda c, p=p, eta=eta: analytic_row_q_sequential(c, p, eta=eta)),
                ("blk", lambda c, p=p, eta=eta: analytic_row_q(c, p, eta=eta, arithmetic="float64")),
                ("f16", lambda c, p=p, eta=eta: analytic_row_q(c, p, eta=eta)),
            ):
                start = time.perf_counter()
                out = [fn(c) for c in layers]
                times[key].append(time.perf_counter() - start)
                if key == "seq":
                    want = out
                elif key == "blk":
                    assert all(torch.equal(a, b) for a, b in zip(out, want)), "blocked scan differs"
        seq, blk, f16 = (statistics.median(times[k]) for k in ("seq", "blk", "f16"))
        print(f"| {p} | {eta} | {seq * 1e3:.1f} | {blk * 1e3:.1f} | {seq / blk:.2f}x | {f16 * 1e3:.1f} |")


if __name__ == "__main__":
    main()
