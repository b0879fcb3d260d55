"""Sizes of packed deltas of the ten MiniLM fine-tunes of ``make prune-eval`` (TREC and VADER × AdamW, AdamR-L2,
AdamR-L1, AdamW at the large lr, LoRA), against the fine-tunes' tensors.

Each fine-tune is packed against its task's base (``<cache>/<task>/base``: the encoder with the study's fresh head)
with ``lifelong-delta pack`` as a user runs it (a subprocess): DARE at p = 0.9 and 0.99, and magnitude at p = 0.99
(which stores indices as well). Goal (issue 14): a random-mask pack at p = 0.99 is at most 1.05 × (1 − p) × the
fine-tune's bytes + 64 KiB. The LoRA fine-tune is a PEFT adapter: its pack holds the pruned product B·A of the adapted
matrices and the head, measured against the full model it stands for. Every pack is unpacked once and compared with
``prune``'s files for the same settings at p = 0.99.

    .venv/bin/python bench/pack_sizes.py [--cache-dir ~/.cache/lifelong_delta/finetunes] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "lifelong-delta")
RECIPES = ("adamw", "adamr-l2", "adamr-l1", "adamw-large", "lora")
RUNS = (("dare", 0.9), ("dare", 0.99), ("magnitude", 0.99))


def tensor_bytes(model: Path) -> int:
    from lifelong_delta.delta.io import CheckpointReader

    with CheckpointReader(model) as r:
        return sum(r.info(n).nbytes for n in r.names())


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(*args: object) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [CLI, *map(str, args), "--progress", "false"],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - t0


def same_files(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and not p.name.startswith("."))
    other = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and not p.name.startswith("."))
    return names == other and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lifelong_delta" / "finetunes")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pack-sizes-", dir=args.out_dir))
    try:
        print("| fine-tune | tensors MiB | " + " | ".join(f"{m} p={p:g}" for m, p in RUNS) + " | = prune |")
        print("|---|---|" + "---|" * len(RUNS) + "---|")
        for task in ("trec", "vader"):
            base = args.cache_dir / task / "base"
            full = tensor_bytes(base)
            for recipe in RECIPES:
                ft = args.cache_dir / task / recipe
                if not ft.exists():
                    print(f"| {task}/{recipe} | not cached (make finetune) |")
                    continue
                cells, same = [], True
                for method, p in RUNS:
                    pack = work / f"{task}-{recipe}-{method}-{p}.delta"
                    seconds = run(
                        "pack", "--base", base, "--finetuned", ft, "--method", method, "--p", p, "--out", pack
                    )
                    size = size_of(pack)
                    goal = 1.05 * (1 - p) * full + 64 * 1024
                    mark = "" if method != "dare" else (" ✓" if size <= goal else " ✗")
                    cells.append(f"{size / 2**20:.2f} MiB = {size / full:.2%}{mark} ({seconds:.1f} s)")
                    if p == 0.99:
                        run(
                            "prune",
                            "--base",
                            base,
                            "--finetuned",
                            ft,
                            "--method",
                            method,
                            "--p",
                            p,
                            "--out",
                            work / "pruned",
                        )
                        run("unpack", "--base", base, "--delta", pack, "--out", work / "unpacked")
                        same = same and same_files(work / "pruned", work / "unpacked")
                        shutil.rmtree(work / "pruned")
                        shutil.rmtree(work / "unpacked")
                print(f"| {task}/{recipe} | {full / 2**20:.1f} | " + " | ".join(cells) + f" | {same} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
