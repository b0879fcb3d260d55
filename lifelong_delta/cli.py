"""Command-line entry points.

* ``lightning``: a LightningCLI (``fit``/``validate``/``test``/``predict``) with ``-c`` YAML configs and the omegaconf
  parser mode, so ``${...}`` interpolation works. Any LightningModule / LightningDataModule can be chosen by class path.
* ``lifelong-delta``: the project's own commands, one plain function per subcommand (see ``COMMANDS``).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from lifelong_delta.runner import (
    _one_line_parser_class,
    close_process_group,
    lightning_main,
    one_line_error,
    quiet_third_party,
)

__all__ = ["close_process_group", "lightning_main", "main", "one_line_error", "quiet_third_party"]


def _normalise_flags(argv: list[str], command: Callable[..., Any] | None = None) -> list[str]:
    """Make the flags of a subcommand read like a Unix tool's, then hand them to jsonargparse.

    * ``--q-mode`` is accepted as well as ``--q_mode`` (jsonargparse derives flags from snake_case parameter names);
    * a bare boolean flag (``--overwrite``) means ``--overwrite=true``;
    * a repeated list flag (``--exclude A --exclude B``) collects every value, not just the last, and so does one
      list flag followed by several values (``--models F1 F2``);
    * a parameter named after a Python keyword (``lambda_``) is also ``--lambda``.
    """
    bools: set[str] = set()
    lists: set[str] = set()
    params: set[str] = set()
    if command is not None:
        for name, param in inspect.signature(command).parameters.items():
            params.add(name)
            annotation = str(param.annotation)
            if annotation in ("bool", "<class 'bool'>"):
                bools.add(name)
            elif "list[" in annotation.lower() or "sequence[" in annotation.lower():
                lists.add(name)
    out: list[str] = []
    in_list: str | None = None  # the list flag whose values are being read
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            in_list = None
            flag, sep, value = arg[2:].partition("=")
            flag = flag.replace("-", "_")
            if flag not in params and f"{flag}_" in params:
                flag += "_"
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if flag in bools and not sep and (nxt is None or nxt.startswith("--")):
                sep, value = "=", "true"
            if flag in lists:
                in_list = None if sep else flag
                flag += "+"
            arg = "--" + flag + sep + value
        elif in_list is not None and out and not out[-1].startswith("--"):
            out.append(f"--{in_list}+")  # a further value of the same list flag
        out.append(arg)
    return out


# name -> ("module:function", the first line of its docstring). Only the chosen command's module is imported, so
# --help and argument errors of the pruning commands answer before torch is loaded.
COMMANDS: dict[str, tuple[str, str]] = {
    "prune": (
        "lifelong_delta.delta.commands:prune",
        "Prune the delta between a fine-tuned model and its base, and write the merged model to a new directory.",
    ),
    "pack": (
        "lifelong_delta.delta.commands:pack",
        "Prune like prune, but write only what the method keeps: a packed delta (safetensors + manifest).",
    ),
    "unpack": (
        "lifelong_delta.delta.commands:unpack",
        "Rebuild a pruned model from its base and a packed delta, bit for bit as prune writes it.",
    ),
    "stats": (
        "lifelong_delta.delta.commands:stats",
        "Per-tensor statistics of the delta δ = finetuned − base: mean, std, mean |δ|, max |δ|, ‖δ‖, ‖δ‖/‖θ_pre‖.",
    ),
    "recommend": (
        "lifelong_delta.delta.commands:recommend",
        "Recommend a delta-pruning method (DARE the Extreme's decision pipeline) and say why.",
    ),
    "merge": (
        "lifelong_delta.delta.merge_command:merge",
        "Merge fine-tunes of one base model (task arithmetic, TIES, DARE, DAREx-q) into a new model directory.",
    ),
    "pretrain": (
        "lifelong_delta.continual.pretrain:pretrain",
        "Pretrain a small timm ViT on all classes of dataset and cache it under <cache_dir>/<name>.",
    ),
    "probe": (
        "lifelong_delta.continual.probe:probe",
        "Frozen-feature probes of pretrained on a class-incremental split of dataset.",
    ),
    "cl-eval": (
        "lifelong_delta.studies.cl_eval:cl_eval",
        "Run every method × seed of a configs/cl_eval/<stream> study and write the table and plots.",
    ),
    "demo": (
        "lifelong_delta.studies.demo:demo",
        "Train the config's method, plain fine-tuning and FT++ on one stream; print and write their A_N and F_N.",
    ),
    "lifelong-eval": (
        "lifelong_delta.studies.lifelong_eval:lifelong_eval",
        "Lifelong deltas (LifelongDeltas) on the split-MNIST streams, next to the continual study's best method.",
    ),
    "finetune": (
        "lifelong_delta.text.finetune:all_finetunes",
        "Run every (task, recipe) fine-tune that is not cached, with a progress bar, and print a summary.",
    ),
    "prune-eval": (
        "lifelong_delta.studies.prune_eval:prune_eval",
        "Prune every cached fine-tune every way, evaluate test accuracy, and write a CSV, a summary and a plot.",
    ),
    "prune-eval-decoder": (
        "lifelong_delta.studies.prune_eval_decoder:prune_eval_decoder",
        "Pretrain a small Llama offline, fine-tune it two ways, prune every way, and write the "
        "held-out perplexities, a summary and a plot.",
    ),
    "merge-eval": (
        "lifelong_delta.studies.merge_eval:merge_eval",
        "Merge the tasks' fine-tunes every way, evaluate each task with its own head, and write a CSV, a "
        "summary and a plot.",
    ),
}


# Commands that hold nothing at exit (their files are closed and renamed into place when they return): they leave
# at once, skipping the second or so that tearing down torch's and numba's modules costs.
FAST_EXIT = ("prune", "pack", "unpack", "stats", "recommend", "merge")


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lifelong-delta COMMAND [options]   (lifelong-delta COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every ``finally`` and ``with`` cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lifelong-delta`` command.

    Subcommands map to plain functions; jsonargparse builds their flags from the signatures, importing only the
    chosen command's module. Errors in user input (``ValueError``, ``FileNotFoundError``, ``FileExistsError``)
    become a one-line ``error: ...`` and exit status 2. Ctrl-C, SIGTERM and SIGHUP print one line, let the
    command remove its temporary output, and exit with 128 + the signal number (130 for Ctrl-C).
    """
    import importlib
    import signal

    args = list(sys.argv[1:] if argv is None else argv)
    sub = next((a for a in args if not a.startswith("-")), None)
    if sub is None:
        if args and args[0] in ("-h", "--help"):
            print(_usage())
            return
        print(_usage(), file=sys.stderr)
        raise SystemExit(2)
    if sub not in COMMANDS:
        print(
            f"error: unknown command {sub!r}; choose one of {', '.join(COMMANDS)} (see: lifelong-delta --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    module, func = COMMANDS[sub][0].split(":")
    command = getattr(importlib.import_module(module), func)
    args = _normalise_flags(args, command)
    quiet_third_party()
    handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    from jsonargparse import CLI, ArgumentParser

    try:
        CLI(
            {sub: command},
            args=args,
            as_positional=False,
            allow_abbrev=False,
            parser_class=_one_line_parser_class(ArgumentParser),
        )
        if sub in FAST_EXIT and argv is None:  # a console-script run, not a call from Python
            _exit_now(0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Interrupted) as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(
            f"\nlifelong-delta {sub}: interrupted ({signal.Signals(signum).name}); its temporary files were "
            "removed and no output was moved into place",
            file=sys.stderr,
        )
        raise SystemExit(128 + signum) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
