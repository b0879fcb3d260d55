"""Peak RSS of ``lifelong-delta prune`` on a synthetic ~3 GB sharded checkpoint pair (goal: <= 1.5 GB).

Writes a base and a fine-tuned checkpoint (fp32 by default, sharded, HF layout) to a temporary directory, runs
``lifelong-delta prune`` on them in a subprocess, and reads the child's peak resident set size from
``getrusage(RUSAGE_CHILDREN)``. Prints one markdown table row. The temporary directory is always removed.

    python bench/prune_rss.py [--size-gb 3] [--dtype float32] [--method dare] [--p 0.9] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lifelong_delta.delta.writer import ShardedWriter

GOAL_GB = 1.5
TIME = "/usr/bin/time"  # GNU time (Debian package time)


def make_pair(root: Path, size_gb: float, dtype: torch.dtype, shard: str) -> tuple[Path, Path, int]:
    """Base and fine-tuned checkpoints of ``size_gb`` each: 4096×4096 matrices plus a few small tensors."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows, cols = 4096, 4096
    n_mats = max(1, round(size_gb * 1e9 / (rows * cols * itemsize)))
    g = torch.Generator().manual_seed(0)
    base, ft = root / "base", root / "ft"
    with ShardedWriter(base, shard) as wb, ShardedWriter(ft, shard) as wf:
        for i in range(n_mats):
            w = torch.randn(rows, cols, generator=g).mul_(0.02)
            name = f"model.layers.{i}.mlp.weight"
            wb.add(name, w.to(dtype))
            wf.add(name, w.add_(torch.randn(rows, cols, generator=g).mul_(1e-3)).to(dtype))
            del w
            for small in ("bias", "norm.weight"):
                v = torch.randn(cols, generator=g)
                wb.add(f"model.layers.{i}.{small}", v.to(dtype))
                wf.add(f"model.layers.{i}.{small}", (v + 1e-3).to(dtype))
        wb.add("model.position_ids", torch.arange(4096))
        wf.add("model.position_ids", torch.arange(4096))
        wb.commit()
        wf.commit()
    for d in (base, ft):
        (d / "config.json").write_text('{"model_type": "synthetic"}\n')
    return base, ft, n_mats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="size of EACH checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--method", default="dare")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--in-shard-size", default="1GB")
    ap.add_argument("--out-shard-size", default="2GB")
    ap.add_argument("--tmp", default="/tmp", help="parent of the temporary directory (needs ~3.5x size-gb free)")
    ap.add_argument(
        "--runner",
        choices=["cli", "python"],
        default="cli",
        help="cli: the lifelong-delta console script; python: call commands.prune via python -c",
    )
    args = ap.parse_args()

    free_gb = shutil.disk_usage(args.tmp).free / 1e9
    need_gb = 3.5 * args.size_gb
    if free_gb < need_gb:
        sys.exit(f"error: {args.tmp} has {free_gb:.1f} GB free; this benchmark needs about {need_gb:.1f} GB")
    root = Path(tempfile.mkdtemp(prefix="prune_rss-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        base, ft, n_mats = make_pair(root, args.size_gb, getattr(torch, args.dtype), args.in_shard_size)
        t_make = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in ft.glob("*.safetensors")) / 1e9
        out = root / "out"
        prune_args = [
            "--base",
            str(base),
            "--finetuned",
            str(ft),
            "--out",
            str(out),
            "--method",
            args.method,
            "--p",
            str(args.p),
            "--out_shard_size",
            args.out_shard_size,
            "--progress",
            "false",
        ]
        if args.runner == "cli":
            cmd = [str(Path(sys.executable).parent / "lifelong-delta"), "prune", *prune_args]
        else:
            kw = dict(zip([a.lstrip("-") for a in prune_args[::2]], prune_args[1::2]))
            kw["p"], kw["progress"] = float(kw["p"]), False
            cmd = [sys.executable, "-c", f"from lifelong_delta.delta.commands import prune; prune(**{kw!r})"]
        # The child's own peak, from GNU time: a child forked from this process (which built the pair with torch)
        # starts with this process's high-water mark, so getrusage(RUSAGE_CHILDREN) would report that instead.
        rss_file = root / "rss"
        timed = os.access(TIME, os.X_OK)
        t0 = time.perf_counter()
        res = subprocess.run(
            [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if timed else cmd, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"error: prune failed ({res.returncode}):\n{res.stderr[-3000:]}")
        if timed:
            peak_gb = int(rss_file.read_text().split()[-1]) * 1024 / 1e9
        else:  # an upper bound: see above
            peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # KiB on Linux
        out_size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
        print(
            f"(made the pair in {t_make:.0f} s; output {out_size:.2f} GB in "
            f"{len(list(out.glob('*.safetensors')))} shard(s))",
            file=sys.stderr,
        )
        print("| checkpoint | tensors | method | wall s | GB/s | peak RSS GB | goal | ok |")
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {size:.2f} GB {args.dtype}, {args.in_shard_size} shards | {3 * n_mats + 1} | {args.method} "
            f"p={args.p:g} | {wall:.1f} | {size / wall:.2f} | {peak_gb:.2f} | <= {GOAL_GB} | "
            f"{'yes' if peak_gb <= GOAL_GB else 'NO'} |"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
