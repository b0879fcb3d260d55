"""Whole ``lifelong-delta pack`` and ``unpack`` commands against ``prune`` and ``cp -r``, and the packs' sizes.

The pair is ``bench/prune_command.py``'s (a Llama-architecture ``LlamaConfig`` random init, GQA, untied
embeddings, bf16, sharded; fine-tune = base + noise of 1e-3 x each tensor's RMS), built once and cached. In one
run, commands interleaved round by round, page cache warm, each as a user runs it (a subprocess):

* ``cp -r FT``: what copying the fine-tune costs;
* ``prune --method M --p P``: the dense pruned checkpoint;
* ``pack --method M --p P``: the same prune, keeping only what changed;
* ``unpack``: the pack back onto the base (checked equal to prune's files once, outside the timing);

for DARE (values under a regenerated mask) and magnitude (values + LEB128 index gaps). Reported: median wall
time, peak RSS, the pack's bytes against the fine-tune's, and the ratios within the run. Goals: a random-mask
pack at p = 0.99 is at most 1.05 (1 - p) x the fine-tune + 64 KiB; pack and unpack in prune's time (docs/benchmarks.md).

    .venv/bin/python bench/pack_command.py [--size-gb 1] [--p 0.99] [--repeats 3]
        [--cache-dir ~/.cache/lifelong_delta/bench] [--json PATH]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_command import DEFAULT_CACHE, RSS_NOTE, Command, build_pair, run_once, warm_page_cache

from lifelong_delta.outputs import make_temp_dir

CLI = str(Path(sys.executable).parent / "lifelong-delta")


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def same_checkpoint(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    return names == sorted(p.name for p in b.iterdir() if not p.name.startswith(".")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--p", type=float, default=0.99)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="dare,magnitude")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    pair = build_pair(args.cache_dir, args.size_gb, "bfloat16", "1GB")
    ft_bytes = size_of(pair.ft)
    print(
        f"pair: {pair.params / 1e6:.0f} M parameters, bf16, fine-tune {ft_bytes / 2**30:.2f} GiB in "
        f"{pair.shards} shards ({pair.ft})",
        flush=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    work = make_temp_dir(args.cache_dir, ".pack-bench-")  # a killed run's folder goes on the next run
    try:
        common = ["--base", str(pair.base), "--finetuned", str(pair.ft), "--p", str(args.p), "--progress", "false"]
        cmds = [Command("cp -r FT", ["cp", "-r", str(pair.ft), str(work / "copy")], "cp", work / "copy")]
        for m in args.methods.split(","):
            cmds += [
                Command(
                    f"prune {m}",
                    [CLI, "prune", *common, "--method", m, "--out", str(work / f"{m}-pruned")],
                    m,
                    work / f"{m}-pruned",
                ),
                Command(f"pack {m}", [CLI, "pack", *common, "--method", m, "--out", str(work / f"{m}.delta")], m, None),
                Command(
                    f"unpack {m}",
                    [
                        CLI,
                        "unpack",
                        "--base",
                        str(pair.base),
                        "--delta",
                        str(work / f"{m}.delta"),
                        "--out",
                        str(work / f"{m}-unpacked"),
                        "--progress",
                        "false",
                    ],
                    m,
                    work / f"{m}-unpacked",
                ),
            ]
        warm_page_cache(pair.base, pair.ft)
        for r in range(args.repeats):
            for c in cmds:
                if c.label.startswith("pack") and (work / f"{c.group}.delta").exists():
                    shutil.rmtree(work / f"{c.group}.delta")
                run_once(c, env, work / "log.txt")
            print(
                f"round {r + 1}/{args.repeats}: " + ", ".join(f"{c.label} {c.times[-1]:.1f} s" for c in cmds),
                flush=True,
            )
        cp = cmds[0].median
        rows = []
        print(f"\n| command | median s | × cp -r | × prune | peak RSS GiB{RSS_NOTE} | output |")
        print("|---|---|---|---|---|---|")
        print(f"| cp -r FT | {cp:.2f} | 1.00 | | {max(cmds[0].rss) / 2**30:.2f} | {ft_bytes / 2**30:.2f} GiB |")
        for m in args.methods.split(","):
            prune, pack, unpack = (c for c in cmds if c.group == m)
            same = same_checkpoint(work / f"{m}-pruned", work / f"{m}-unpacked")
            packed = size_of(work / f"{m}.delta")
            goal = 1.05 * (1 - args.p) * ft_bytes + 64 * 1024
            for c, out in (
                (prune, f"{size_of(work / f'{m}-pruned') / 2**30:.2f} GiB"),
                (
                    pack,
                    f"{packed / 2**20:.1f} MiB = {packed / ft_bytes:.3%} of FT"
                    + (
                        f" (goal ≤ {goal / 2**20:.1f} MiB: {'met' if packed <= goal else 'MISSED'})"
                        if m in ("dare", "darex-q")
                        else ""
                    ),
                ),
                (unpack, f"= prune's files: {same}"),
            ):
                print(
                    f"| {c.label} p={args.p:g} | {c.median:.2f} | {c.median / cp:.2f} | {c.median / prune.median:.2f}"
                    f" | {max(c.rss) / 2**30:.2f} | {out} |"
                )
                rows.append(
                    {
                        "label": c.label,
                        "median_s": c.median,
                        "times": c.times,
                        "rss": c.rss,
                        "vs_cp": c.median / cp,
                        "vs_prune": c.median / prune.median,
                    }
                )
            rows.append({"label": f"{m} sizes", "pack_bytes": packed, "ft_bytes": ft_bytes, "unpack_equal": same})
        if args.json:
            args.json.write_text(json.dumps({"p": args.p, "size_gb": args.size_gb, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
