"""DARE throughput in elements/s against a plain memory copy of the same tensors, in the same run.

Goal (issue 4): the fused DARE merge reaches >= 0.25 of copy speed (``torch.rand``-based DARE reaches
about 0.013), and is >= 10x faster than PEFT's ``dare_linear`` and mergekit's DARE. For float32 and bfloat16 the
compiled kernel of the streaming prune (``_kernels.merge_words``: raw words, statistics included) is measured too.

    python bench/dare_throughput.py [--numel 64M] [--tensors 16] [--threads 2] [--reps 3]
                                    [--slow-tensors 4] [--dtype float32] [--mergekit-src DIR]

Methods are interleaved rep by rep and the median time is reported. Slow baselines run on the first
``--slow-tensors`` tensors only (elements/s is a rate, so it is comparable). mergekit is used if it is
importable, or from ``--mergekit-src`` (an unpacked wheel or another environment's site-packages, e.g.
``pip download mergekit --no-deps -d /tmp/mk && unzip /tmp/mk/*.whl -d /tmp/mk/src``); it is never a
dependency of this project.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lifelong_delta.delta import _kernels, masks
from lifelong_delta.delta.choices import scale_of
from lifelong_delta.delta.dare import _words, dare_merge
from lifelong_delta.delta.dtypes import dtype_code

Pair = tuple[torch.Tensor, torch.Tensor]


def _parse_count(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def naive_dare(base: torch.Tensor, ft: torch.Tensor, p: float) -> torch.Tensor:
    """The textbook version: a torch.rand mask over an fp32 delta."""
    delta = ft.float() - base.float()
    keep = torch.rand_like(delta) >= p
    return (base.float() + delta * keep / (1 - p)).to(ft.dtype)


Merge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def baselines(p: float, mergekit_src: str | None) -> dict[str, Merge | str]:
    """Third-party DARE merges ``(base, ft) -> merged``, or a note saying why one is unavailable."""
    out: dict[str, Merge | str] = {"naive torch.rand DARE": lambda b, f: naive_dare(b, f, p)}
    try:
        from peft.utils.merge_utils import dare_linear

        one = torch.ones(1)
        out["peft dare_linear"] = lambda b, f: (b.float() + dare_linear([f.float() - b.float()], one, 1 - p)).to(
            f.dtype
        )
    except ImportError as e:
        out["peft dare_linear"] = f"not importable ({e})"
    if mergekit_src:
        sys.path.insert(0, mergekit_src)
    try:
        from mergekit.sparsify import RescaleNorm, bernoulli

        out["mergekit DARE (sparsify.bernoulli, l1 rescale)"] = lambda b, f: (
            b.float() + bernoulli(f.float() - b.float(), 1 - p, RescaleNorm.l1)
        ).to(f.dtype)
    except ImportError as e:
        out["mergekit DARE (sparsify.bernoulli, l1 rescale)"] = f"not importable ({e}); see --mergekit-src"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", default="64M", help="total elements over all tensors (e.g. 64M)")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slow-tensors", type=int, default=4, help="tensors used for the slow baselines")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mergekit-src", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n_each = _parse_count(args.numel) // args.tensors
    gen = torch.Generator().manual_seed(0)
    pairs: list[Pair] = []
    for _ in range(args.tensors):
        b = torch.randn(n_each, generator=gen).to(dtype)
        pairs.append((b, (b.float() + 0.01 * torch.randn(n_each, generator=gen)).to(dtype)))
    dst = torch.empty(n_each, dtype=dtype)
    slow = pairs[: args.slow_tensors]

    def fused(b: torch.Tensor, f: torch.Tensor, i: int) -> None:
        dare_merge(b, f, args.p, seed=0, name=f"t{i}", out=dst)

    def fused_alloc(b: torch.Tensor, f: torch.Tensor, i: int) -> None:
        dare_merge(b, f, args.p, seed=0, name=f"t{i}")

    def torch_backend(b: torch.Tensor, f: torch.Tensor, i: int) -> None:
        masks.set_backend("torch")
        try:
            dare_merge(b, f, args.p, seed=0, name=f"t{i}", out=dst)
        finally:
            masks.set_backend("auto")

    def words(b: torch.Tensor, f: torch.Tensor, i: int) -> None:
        _kernels.merge_words(
            dtype_code(dtype),
            _words(b),
            _words(f),
            _words(dst),
            _kernels.tensor_key(0, f"t{i}"),
            0,
            _kernels.drop_threshold(args.p),
            scale_of(1 - args.p),
        )

    variants: dict[str, tuple[Callable[..., None], list[Pair]]] = {
        "copy (dst.copy_(src))": (lambda b, f, i: dst.copy_(f), pairs),
        "lifelong_delta dare_merge (fused, out=)": (fused, pairs),
        "lifelong_delta dare_merge (fused, allocates)": (fused_alloc, pairs),
        "lifelong_delta dare_merge (torch back end)": (torch_backend, slow),
    }
    if _kernels.HAVE_WORDS and dtype in (torch.float32, torch.bfloat16):
        variants["lifelong_delta merge_words (compiled, raw words + statistics)"] = (words, pairs)
    notes: dict[str, str] = {}
    for name, fn in baselines(args.p, args.mergekit_src).items():
        if isinstance(fn, str):
            notes[name] = fn
        else:
            variants[name] = ((lambda fn: lambda b, f, i: fn(b, f))(fn), slow)  # noqa: B023 (bound by the outer lambda)

    for fn, ts in variants.values():  # warm-up (numba compile / cache load, page faults)
        fn(*ts[0], 0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, (fn, ts) in variants.items():
            t0 = time.perf_counter()
            for i, (b, f) in enumerate(ts):
                fn(b, f, i)
            times[name].append(time.perf_counter() - t0)

    rate = {k: len(variants[k][1]) * n_each / statistics.median(v) for k, v in times.items()}
    copy_rate = rate["copy (dst.copy_(src))"]
    fused_rate = rate["lifelong_delta dare_merge (fused, out=)"]
    print(
        f"DARE p={args.p}, {args.tensors} x {n_each:,} {args.dtype} elements, {args.threads} threads, "
        f"numba={'yes' if masks.numba_available() else 'no'}, median of {args.reps}\n"
    )
    print("| method | elements/s | x copy | fused speed-up |")
    print("|---|---:|---:|---:|")
    for k, r in rate.items():
        print(f"| {k} | {r / 1e6:,.1f} M | {r / copy_rate:.3f} | {fused_rate / r:.1f}x |")
    for k, v in notes.items():
        print(f"| {k} | {v} | – | – |")


if __name__ == "__main__":
    main()
