"""The ``lifelong-delta prune | stats | recommend`` subcommands: plain typed functions over :mod:`lifelong_delta.delta`.

jsonargparse builds the CLI from these signatures (``lifelong_delta.cli.main``). Importing this module loads no
torch: each command first checks its options, that its inputs exist and that its output touches none of them
(:mod:`lifelong_delta.outputs`), says what it is about to do, and only then imports the heavy modules. A bad option
or path is a ``ValueError`` (or a subclass) with a one-line message naming what to fix, raised before anything is
read or written. Calibration-based choices (DAREx-q's ``q_mode`` and WANDA's input norms) load the fine-tuned model
from exactly the tensors that are pruned, compute q or the norms in memory, and then prune by streaming like every
other method.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from lifelong_delta import outputs
from lifelong_delta.delta.choices import Arithmetic, LoraPrune, QMode, RescaleName, resolve_q
from lifelong_delta.delta.methods import METHODS, RESCALE_TEXT, Method, PruneSpec, q_alternatives

# Types for readers and type checkers only (mypy honours the MYPY constant). Not a typing.TYPE_CHECKING block:
# jsonargparse executes those when it builds a parser, which would import torch before --help answers.
MYPY = False
if MYPY:
    import torch
    from rich.console import Console

    from lifelong_delta.delta.matching import TensorMatch
    from lifelong_delta.delta.recommend import Recommendation
    from lifelong_delta.delta.stats import DeltaStats
    from lifelong_delta.delta.summary import PruneSummary

__all__ = ["pack", "prune", "recommend", "stats", "unpack"]


def _patterns(exclude: list[str] | str | None) -> tuple[str, ...]:
    """``--exclude`` as a tuple of globs (one pattern given as a plain string is accepted)."""
    if exclude is None:
        return ()
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)


def _console() -> Console:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def prune(
    base: str,
    finetuned: str,
    out: str,
    method: str = "dare",
    p: float = 0.9,
    q: float | None = None,
    q_mode: QMode | None = None,
    eta: float = 0.37,
    analytic_arithmetic: Arithmetic = "float16",
    analytic_tie_rtol: float = 0.0,
    rescale: RescaleName | None = None,
    structural_axis: Literal["rows", "columns"] = "rows",
    structural_select: Literal["random", "importance"] = "random",
    lora_prune: LoraPrune = "product",
    exclude: list[str] | str | None = None,
    seed: int = 0,
    out_shard_size: str = "2GB",
    overwrite: bool = False,
    force: bool = False,
    calib_data: str | None = None,
    calib_samples: int = 128,
    batch_size: int = 16,
    max_length: int = 128,
    calib_sequential: bool = False,
    progress: bool = True,
) -> PruneSummary:
    """Prune the delta between a fine-tuned model and its base, and write the merged model to a new directory.

    Args:
        base: Pretrained model: an HF directory with safetensors weights, one .safetensors file, or a Hub id
            org/name[@revision] (from the local Hugging Face cache; downloaded first when online).
        finetuned: Fine-tuned model of the same architecture (path or Hub id), or a PEFT LoRA adapter directory
            (adapter_config.json + adapter_model.safetensors): its delta scaling·B·A is pruned and merged into
            --base, and the output is a full checkpoint. With --q_mode or --method wanda the adapter is first
            merged unpruned into a temporary checkpoint next to --out (the calibration needs the fine-tuned model
            loaded).
        out: Output directory (must not exist unless --overwrite).
        method: dare | darex-q | magnitude | wanda | structural, or a method added with
            lifelong_delta.delta.methods.register_method.
        p: Drop rate in [0, 1).
        q: DAREx-q rescale: kept entries are multiplied by 1/q, with 1-p <= q <= 1 unless --force
            (darex-q, magnitude, wanda, structural).
        q_mode: Choose q from data instead: grid (labelled validation accuracy), unlabelled (last-layer output
            change), both for darex-q, magnitude, wanda and structural; or analytic (per layer, from calibration
            activations; darex-q only).
        eta: The free parameter of the analytic q's bound (--q_mode analytic).
        analytic_arithmetic: float16 (the authors' code: float16 rounding ends a row's q scan near 1-p unless the
            bound moves by more than float16 resolves) | float64 (the exact bound; on small deltas it drives q to
            about 0.5 whatever p is). --q_mode analytic only.
        analytic_tie_rtol: Relative tolerance under which two values of the bound tie in the q scan (0: exact
            comparisons; 5e-4 in float64 behaves like float16). --q_mode analytic only.
        rescale: none | dare | q (default per method; --q or --q_mode imply q).
        structural_axis: rows | columns (structural only).
        structural_select: random | importance (structural only).
        lora_prune: product (prune the LoRA delta B·A) | factors (prune A and B, then merge); LoRA adapters only.
        exclude: Glob patterns of tensors to copy unchanged, e.g. 'classifier.*'.
        seed: Mask seed.
        out_shard_size: Output shard size, e.g. 2GB or 500MB.
        overwrite: Replace an existing --out.
        force: Allow q outside [1-p, 1].
        calib_data: CSV/TSV/JSONL file with a 'text' column (and 'label' for --q_mode grid); needed by q_mode
            and wanda.
        calib_samples: Rows of calib_data to use.
        batch_size: Calibration batch size.
        max_length: Calibration token length.
        calib_sequential: Measure WANDA's input norms or the analytic q's mean inputs block by block, as WANDA's
            reference code does: block i's inputs go through blocks 0..i-1 already pruned (each block runs twice,
            fine-tuned to measure it, then pruned to feed the next). Default: one pass of the fine-tuned model.
            --method wanda and --method darex-q --q_mode analytic only (grid and unlabelled q score whole pruned
            models already).
        progress: Show a progress bar.
    """
    return _checked(locals(), "prune")


def pack(
    base: str,
    finetuned: str,
    out: str,
    method: str = "dare",
    p: float = 0.9,
    q: float | None = None,
    q_mode: QMode | None = None,
    eta: float = 0.37,
    analytic_arithmetic: Arithmetic = "float16",
    analytic_tie_rtol: float = 0.0,
    rescale: RescaleName | None = None,
    structural_axis: Literal["rows", "columns"] = "rows",
    structural_select: Literal["random", "importance"] = "random",
    exclude: list[str] | str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    force: bool = False,
    calib_data: str | None = None,
    calib_samples: int = 128,
    batch_size: int = 16,
    max_length: int = 128,
    calib_sequential: bool = False,
    progress: bool = True,
) -> PruneSummary:
    """Prune like prune, but write only what the method keeps: a packed delta directory (safetensors + manifest).

    A seeded random mask (dare, darex-q) is not stored: it is regenerated from (seed, name, index), so the pack
    holds only the kept values. Other methods store the kept entries' indices compactly. `lifelong-delta unpack`
    rebuilds prune's output from the base and the pack, bit for bit; the base's fingerprint in the manifest makes a
    wrong base a clear error.

    Args:
        base: Pretrained model: an HF directory with safetensors weights, one .safetensors file, or a Hub id.
        finetuned: Fine-tuned model of the same architecture (path or Hub id), or a PEFT LoRA adapter directory
            (its pruned product scaling·B·A is packed).
        out: The pack directory to write, e.g. trec.delta (must not exist unless --overwrite).
        method: dare | darex-q | magnitude | wanda | structural, or a method added with
            lifelong_delta.delta.methods.register_method.
        p: Drop rate in [0, 1).
        q: DAREx-q rescale (kept entries ×1/q), 1-p <= q <= 1 unless --force.
        q_mode: Choose q from data: grid | unlabelled | analytic (see prune --help).
        eta: The analytic q bound's free parameter (--q_mode analytic).
        analytic_arithmetic: float16 | float64 (--q_mode analytic).
        analytic_tie_rtol: Relative tie tolerance of the analytic q scan.
        rescale: none | dare | q (default per method).
        structural_axis: rows | columns (structural only).
        structural_select: random | importance (structural only).
        exclude: Glob patterns of tensors kept whole, e.g. 'classifier.*' (a task head travels with its delta).
        seed: Mask seed.
        overwrite: Replace an existing --out that lifelong-delta wrote.
        force: Allow q outside [1-p, 1].
        calib_data: CSV/TSV/JSONL file with a 'text' column (and 'label' for --q_mode grid).
        calib_samples: Rows of calib_data to use.
        batch_size: Calibration batch size.
        max_length: Calibration token length.
        calib_sequential: Measure the statistics through the already-pruned blocks (see prune --help).
        progress: Show a progress bar.
    """
    return _checked({**locals(), "lora_prune": "product", "out_shard_size": "2GB"}, "pack")


def unpack(
    base: str,
    delta: str,
    out: str,
    out_shard_size: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Rebuild a pruned model from its base and a packed delta: the same files prune writes, bit for bit.

    Args:
        base: The pretrained model the delta was packed against (HF directory, .safetensors file, or Hub id).
        delta: A packed delta directory written by lifelong-delta pack.
        out: Output directory (must not exist unless --overwrite).
        out_shard_size: Output shard size, e.g. 2GB or 500MB (prune's default gives prune's files).
        overwrite: Replace an existing --out that lifelong-delta wrote.
        progress: Show a progress bar.
    """
    from lifelong_delta.delta.io import parse_size
    from lifelong_delta.delta.pack_format import read_manifest

    _check_inputs(delta=delta)
    read_manifest(delta)
    parse_size(out_shard_size)
    outputs.check_output_dir(
        out, overwrite=overwrite, inputs={k: v for k, v in (("--base", base), ("--delta", delta)) if os.path.exists(v)}
    )
    from lifelong_delta.delta.hub import resolve_checkpoint

    base = resolve_checkpoint(base, option="--base")
    _say(f"unpack: {delta} onto {base} -> {out}")
    from lifelong_delta.delta.unpack import stream_unpack

    result = stream_unpack(base, delta, out, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress)
    _console().print(f"unpacked {delta} onto {base} -> {result}", highlight=False)
    return result


def _checked(args: dict, command: Literal["prune", "pack"]) -> PruneSummary:
    """Check the options of ``prune`` or ``pack`` and that no output touches an input, then run the command."""
    a = dict(args)
    base, finetuned, out, method, p, q, q_mode = (
        a[k] for k in ("base", "finetuned", "out", "method", "p", "q", "q_mode")
    )
    rescale, force, eta, analytic_tie_rtol, calib_data, overwrite, seed = (
        a[k] for k in ("rescale", "force", "eta", "analytic_tie_rtol", "calib_data", "overwrite", "seed")
    )
    calib_samples, batch_size, max_length = a["calib_samples"], a["batch_size"], a["max_length"]
    row = _method_row(method)
    if q is not None and q_mode is not None:
        raise ValueError("pass either --q or --q_mode, not both")
    if q_mode is not None and not row.takes_q:
        raise ValueError(
            f"--q_mode chooses the rescale 1/q, but --method {method} always rescales by "
            f"{RESCALE_TEXT[row.default_rescale]}; use --method {' or '.join(q_alternatives(method))}"
        )
    if q_mode == "analytic" and not row.random_mask:
        analytic = " or ".join(m for m, r in METHODS.items() if r.random_mask and r.takes_q)
        raise ValueError(
            f"--q_mode analytic assumes DARE's independent random mask; use it with --method {analytic} "
            f"(got --method {method}), or --q_mode grid/unlabelled"
        )
    if a["calib_sequential"]:
        _check_sequential(method, row, q_mode)
    if q_mode is not None and rescale not in (None, "q"):
        raise ValueError(f"--q_mode chooses q for --rescale q, but --rescale is {rescale}; drop --rescale")
    if (rescale or row.default_rescale) == "q" and row.needs_q and q is None and q_mode is None:
        modes = "grid,analytic,unlabelled" if row.random_mask else "grid,unlabelled"
        if row.rescales == ("q",):
            raise ValueError(f"--method {method} needs --q Q (1-p <= Q <= 1) or --q_mode {{{modes}}}")
        raise ValueError(f"--method {method} with --rescale q needs q: pass --q Q or --q_mode")
    resolve_q(p, q, force=force)
    if not eta > 0:
        raise ValueError(f"--eta must be > 0, got {eta}")
    if not 0 <= analytic_tie_rtol < 1:
        raise ValueError(f"--analytic_tie_rtol must be in [0, 1), got {analytic_tie_rtol}")
    for option, value in (("calib_samples", calib_samples), ("batch_size", batch_size), ("max_length", max_length)):
        if value < 1:
            raise ValueError(f"--{option} must be >= 1, got {value}")
    if q_mode is not None and calib_data is None:
        raise ValueError(f"--q_mode {q_mode} needs --calib_data FILE (CSV/TSV/JSONL with a 'text' column)")
    _check_inputs(calib_data=calib_data)
    given = {"--base": base, "--finetuned": finetuned, "--calib_data": calib_data}
    outputs.check_output_dir(
        out,
        overwrite=overwrite,  # before a hub id is downloaded
        inputs={k: v for k, v in given.items() if v is not None and os.path.exists(v)},
    )
    base, finetuned = _checkpoints(base, finetuned)
    inputs = {"--base": base, "--finetuned": finetuned, "--calib_data": calib_data}
    outputs.check_output_dir(out, overwrite=overwrite, inputs=inputs)
    _say(
        f"{command}: {method} p={p:g}{f' q={q:g}' if q is not None else ''}"
        f"{f' q_mode={q_mode}' if q_mode else ''}{' calib_sequential' if a['calib_sequential'] else ''} seed={seed} "
        f"of {finetuned} against {base} -> {out}"
    )
    return _prune({**a, "base": base, "finetuned": finetuned, "command": command})


def _check_sequential(method: str, row: Method, q_mode: str | None) -> None:
    """``--calib_sequential`` applies to the statistics-driven choices: WANDA's norms and the analytic q."""
    if not (row.needs_input_norms or q_mode == "analytic"):
        norms = " or ".join(f"--method {m}" for m, r in METHODS.items() if r.needs_input_norms)
        analytic = " or ".join(f"--method {m}" for m, r in METHODS.items() if r.random_mask and r.takes_q)
        got = f"--method {method}" + (f" --q_mode {q_mode}" if q_mode else "")
        raise ValueError(
            f"--calib_sequential measures input statistics through the pruned blocks, which {norms} and "
            f"{analytic} --q_mode analytic use; {got} uses none, so drop --calib_sequential"
        )
    if q_mode in ("grid", "unlabelled"):
        raise ValueError(
            f"--calib_sequential runs each block pruned, but --q_mode {q_mode} chooses q after every mask is "
            "known; pass --q Q (or no q) instead of --q_mode, or drop --calib_sequential"
        )


def _method_row(method: str) -> Method:
    """The registry row of ``--method`` (a one-line error listing the methods otherwise)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"--method: expected one of {', '.join(METHODS)}, got {method!r} (a method of your own: "
            "lifelong_delta.delta.methods.register_method)"
        )
    return METHODS[method]


def _say(line: str) -> None:
    """One status line on stderr, at once (before the heavy imports of a command)."""
    print(line, file=sys.stderr, flush=True)


def _checkpoints(base: str, finetuned: str) -> tuple[str, str]:
    """``--base`` and ``--finetuned`` as local paths: as given, or the cached snapshot of a hub id
    (:mod:`lifelong_delta.delta.hub`); a one-line error when neither."""
    from lifelong_delta.delta.hub import resolve_checkpoint

    return resolve_checkpoint(base, option="--base"), resolve_checkpoint(finetuned, option="--finetuned")


def _check_inputs(**paths: str | None) -> None:
    """Each given input path exists (a one-line error naming the option otherwise)."""
    for option, path in paths.items():
        if path is not None and not os.path.exists(path):
            raise ValueError(f"--{option} {path}: not found")
    calib = paths.get("calib_data")
    if calib is not None and not os.path.isfile(calib):
        raise ValueError(f"--calib_data {calib}: not a file (CSV/TSV/JSONL with a 'text' column)")


def _prune(args: dict) -> PruneSummary:
    """The work of :func:`prune` once its options and paths are checked."""
    from lifelong_delta.delta.io import CheckpointReader, is_adapter_dir
    from lifelong_delta.delta.matching import match_tensors
    from lifelong_delta.delta.streaming import stream_prune

    a = args
    base, finetuned, out, method = a["base"], a["finetuned"], a["out"], a["method"]
    spec = PruneSpec(
        method=method,
        p=a["p"],
        q=a["q"],
        rescale="q" if a["q_mode"] else a["rescale"],
        structural_axis=a["structural_axis"],
        structural_select=a["structural_select"],
        seed=a["seed"],
        exclude=_patterns(a["exclude"]),
        force=a["force"],
    )
    q_mode = a["q_mode"]
    calibrating = q_mode is not None or METHODS[method].needs_input_norms
    what = f"--q_mode {q_mode}" if q_mode else f"--method {method}"
    if calibrating and a["calib_data"] is None:
        raise ValueError(f"{what} needs --calib_data FILE (CSV/TSV/JSONL with a 'text' column)")
    if calibrating and a["lora_prune"] != "product" and is_adapter_dir(finetuned):
        raise ValueError(
            f"{what} calibrates the merged model, so it prunes the LoRA product B·A; drop --lora_prune factors"
        )
    if is_adapter_dir(finetuned):
        if calibrating:
            return _prune_adapter_via_merge(base, finetuned, out, a)
        from lifelong_delta.delta.lora_merge import stream_prune_lora

        summary = stream_prune_lora(
            base,
            finetuned,
            out,
            spec,
            lora_prune=a["lora_prune"],
            overwrite=a["overwrite"],
            out_shard_size=a["out_shard_size"],
            progress=a["progress"],
            pack=a["command"] == "pack",
        )
        _report(summary, a, base)
        return summary
    if a["lora_prune"] != "product":
        raise ValueError(
            f"--lora_prune {a['lora_prune']} needs a PEFT adapter directory as --finetuned "
            "(adapter_config.json + adapter_model.safetensors)"
        )
    with CheckpointReader(base) as rb, CheckpointReader(finetuned) as rf:
        match = match_tensors(rb, rf, spec.exclude)  # fail on mismatches before loading any model
    if match.prefix is not None:
        _console().print(match.describe(), highlight=False, soft_wrap=True)

    input_norms = q_per_tensor = None
    if calibrating:
        spec, input_norms, q_per_tensor = _calibrate(spec, a, match)

    if a["command"] == "pack":
        from lifelong_delta.delta.pack import stream_pack

        summary = stream_pack(
            base,
            finetuned,
            out,
            spec,
            overwrite=a["overwrite"],
            progress=a["progress"],
            input_norms=input_norms,
            q_per_tensor=q_per_tensor,
        )
    else:
        summary = stream_prune(
            base,
            finetuned,
            out,
            spec,
            overwrite=a["overwrite"],
            out_shard_size=a["out_shard_size"],
            progress=a["progress"],
            input_norms=input_norms,
            q_per_tensor=q_per_tensor,
        )
    _report(summary, a, finetuned)
    return summary


def _calibrate(
    spec: PruneSpec, args: dict, match: TensorMatch
) -> tuple[PruneSpec, dict[str, torch.Tensor] | None, dict[str, float] | None]:
    """Run the fine-tuned model on ``--calib_data`` for what ``spec`` and ``--q_mode`` need.

    With ``--calib_sequential`` WANDA's norms and the analytic q's means are measured block by block through the
    already-pruned blocks (:class:`~lifelong_delta.delta.calibration.SequentialPrune`).

    Returns:
        ``spec`` (with the chosen q for ``--q_mode grid`` / ``unlabelled``), WANDA's input norms of the pruned
        tensors (None unless the method needs them) and the per-tensor q of ``--q_mode analytic`` (else None).
    """
    from dataclasses import replace

    from lifelong_delta.delta import calibration as cal
    from lifelong_delta.delta.io import CheckpointReader
    from lifelong_delta.delta.layered import free_large_allocations

    a, q_mode, pruned = args, args["q_mode"], match.pruned
    input_norms = q_per_tensor = None
    free_large_allocations()
    with (
        cal.load(
            a["finetuned"],
            a["calib_data"],
            need_labels=q_mode == "grid",
            samples=a["calib_samples"],
            batch_size=a["batch_size"],
            max_length=a["max_length"],
        ) as calib,
        CheckpointReader(a["base"]) as rb,
    ):
        sequential = cal.SequentialPrune(spec, rb, match.base_names) if a["calib_sequential"] else None
        if METHODS[spec.method].needs_input_norms:
            input_norms = calib.input_norms(pruned, sequential)
        if q_mode is not None:
            pruning = calib.pruning(spec, rb, match.base_names, input_norms)
            if q_mode == "analytic":
                q_per_tensor = calib.analytic_q(
                    pruning,
                    pruned,
                    eta=a["eta"],
                    arithmetic=a["analytic_arithmetic"],
                    tie_rtol=a["analytic_tie_rtol"],
                    sequential=sequential,
                )
            else:
                result = calib.grid_q(pruning, pruned) if q_mode == "grid" else calib.unlabelled_q(pruning, pruned)
                _console().print(
                    f"chose q = {result.q:.4f} ({q_mode}); candidates: "
                    + ", ".join(f"{c:.4f}→{v:.4g}" for c, v in result.table)
                )
                spec = replace(spec, q=result.q)
    return spec, input_norms, q_per_tensor


def _report(summary: PruneSummary, args: dict, dense: str) -> None:
    """The prune's table; for a pack also its size against the dense tensors of ``dense``."""
    _console().print(summary.table())
    if args["command"] == "pack":
        from lifelong_delta.delta.pack_format import pack_size, read_manifest

        full, size = read_manifest(args["out"]).finetuned_bytes, pack_size(args["out"])
        _console().print(
            f"packed {size / 2**20:.2f} MiB = {size / max(full, 1):.2%} of the "
            f"{full / 2**20:.1f} MiB of tensors of {dense} -> {args['out']}",
            highlight=False,
        )


@contextmanager
def _merged(base: str, finetuned: str, *, near: Path, progress: bool = False) -> Iterator[str]:
    """``finetuned`` itself, or for a PEFT LoRA adapter a temporary full checkpoint ``base + scaling·B·A``
    (unpruned; in a temporary folder of this tool in ``near``), deleted on exit."""
    from lifelong_delta.delta.io import is_adapter_dir
    from lifelong_delta.delta.lora_merge import stream_prune_lora

    if not is_adapter_dir(finetuned):
        yield finetuned
        return
    tmp = outputs.make_temp_dir(near, ".lora-merge-")
    try:
        merged = tmp / "merged"
        stream_prune_lora(base, finetuned, merged, PruneSpec(method="dare", p=0.0), progress=progress)
        yield str(merged)
    finally:
        outputs.remove_temp_dir(tmp)


def _prune_adapter_via_merge(base: str, adapter: str, out: str, args: dict) -> PruneSummary:
    """``prune`` of a LoRA adapter with calibration (``--q_mode`` or WANDA): merge ``base + scaling·B·A`` unpruned
    into a temporary full checkpoint next to ``out``, prune that like a full fine-tune, then delete it.

    The calibration needs the fine-tuned model loaded, which is the merged one. The pruned delta is the product
    ``B·A`` (``--lora_prune product``), rounded once to the base's dtype by the merge, as a merged PEFT model is.
    """
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with _merged(base, adapter, near=parent, progress=args["progress"]) as merged:
        return _prune({**args, "finetuned": merged})


def stats(
    base: str,
    finetuned: str,
    exclude: list[str] | str | None = None,
    png: str | None = None,
    top: int | None = None,
    progress: bool = True,
) -> DeltaStats:
    """Per-tensor statistics of the delta δ = finetuned − base: mean, std, mean |δ|, max |δ|, ‖δ‖, ‖δ‖/‖θ_pre‖.

    Args:
        base: Pretrained model (HF directory, .safetensors file, or Hub id org/name[@revision]).
        finetuned: Fine-tuned model (path or Hub id), or a PEFT LoRA adapter directory (merged into a temporary
            checkpoint first: its delta is scaling·B·A, and zero for the tensors it does not adapt).
        exclude: Glob patterns of tensors to skip.
        png: Also save a plot of the per-tensor statistics to this PNG file.
        top: Only list the TOP tensors with the largest ‖δ‖/‖θ_pre‖ (the pooled row covers all).
        progress: Show a progress bar.
    """
    if top is not None and top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    base, finetuned = _checkpoints(base, finetuned)
    if png is not None:
        outputs.check_output_file(png, option="--png", inputs={"--base": base, "--finetuned": finetuned})
    _say(f"stats: delta of {finetuned} against {base}")
    from lifelong_delta.delta.streaming import stream_delta_stats

    with _merged(base, finetuned, near=Path(tempfile.gettempdir()), progress=progress) as merged:
        result = stream_delta_stats(base, merged, _patterns(exclude), progress=progress)
    console = _console()
    console.print(result.table(top=top))
    if png is not None:
        _plot(result, Path(png))
        console.print(f"plot written to {png}")
    return result


def recommend(
    base: str,
    finetuned: str,
    target_p: float = 0.9,
    has_labelled_data: bool = False,
    has_unlabelled_data: bool = False,
    can_refinetune: bool = True,
    exclude: list[str] | str | None = None,
    progress: bool = True,
) -> Recommendation:
    """Recommend a delta-pruning method (DARE the Extreme's decision pipeline) and say why.

    Args:
        base: Pretrained model (HF directory, .safetensors file, or Hub id org/name[@revision]).
        finetuned: Fine-tuned model (path or Hub id), or a PEFT LoRA adapter directory (its delta B·A is low-rank,
            which rules out importance pruning).
        target_p: Drop rate you want, in [0, 1).
        has_labelled_data: You have a labelled validation set.
        has_unlabelled_data: You have unlabelled inputs (a batch is enough).
        can_refinetune: You can fine-tune the model again (with AdamR).
        exclude: Glob patterns of tensors to leave out of the statistics (e.g. the classifier head).
        progress: Show a progress bar.
    """
    if not 0.0 <= target_p < 1.0:
        raise ValueError(f"--target_p must be in [0, 1), got {target_p}")
    base, finetuned = _checkpoints(base, finetuned)
    _say(f"recommend: reading the delta of {finetuned} against {base}")
    from lifelong_delta.delta.io import is_adapter_dir
    from lifelong_delta.delta.recommend import recommend as choose_method
    from lifelong_delta.delta.streaming import stream_delta_stats

    with _merged(base, finetuned, near=Path(tempfile.gettempdir()), progress=progress) as merged:
        result = stream_delta_stats(base, merged, _patterns(exclude), progress=progress)
    rec = choose_method(
        result,
        target_p=target_p,
        has_labelled_data=has_labelled_data,
        has_unlabelled_data=has_unlabelled_data,
        can_refinetune=can_refinetune,
        low_rank=is_adapter_dir(finetuned),
    )
    console = _console()
    console.print(f"[bold]recommendation:[/bold] {rec.label}")
    console.print(f"[bold]why:[/bold] {rec.reason}", highlight=False)
    if rec.alternatives:
        console.print("alternatives: " + ", ".join(rec.alternatives))
    console.print("numbers: " + ", ".join(f"{k}={v:.4g}" for k, v in rec.numbers.items()), highlight=False)
    if rec.method != "refinetune-adamr":
        cmd = f"lifelong-delta prune --base {base} --finetuned {finetuned} --method {rec.method} --p {target_p:g}"
        if rec.q_mode or (rec.method in METHODS and METHODS[rec.method].needs_input_norms):
            cmd += (f" --q_mode {rec.q_mode}" if rec.q_mode else "") + " --calib_data FILE"
        console.print(f"command: {cmd} --out OUT", highlight=False, soft_wrap=True)
    return rec


def _plot(result: DeltaStats, png: Path) -> None:
    """Per-tensor mean |δ|, std δ and ‖δ‖/‖θ_pre‖ on a log scale; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.layers
    x = range(len(layers))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(layers) * 0.12), 7), sharex=True)
    axes[0].semilogy(x, [max(s.mean_abs, 1e-30) for s in layers], ".-", label="mean |δ|")
    axes[0].semilogy(x, [max(s.std, 1e-30) for s in layers], ".-", label="std δ")
    axes[0].semilogy(x, [max(abs(s.mean), 1e-30) for s in layers], ".", label="|mean δ|")
    axes[0].set_ylabel("delta")
    axes[0].legend()
    axes[1].semilogy(x, [max(s.rel_norm, 1e-30) for s in layers], ".-", color="C3")
    axes[1].set_ylabel("‖δ‖ / ‖θ_pre‖")
    axes[1].set_xlabel("tensor (checkpoint order)")
    if len(layers) <= 60:
        axes[1].set_xticks(list(x), [s.name for s in layers], rotation=90, fontsize=6)
    fig.suptitle("delta statistics (δ = finetuned − base)")
    fig.tight_layout()
    try:
        with outputs.atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png", metadata={"Software": outputs.PNG_SOFTWARE})
    finally:
        plt.close(fig)
