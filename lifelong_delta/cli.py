"""Command-line entry points.

* ``lightning``: a LightningCLI (``fit``/``validate``/``test``/``predict``) with ``-c`` YAML configs and the omegaconf
  parser mode, so ``${...}`` interpolation works. Any LightningModule / LightningDataModule can be chosen by class path.
* ``lifelong-delta``: the project's own commands, one plain function per subcommand (see ``COMMANDS``).
"""

from __future__ import annotations

import sys


def lightning_main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` command."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        auto_configure_optimizers=False,
    )


def _normalise_flags(argv: list[str]) -> list[str]:
    """Accept ``--q-mode`` as well as ``--q_mode``: jsonargparse derives flags from snake_case parameter names."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            flag, sep, value = arg[2:].partition("=")
            arg = "--" + flag.replace("-", "_") + sep + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lifelong-delta`` command.

    Subcommands map to plain functions; jsonargparse builds their flags from the signatures. Errors in user input
    (``ValueError``, ``FileNotFoundError``, ``FileExistsError``) become a one-line ``error: ...`` and exit status 2.
    """
    from jsonargparse import CLI

    from lifelong_delta.continual.pretrain import pretrain
    from lifelong_delta.delta.commands import prune, recommend, stats

    commands = {"pretrain": pretrain, "prune": prune, "stats": stats, "recommend": recommend}
    args = _normalise_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        CLI(commands, args=args, as_positional=False)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
