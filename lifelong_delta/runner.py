"""Running Lightning from YAML configs, as the ``lightning`` command does, and the one-line errors of every command.

The ``lightning`` entry point (:func:`lightning_main`) and the studies that run ``lightning fit`` in-process
(``make cl-eval``, ``make lifelong-eval``) share this module, so a study parses its configs and reports errors as the
command does without importing the command-line module (``lifelong_delta.cli``), which lists the studies.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

_DROPPED_ERROR_LINES = (
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Does not validate against any",
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


def _plain_error(message: str) -> str:
    """:func:`one_line_error`, with jsonargparse's type talk in words: ``Parser key "p": Expected a <class 'float'>.
    Got value: x`` becomes ``--p: expected a float, got 'x'``."""
    given = re.search(r"(?:Given value|Got value): (.*)", message)
    text = " ".join(one_line_error(re.sub(r"\.? ?Got value: .*", "", message)).split())
    text = re.sub(r'Parser key "([\w.]+)"', lambda m: "--" + m[1].split(".")[-1], text)
    text = re.sub(r"Expected a <class '(\w+)'>\.?", lambda m: f"expected {_article(m[1])} {m[1]}", text)
    text = re.sub(r"Expected a typing\.Literal\[(.*?)\]\.?", lambda m: "expected one of " + m[1].replace("'", ""), text)
    if "arguments are required:" in text:  # "prune.base, prune.out" -> "--base, --out"
        head, _, names = text.partition("required:")
        text = head + "required: " + ", ".join("--" + n.strip().split(".")[-1] for n in names.split(","))
    return text + (f", got '{given[1].strip()}'" if given else "")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _error_exit(parser: Any, message: str) -> None:
    print(
        f"error: {_plain_error(message)} (see: {parser.prog.replace(' [options]', '')} --help)",
        file=sys.stderr,
        flush=True,
    )
    parser.exit(2)


def _one_line_parser_class(base: type) -> type:
    """``base`` (a jsonargparse parser class) whose errors are one ``error: ...`` line (no usage dump), exit 2."""

    class OneLineErrorParser(base):  # type: ignore[misc, valid-type]
        def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
            if not self.exit_on_error:
                super().error(message, ex)
            _error_exit(self, message)

    return OneLineErrorParser


def _lightning_parser_class() -> type:
    from lightning.pytorch.cli import LightningArgumentParser

    return _one_line_parser_class(LightningArgumentParser)


def quiet_third_party() -> None:
    """Drop the third-party chatter that says nothing about the run, so our progress lines stay readable.

    Lightning's advertising tips (``💡 Tip: ... litlogger / litmodels``) and the pytree deprecation Lightning 2.6
    triggers in torch 2.14 on every step of a fit. Real warnings are untouched. Set
    ``LIFELONG_DELTA_VERBOSE=1`` to keep everything.
    """
    import logging
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
    from lightning.pytorch.cli import LightningCLI
    from omegaconf.errors import OmegaConfBaseException

    from lifelong_delta.callbacks.progress_lines import ProgressLines
    from lifelong_delta.progress import is_terminal

    quiet_third_party()
    try:
        LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=_lightning_parser_class(),
            parser_kwargs={"parser_mode": "omegaconf"},
            args=args,
            auto_configure_optimizers=False,
            # a log or pipe gets a progress line every few seconds instead of a redrawn bar
            trainer_defaults={"callbacks": [ProgressLines()], "enable_progress_bar": is_terminal()},
        )
    except (ValueError, TypeError, FileNotFoundError, OmegaConfBaseException) as err:
        if os.environ.get("LIFELONG_DELTA_TRACEBACK"):
            raise
        msg = " ".join(one_line_error(str(err)).split())
        print(
            f"error: {msg} ({type(err).__name__}; LIFELONG_DELTA_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
            flush=True,
        )
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


def fit_run(
    configs: Sequence[str | os.PathLike[str]],
    overrides: Sequence[str],
    *,
    seed: int,
    save_dir: str | os.PathLike[str],
    name: str,
    version: str,
) -> None:
    """One ``lightning fit`` of a study, in this process, as the ``lightning`` command runs it.

    Args:
        configs: YAML files, in order (later ones override earlier ones).
        overrides: More ``lightning fit`` arguments, after the configs.
        seed: Sets ``seed_everything`` and a ``ClassIncrementalDataModule``'s class order and data split.
        save_dir, name, version: Where the run's logger writes: ``save_dir/name/version``.
    """
    args = [
        "fit",
        *(a for c in configs for a in ("-c", str(c))),
        *overrides,
        f"--seed_everything={seed}",
        f"--data.init_args.class_order_seed={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version={version}",
    ]
    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI reads sys.argv too and warns when both are given
    try:
        lightning_main(args)
    finally:
        sys.argv = argv
        # the CLI, trainer and module refer to each other: free the run's model and optimiser state now, so that a
        # study's loop of runs holds one at a time
        gc.collect()
