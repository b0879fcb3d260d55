"""Switching ten MiniLM fine-tunes with ``DeltaBank`` against loading each with ``from_pretrained`` (goal: >= 20x).

The fine-tunes (``--models``): ``cached``, the ten of ``make finetune`` (TREC and VADER, each with adamw, adamr-l2,
adamr-l1, adamw-large and lora; the base is ``trec/base``, the heads of 6 and 2 classes travel with the packs);
or ``synthetic``, made here: the offline all-MiniLM-L6-v2 with a seeded 2-class head as the base, and ten copies
with every weight plus seeded Gaussian noise of std 1e-3 x its tensor's mean |θ| and a fresh head of 6 or 2
classes. ``auto`` (the default) takes the cached ones when all ten are there. Each is packed twice with
``lifelong-delta pack --method dare --p 0.99 --exclude 'classifier.*'``: with the default ``--seed 0`` (the ten
packs keep the same entries, so the bank holds their positions once and a switch writes only the new values), and
with ``--seed i`` (ten different masks: a switch writes the base back under the old entries, then swaps the new
values in). Then, in this one process:

* ``DeltaBank``, per seed setting: ``bank.add`` of each pack; ``bank.activate(name)`` cycling through the ten (each
  switch leaves the previous fine-tune), median after a warm-up pass, back to back and with an (untimed) forward
  pass of 8 x 64 tokens before each switch, which evicts the touched cache lines as serving would; the values
  touched per switch; the resident set (VmRSS after ``malloc_trim``) before and after the ten ``add``; the base bit
  for bit at the end;
* ``from_pretrained``: ``AutoModelForSequenceClassification.from_pretrained(dir)`` of each fine-tune, page cache
  warm (each loaded once before timing), median over rounds; and the same followed by one read of every weight
  (transformers maps the safetensors file, so a weight's page is read when first used).

Every timing is repeated ``--repeats`` times, the settings interleaved (so that each sees the same load on a shared
machine), and the median of the repeats' medians is reported. Prints a markdown table. The packs (and synthetic
models) go to a temporary directory, removed at the end, unless ``--keep DIR`` is given (then reused).

    python bench/delta_bank.py [--models auto|cached|synthetic] [--rounds 5] [--repeats 3] [--threads 1] [--p 0.99]
                               [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

TASKS = 10
GOAL = 20.0
SEEDS = {"one seed (default)": lambda i: 0, "ten seeds": lambda i: i}


def timed_switches(
    bank: object, model: torch.nn.Module, names: list[str], rounds: int
) -> Iterator[tuple[int, str, float, bool]]:
    """``(i, name, seconds, after_forward)`` of each timed ``bank.activate(names[i])``: cycling through ``names``,
    a warm-up pass (untimed), ``rounds`` passes back to back, then ``rounds`` passes with an untimed forward pass of
    8 x 64 tokens before each switch."""
    ids = torch.randint(1000, 5000, (8, 64), generator=torch.Generator().manual_seed(0))
    for round_ in range(2 * rounds + 1):
        for i, name in enumerate(names):
            if round_ > rounds:
                with torch.no_grad():
                    model(ids)
            t = time.perf_counter()
            bank.activate(name)  # type: ignore[attr-defined]
            dt = time.perf_counter() - t
            if round_:
                yield i, name, dt, round_ > rounds


def rss_mib() -> float:
    """Resident set of this process, MiB (after returning freed heap to the system)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cached_models() -> tuple[Path, dict[str, Path]]:
    """The base and the ten fine-tunes of ``make finetune`` (TREC and VADER, the study's five recipes)."""
    from lifelong_delta.text.finetune import STUDY_RECIPES, finetune_dir

    finetunes = {
        f"{task}/{recipe}": finetune_dir(task, recipe) for task in ("trec", "vader") for recipe in STUDY_RECIPES
    }
    return finetune_dir("trec", "base"), finetunes


def synthetic_models(root: Path) -> tuple[Path, dict[str, Path]]:
    return root / "base", {f"task{i}": root / f"task{i}" for i in range(TASKS)}


def _all_saved(base: Path, finetunes: dict[str, Path]) -> bool:
    return all((d / "model.safetensors").is_file() for d in [base, *finetunes.values()])


def pack_dirs(root: Path, finetunes: dict[str, Path], setting: str) -> dict[str, Path]:
    tag = "seed0" if SEEDS[setting](1) == 0 else "seedi"
    return {name: root / f"{name.replace('/', '-')}.{tag}.delta" for name in finetunes}


def make_synthetic(root: Path) -> None:
    """Save the base and the ten synthetic fine-tunes under ``root`` (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lifelong_delta.text.data import minilm_dir

    base_dir, finetunes = synthetic_models(root)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    base.save_pretrained(base_dir)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
    for i, directory in enumerate(finetunes.values()):
        g = torch.Generator().manual_seed(1 + i)
        config = AutoConfig.from_pretrained(base_dir, num_labels=6 if i % 2 == 0 else 2)
        torch.manual_seed(100 + i)  # the fresh head
        model = AutoModelForSequenceClassification.from_config(config).eval()
        noisy = {
            k: v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state.items()
        }
        model.load_state_dict(noisy, strict=False)
        model.save_pretrained(directory)


def make_packs(root: Path, base: Path, finetunes: dict[str, Path], p: float) -> None:
    """Pack every fine-tune against ``base`` into ``root``, once per seed setting (missing packs only)."""
    from lifelong_delta.cli import main

    for i, (name, directory) in enumerate(finetunes.items()):
        for setting, seed in SEEDS.items():
            out = pack_dirs(root, finetunes, setting)[name]
            if out.is_dir():
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                main(
                    [
                        "pack",
                        "--base",
                        str(base),
                        "--finetuned",
                        str(directory),
                        "--out",
                        str(out),
                        "--method",
                        "dare",
                        "--p",
                        str(p),
                        "--seed",
                        str(seed(i)),
                        "--exclude",
                        "classifier.*",
                        "--progress",
                        "false",
                    ]
                )


def measure_bank(model: torch.nn.Module, packs: dict[str, Path], rounds: int, shared: bool) -> dict[str, float]:
    """Times, bytes and RSS of a bank of ``packs`` on ``model`` (left at the base); ``shared``: the packs keep
    the same entries."""
    from lifelong_delta.delta.bank import DeltaBank
    from lifelong_delta.delta.pack_format import pack_size

    original = {k: v.clone() for k, v in model.state_dict().items()}
    rss = rss_mib()
    bank = DeltaBank(model)
    adds = []
    for task, pack in packs.items():
        t = time.perf_counter()
        bank.add(task, pack)
        adds.append(time.perf_counter() - t)
    rss_added = rss_mib()
    names, switches, cold, written = list(packs), [], [], []
    for i, task, dt, after_forward in timed_switches(bank, model, names, rounds):
        if after_forward:
            cold.append(dt)
        else:
            switches.append(dt)
            # shared positions: the new values written over the old; else the old entries written back, then the
            # base under the new ones read and the new values written
            new, old = bank.write_bytes(task), bank.write_bytes(names[i - 1])
            written.append(new + (0 if shared else old + new))
    t = time.perf_counter()
    bank.deactivate()
    revert = time.perf_counter() - t
    identical = all(
        torch.equal(v.reshape(-1).view(torch.uint8), original[k].reshape(-1).view(torch.uint8))
        for k, v in model.state_dict().items()
    )
    return {
        "switch": statistics.median(switches),
        "cold": statistics.median(cold),
        "revert": revert,
        "add": statistics.median(adds),
        "touched": statistics.mean(written),
        "held": bank.nbytes(),
        "rss": rss,
        "rss_added": rss_added,
        "on_disk": sum(pack_size(pack) for pack in packs.values()),
        "identical": float(identical),
        "switches": len(switches) + len(cold) + TASKS,
    }


def time_from_pretrained(finetunes: dict[str, Path], rounds: int, touch: bool) -> float:
    """Median seconds of one ``from_pretrained`` of a fine-tune, page cache warm (``touch``: and a read of every
    weight)."""
    from transformers import AutoModelForSequenceClassification

    for path in finetunes.values():  # warm the page cache
        AutoModelForSequenceClassification.from_pretrained(path)
    times = []
    for _ in range(rounds):
        for path in finetunes.values():
            t = time.perf_counter()
            model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            if touch:
                with torch.no_grad():
                    sum(float(v.sum()) for v in model.state_dict().values() if v.is_floating_point())
            times.append(time.perf_counter() - t)
            del model
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="passes over the ten fine-tunes per timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every timing (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy 2-core machine)")
    ap.add_argument("--p", type=float, default=0.99, help="DARE drop rate of the packs")
    ap.add_argument("--keep", type=Path, default=None, help="make the models here and keep them (reused if there)")
    ap.add_argument(
        "--models",
        choices=("auto", "cached", "synthetic"),
        default="auto",
        help="cached: the ten MiniLM fine-tunes of `make finetune`; synthetic: ten made here; auto: cached if all "
        "ten are there",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lifelong_delta.delta.masks import keep_mask

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    base, finetunes = cached_models()
    models = args.models
    if models == "auto":
        models = "cached" if _all_saved(base, finetunes) else "synthetic"
    if models == "cached" and not _all_saved(base, finetunes):
        raise SystemExit(
            "error: the ten MiniLM fine-tunes are not all cached; run `make finetune` or --models synthetic"
        )
    root = args.keep or Path(tempfile.mkdtemp(prefix="delta_bank-"))
    try:
        t = time.perf_counter()
        if models == "synthetic":
            base, finetunes = synthetic_models(root)
            if not _all_saved(base, finetunes):
                make_synthetic(root)
        make_packs(root, base, finetunes, args.p)
        print(f"({models} fine-tunes; made or found the models and their packs in {time.perf_counter() - t:.0f} s)")

        keep_mask(1 << 20, args.p, seed=0, name="warm-up")  # numba's compile and thread pool, before any RSS
        torch.set_num_threads(args.threads)
        model = AutoModelForSequenceClassification.from_pretrained(base).eval()
        with torch.no_grad():
            model(torch.tensor([[101, 2054, 2003, 102]]))  # every weight resident
        params = sum(v.numel() for v in model.state_dict().values())
        runs: dict[str, list[dict[str, float]]] = {}
        loads: list[float] = []
        loads_read: list[float] = []
        for _ in range(args.repeats):  # interleaved, so that every setting sees the same machine
            for setting in SEEDS:
                packs = pack_dirs(root, finetunes, setting)
                runs.setdefault(setting, []).append(measure_bank(model, packs, args.rounds, SEEDS[setting](1) == 0))
            loads.append(time_from_pretrained(finetunes, args.rounds, touch=False))
            loads_read.append(time_from_pretrained(finetunes, args.rounds, touch=True))
        banks = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
        load, load_read = statistics.median(loads), statistics.median(loads_read)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    mib = 2**20
    print(
        f"\nMiniLM-L6 ({params / 1e6:.1f} M parameters, fp32, {params * 4 / mib:.0f} MiB), ten {models} fine-tunes, "
        f"dare p={args.p:g}, {args.threads} torch thread(s)\n"
    )
    print(
        f"`from_pretrained` of a fine-tune, median, page cache warm: **{load * 1e3:.1f} ms** "
        f"({load_read * 1e3:.1f} ms with one read of every weight)\n"
    )
    print(
        f"| packs | `bank.activate` median | × `from_pretrained` (goal ≥ {GOAL:g}) | after a forward pass | × | "
        "values touched per switch | `deactivate` | `add` per pack | packs on disk | held by the bank | "
        "RSS base → + ten packs | base bit-identical |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for setting, b in banks.items():
        print(
            f"| {setting} | {b['switch'] * 1e3:.2f} ms | **{load / b['switch']:.1f}×** "
            f"{'met' if load / b['switch'] >= GOAL else 'not met'} "
            f"| {b['cold'] * 1e3:.2f} ms | {load / b['cold']:.1f}× | {b['touched'] / mib:.2f} MiB "
            f"({b['touched'] / (params * 4):.1%}) | {b['revert'] * 1e3:.2f} ms | {b['add'] * 1e3:.0f} ms | "
            f"{b['on_disk'] / mib:.1f} MiB | {b['held'] / mib:.1f} MiB | {b['rss']:.0f} → {b['rss_added']:.0f} MiB "
            f"(+{b['rss_added'] - b['rss']:.1f}) | {'yes' if b['identical'] else 'NO'} after "
            f"{b['switches']:.0f} switches |"
        )


if __name__ == "__main__":
    main()
