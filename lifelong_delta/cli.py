"""Command-line entry points.

* ``lightning``: a LightningCLI (``fit``/``validate``/``test``/``predict``) with ``-c`` YAML configs and the omegaconf
  parser mode, so ``${...}`` interpolation works. Any LightningModule / LightningDataModule can be chosen by class path.
* ``lifelong-delta``: the project's own commands, one plain function per subcommand (see ``COMMANDS``).
"""

from __future__ import annotations

import inspect
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any


_DROPPED_ERROR_LINES = (
    "Subtypes:", "Errors:", "Given value type:", "Given value:", "Does not validate against any",
    "Expected a <class 'NoneType'>",
)


def one_line_error(message: str) -> str:
    """A jsonargparse error message in one line: nested lines joined, the Union bookkeeping dropped.

    ``Parser key "model": ... - Problem with given class_path 'X': Option 'foo' is not accepted`` becomes
    ``Parser key "model": Problem with given class_path 'X': Option 'foo' is not accepted``.
    """
    parts = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("- "):
            line = line[2:]
        if not line or line.startswith(_DROPPED_ERROR_LINES):
            continue
        parts.append(line.rstrip(":"))
    return ": ".join(parts) or message.strip()


def _lightning_parser_class() -> type:
    from lightning.pytorch.cli import LightningArgumentParser

    class OneLineErrorParser(LightningArgumentParser):
        """A LightningArgumentParser whose errors are one ``error: ...`` line (no usage dump), exit 2."""

        def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
            if not self.exit_on_error:
                super().error(message, ex)
            print(f"error: {one_line_error(message)} (see: {self.prog.replace(' [options]', '')} --help)",
                  file=sys.stderr, flush=True)
            self.exit(2)

    return OneLineErrorParser


def quiet_third_party() -> None:
    """Drop the third-party chatter that says nothing about the run, so our progress lines stay readable.

    Lightning's advertising tips (``💡 Tip: ... litlogger / litmodels``) and the pytree deprecation Lightning 2.6
    triggers in torch 2.14 on every step of a fit. Real warnings are untouched. Set
    ``LIFELONG_DELTA_VERBOSE=1`` to keep everything.
    """
    import logging
    import os
    import warnings

    if os.environ.get("LIFELONG_DELTA_VERBOSE"):
        return
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip")

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == "_NoTips" for f in logger.filters):  # idempotent
            logger.addFilter(_NoTips())


def lightning_main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` command.

    Configuration errors (unknown key, wrong type) are one ``error: ...`` line and exit status 2. Errors in
    user input found while running (``ValueError``, ``TypeError``, ``FileNotFoundError``: missing data or
    weights, a bad option value) are one ``error: ...`` line and exit status 1; set
    ``LIFELONG_DELTA_TRACEBACK=1`` to get the traceback instead.
    """
    import os

    from lightning.pytorch.cli import LightningCLI
    from omegaconf.errors import OmegaConfBaseException

    quiet_third_party()
    try:
        LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_lightning_parser_class(),
            parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
            auto_configure_optimizers=False,
        )
    except (ValueError, TypeError, FileNotFoundError, OmegaConfBaseException) as err:
        if os.environ.get("LIFELONG_DELTA_TRACEBACK"):
            raise
        msg = " ".join(one_line_error(str(err)).split())
        print(f"error: {msg} ({type(err).__name__}; LIFELONG_DELTA_TRACEBACK=1 shows the traceback)",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy torch.distributed's default process group if one is up.

    Lightning's DDP strategy leaves it alive after ``fit``; a gloo group still alive at interpreter exit can abort
    the process ("terminate called without an active exception", exit status -6) after all work is done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _normalise_flags(argv: list[str], command: Callable[..., Any] | None = None) -> list[str]:
    """Make the flags of a subcommand read like a Unix tool's, then hand them to jsonargparse.

    * ``--q-mode`` is accepted as well as ``--q_mode`` (jsonargparse derives flags from snake_case parameter names);
    * a bare boolean flag (``--overwrite``) means ``--overwrite=true``;
    * a repeated list flag (``--exclude A --exclude B``) collects every value, not just the last.
    """
    bools: set[str] = set()
    lists: set[str] = set()
    if command is not None:
        for name, param in inspect.signature(command).parameters.items():
            annotation = str(param.annotation)
            if annotation in ("bool", "<class 'bool'>"):
                bools.add(name)
            elif "list[" in annotation.lower() or "sequence[" in annotation.lower():
                lists.add(name)
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            flag, sep, value = arg[2:].partition("=")
            flag = flag.replace("-", "_")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if flag in bools and not sep and (nxt is None or nxt.startswith("--")):
                sep, value = "=", "true"
            if flag in lists:
                flag += "+"
            arg = "--" + flag + sep + value
        out.append(arg)
    return out


def repro_command(
    program: str, func: Callable[..., Any], given: dict[str, Any], skip: tuple[str, ...] = (), default: str = ""
) -> str:
    """The command line that repeats a call of ``func`` as ``program``, for a study's summary.

    Only the options in ``given`` that differ from ``func``'s signature defaults appear (``skip`` names options
    that do not change results, e.g. ``progress``); lists are one JSON value, which also carries items that
    start with ``--``. With nothing to pass, ``default`` (e.g. ``make cl-eval``) is returned if given.
    """
    def norm(value: Any) -> Any:  # a tuple default equals the list the CLI passes
        return list(value) if isinstance(value, tuple) else value

    defaults = {k: p.default for k, p in inspect.signature(func).parameters.items()}
    parts = [program]
    for key, value in given.items():
        if key in skip or norm(value) == norm(defaults[key]):
            continue
        if isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        else:
            text = "null" if value is None else str(value)
        parts.append(f"--{key.replace('_', '-')} {shlex.quote(text)}")
    return default if default and len(parts) == 1 else " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lifelong-delta`` command.

    Subcommands map to plain functions; jsonargparse builds their flags from the signatures. Errors in user input
    (``ValueError``, ``FileNotFoundError``, ``FileExistsError``) become a one-line ``error: ...`` and exit status 2.
    """
    from jsonargparse import CLI

    from lifelong_delta.continual.cl_eval import cl_eval
    from lifelong_delta.continual.pretrain import pretrain
    from lifelong_delta.continual.probe import probe
    from lifelong_delta.delta.commands import prune, recommend, stats
    from lifelong_delta.text.finetune import all_finetunes
    from lifelong_delta.text.prune_eval import prune_eval

    commands = {
        "pretrain": pretrain,
        "prune": prune,
        "stats": stats,
        "recommend": recommend,
        "finetune": all_finetunes,
        "prune-eval": prune_eval,
        "cl-eval": cl_eval,
        "probe": probe,
    }
    quiet_third_party()
    args = list(sys.argv[1:] if argv is None else argv)
    sub = next((a for a in args if not a.startswith("-")), None)
    args = _normalise_flags(args, commands.get(sub))
    try:
        CLI(commands, args=args, as_positional=False, allow_abbrev=False)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
