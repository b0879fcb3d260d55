"""The DeltaBank of another commit against this one, in the same process, on the same model and packs.

Loads ``lifelong_delta/delta/bank.py`` as it was at ``--against`` (``git show``) next to the installed one, adds the
packs of ``--packs`` (``*.seed0.delta`` by default: the one-seed packs that ``bench/delta_bank.py --keep DIR``
leaves) to a bank of each kind on one base model, and times ``bank.activate`` cycling through them, back to back
and after an untimed 8 x 64-token forward pass. The two banks take turns, ``--repeats`` times, in alternating
order. Prints the medians and the ratio. A ratio from one run holds on any day; the absolute times move with the
machine.

    python bench/delta_bank_ab.py --against 9ef9f15 --packs /tmp/bankkeep [--glob '*.seed0.delta'] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from delta_bank import timed_switches

ROOT = Path(__file__).resolve().parent.parent


def bank_at(commit: str, folder: Path) -> type:
    """``DeltaBank`` of ``lifelong_delta/delta/bank.py`` at ``commit``, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:lifelong_delta/delta/bank.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / f"bank_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.DeltaBank


def cycle(bank_class: type, model: torch.nn.Module, packs: list[Path], rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per ``activate``: back to back (after a warm-up pass), and after a forward pass."""
    bank = bank_class(model)
    for pack in packs:
        bank.add(pack.name, pack)
    warm: list[float] = []
    cold: list[float] = []
    for _, _, dt, after_forward in timed_switches(bank, model, bank.names, rounds):
        (cold if after_forward else warm).append(dt)
    bank.deactivate()
    return warm, cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="the commit whose bank.py to compare with")
    ap.add_argument("--packs", type=Path, required=True, help="a folder of packs of one base (delta_bank.py --keep)")
    ap.add_argument("--glob", default="*.seed0.delta")
    ap.add_argument(
        "--base", type=Path, default=None, help="the base model folder (default: make finetune's trec/base)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForSequenceClassification

    from lifelong_delta.delta.bank import DeltaBank
    from lifelong_delta.text.finetune import finetune_dir

    torch.set_num_threads(1)
    packs = sorted(args.packs.glob(args.glob))
    if not packs:
        raise SystemExit(f"error: no {args.glob} in {args.packs}; run bench/delta_bank.py --keep {args.packs} first")
    base = args.base or finetune_dir("trec", "base")
    model = AutoModelForSequenceClassification.from_pretrained(base).eval()
    with tempfile.TemporaryDirectory() as folder:
        banks = {args.against: bank_at(args.against, Path(folder)), "this tree": DeltaBank}
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in banks}
        for repeat in range(args.repeats):
            order = list(banks) if repeat % 2 == 0 else list(banks)[::-1]
            for name in order:
                warm, cold = cycle(banks[name], model, packs, args.rounds)
                times[name][0].append(statistics.median(warm))
                times[name][1].append(statistics.median(cold))
    print(f"{len(packs)} packs ({args.glob}) on {base}, 1 torch thread, {args.repeats} repeats\n")
    print("| bank | `activate`, back to back | after a forward pass |")
    print("|---|---:|---:|")
    old = [statistics.median(t) for t in times[args.against]]
    for name, (warm, cold) in times.items():
        w, c = statistics.median(warm), statistics.median(cold)
        print(f"| {name} | {w * 1e3:.2f} ms ({old[0] / w:.1f}×) | {c * 1e3:.2f} ms ({old[1] / c:.1f}×) |")


if __name__ == "__main__":
    main()
