"""``--calib_sequential`` against the default calibration: held-out perplexity of the decoder study's fine-tunes.

WANDA's input norms and the analytic q's mean inputs are measured either on the fine-tuned model's activations (the
default, as the DAREx authors' code) or block by block through the already-pruned blocks (``--calib_sequential``,
WANDA's reference procedure). This script prunes the cached models of ``make prune-eval-decoder`` both ways with
``lifelong-delta prune`` (in this process, through ``lifelong_delta.cli.main``) and scores each pruned model on the
study's test text, in the same run:

    .venv/bin/python bench/sequential_calibration.py [--finetunes adamw adamr-l2] [--ps 0.9 0.99 0.999]
        [--seeds 0 1 2] [--eta 0.1] [--threads 1] [--cache-dir ~/.cache/lifelong_delta/decoder]

Data as in the study (``lifelong_delta/studies/prune_eval_decoder.py``): calibration is the first 16 training
blocks of 128 tokens (2 048 tokens), written as one JSONL row per block, which the CLI's tokenizer turns back into
the same token ids (checked before any prune); the test text is the first 96 held-out blocks. The analytic q uses
one η (default 0.1, the value the study's η search picked in every cell) and the study's float16 arithmetic. WANDA
is deterministic (one row per p); the analytic q runs once per mask seed, and a seed's DARE mask is the same in both
modes, so its two perplexities are a paired comparison. The models must be cached (``make prune-eval-decoder``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lifelong_delta.cli import main as cli
from lifelong_delta.delta.calibration import causal_lm_perplexity
from lifelong_delta.delta.calibration import load as load_calibration
from lifelong_delta.studies.decoder_data import batches, pack, read_dialogue, split_documents
from lifelong_delta.studies.decoder_models import load_lm
from lifelong_delta.studies.decoder_train import cache_root
from lifelong_delta.studies.prune_eval_decoder import FINETUNE_SPLITS

SEQ_LEN, CALIB_BLOCKS, TEST_BLOCKS, BATCH = 128, 16, 96, 32
METHODS = {
    "wanda": ["--method", "wanda"],
    "darex-q-analytic": ["--method", "darex-q", "--q_mode", "analytic", "--analytic_arithmetic", "float16"],
}


def study_blocks(base: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder study's calibration blocks ``[16, 128]`` and test blocks ``[96, 128]``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    docs = split_documents(read_dialogue(None), FINETUNE_SPLITS, chunk=50, seed=0)
    return pack(tok, docs["train"], SEQ_LEN, CALIB_BLOCKS), pack(tok, docs["test"], SEQ_LEN, TEST_BLOCKS)


def write_calibration(blocks: torch.Tensor, finetuned: Path, path: Path) -> None:
    """``path``: one JSONL ``text`` row per block; raises unless the CLI's calibration reads back ``blocks``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(finetuned))
    path.write_text("".join(json.dumps({"text": tok.decode(b)}) + "\n" for b in blocks))
    n = len(blocks)
    with load_calibration(
        str(finetuned), str(path), need_labels=False, samples=n, batch_size=n, max_length=SEQ_LEN
    ) as calib:
        ids = torch.cat([b["input_ids"] for b in calib.batches])
    if not torch.equal(ids, blocks):
        raise RuntimeError(f"{path}: the CLI tokenizes the calibration text into other ids than the study's blocks")


def prune_and_score(argv: list[str], out: Path, test: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Run ``lifelong-delta prune`` (its table swallowed), score ``out`` on ``test``, delete it: (perplexity, s)."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cli(["prune", *argv, "--out", str(out), "--progress", "false"])
    try:
        ppl = causal_lm_perplexity(load_lm(out), test)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return ppl, time.perf_counter() - t0


def _mean_std(xs: list[float], digits: int = 1) -> str:
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetunes", nargs="+", default=["adamw", "adamr-l2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ps", nargs="+", type=float, default=[0.9, 0.99, 0.999])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="mask seeds of the analytic q")
    ap.add_argument("--eta", type=float, default=0.1, help="the analytic q's η")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study's default: 1)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: the study's cache (…/decoder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.cache_dir.expanduser() if args.cache_dir else cache_root()
    base = root / "base"
    for d in (base, *(root / f for f in args.finetunes)):
        if not (d / "model.safetensors").is_file():
            raise SystemExit(f"{d}: no cached model; run make prune-eval-decoder first")
    calib_blocks, test_blocks = study_blocks(base)
    test = batches(test_blocks, BATCH)
    work = Path(tempfile.mkdtemp(prefix="sequential_calibration-"))
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    print(
        f"decoder study's models ({root}); calibration {calib_blocks.numel()} training tokens, test "
        f"{test_blocks.numel()} held-out tokens; analytic η {args.eta}, float16; {args.threads} torch thread(s)\n"
    )
    print("| fine-tune | method | p | default | `--calib_sequential` | Δ (paired) | Δ % | s per prune+eval |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    try:
        for ft in args.finetunes:
            data = work / f"calib-{ft}.jsonl"
            write_calibration(calib_blocks, root / ft, data)
            common = ["--base", str(base), "--finetuned", str(root / ft), "--calib_data", str(data)]
            common += ["--calib_samples", str(CALIB_BLOCKS), "--batch_size", str(CALIB_BLOCKS)]
            common += ["--max_length", str(SEQ_LEN)]
            for method in args.methods:
                for p in args.ps:
                    seeds = args.seeds if method == "darex-q-analytic" else args.seeds[:1]
                    ppl: dict[bool, list[float]] = {False: [], True: []}
                    secs: list[float] = []
                    for seed in seeds:
                        argv = [*common, *METHODS[method], "--p", str(p), "--seed", str(seed)]
                        if method == "darex-q-analytic":
                            argv += ["--eta", str(args.eta)]
                        for seq in (False, True):
                            extra = ["--calib_sequential"] if seq else []
                            value, sec = prune_and_score([*argv, *extra], work / "out", test)
                            ppl[seq].append(value)
                            secs.append(sec)
                            print(
                                f"  {ft} {method} p={p:g} seed={seed} {'sequential' if seq else 'default'}: "
                                f"{value:.2f} ({sec:.1f} s)",
                                file=sys.stderr,
                                flush=True,
                            )
                    diffs = [b - a for a, b in zip(ppl[False], ppl[True])]
                    rel = [100 * (b / a - 1) for a, b in zip(ppl[False], ppl[True])]
                    print(
                        f"| {ft} | {method} | {p:g} | {_mean_std(ppl[False])} | {_mean_std(ppl[True])} | "
                        f"{_mean_std(diffs, 2)} | {statistics.mean(rel):+.2f} | {statistics.mean(secs):.1f} |",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmean ± sample std over mask seeds {args.seeds} for the analytic q (WANDA: one deterministic run); "
        f"Δ = sequential − default per seed. Wall {(time.perf_counter() - start) / 60:.1f} min; load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    )


if __name__ == "__main__":
    main()
