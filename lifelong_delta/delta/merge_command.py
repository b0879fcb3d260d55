"""The ``lifelong-delta merge`` subcommand: fine-tunes of one base model merged into a new model, a tensor at a time.

The formulas are :mod:`lifelong_delta.delta.merge`'s; this module checks the options (flags, or a mergekit YAML
through :mod:`lifelong_delta.delta.mergekit_config`), pairs the tensors of the checkpoints and streams them:

* **Checks first, no torch.** Options, the output path (never an input, inside one or containing one; ``--overwrite``
  replaces only a folder this tool wrote, :mod:`lifelong_delta.outputs`) and the checkpoint headers are checked
  before torch is imported or anything is written; a bad input is one ``ValueError`` line naming what to fix.
* **Pairing.** Every fine-tune must have the first one's tensors (names, shapes, which are floating). The first
  one pairs with the base by :func:`lifelong_delta.delta.matching.match_tensors` (equal names, or one consistent
  prefix such as ``bert.``). Floating tensors of the fine-tunes that the base lacks (a task head) are an error,
  unless ``--exclude`` names them: excluded tensors are taken unchanged from the first model. Non-floating tensors
  (``position_ids``) are copied from the base, or from the first model when the base lacks them. The output has
  the first model's tensor names and order; base tensors no fine-tune maps to are left out, as ``prune`` does.
* **Streaming.** Per tensor, flat chunks of the base and of every fine-tune are read together and merged in fp32
  (:func:`~lifelong_delta.delta.merge.merge_tensor`), so memory holds a few chunks per model. TIES first reads
  each model's whole delta once, one model at a time, for its top-k cut. Output tensors have the base's dtype, or
  ``--dtype``; the writer (:class:`~lifelong_delta.delta.writer.ShardedWriter`) moves the finished folder into
  place only when everything succeeded, so a failure leaves nothing at ``--out``.
* **Raw words, no torch.** Where every input and the output of a merged tensor are F32 or BF16 (and the method's
  random mask, if any, is DARE's), the tensor is merged on raw checkpoint words by the compiled kernel
  (:mod:`lifelong_delta.delta.merge_words`: the same bits and errors); copied tensors go as bytes, or F32/BF16 words
  cast by the same extension. A merge of such checkpoints never imports torch. Other tensors (F16, another mask, the
  torch back end ``LIFELONG_DELTA_BACKEND=torch``, a build without the extension) go through torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

from lifelong_delta import outputs
from lifelong_delta.delta.commands import _say
from lifelong_delta.delta.merge import MERGE_METHODS, MergeMethodName, MergeSpec

# Types for readers and type checkers only (see commands.py: jsonargparse runs TYPE_CHECKING blocks).
MYPY = False
if MYPY:
    import torch

    from lifelong_delta.delta.io import CheckpointReader
    from lifelong_delta.delta.matching import TensorMatch
    from lifelong_delta.delta.streaming import _Ring

__all__ = ["MergeResult", "merge"]

OutDtype = Literal["float32", "float16", "bfloat16"]
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_CHUNK_ELEMENTS = 1 << 20  # elements per chunk of every model (a few MB each in fp32)
_LIST = 5  # names listed in a message before "and N more"


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` wrote: the output folder and how many tensors were merged or copied from where."""

    out: str
    merged: int
    from_base: int
    from_first: int


@dataclass(frozen=True)
class _Request:
    """The merge to run, from flags or a mergekit config."""

    base: str
    models: tuple[str, ...]
    spec: MergeSpec
    dtype: str | None
    files_from: str


@dataclass(frozen=True)
class _Item:
    """One output tensor: where it comes from (``merge`` / ``base`` / ``first``), under which name there, its dtype
    code and shape."""

    name: str
    source: Literal["merge", "base", "first"]
    source_name: str
    code: str
    shape: tuple[int, ...]


def merge(
    out: str,
    base: str | None = None,
    models: list[str] | None = None,
    method: MergeMethodName | None = None,
    weights: list[float] | None = None,
    density: list[float] | None = None,
    p: list[float] | None = None,
    q: list[float] | None = None,
    lambda_: float | None = None,
    normalize: bool | None = None,
    mergekit_config: str | None = None,
    dtype: OutDtype | None = None,
    exclude: list[str] | None = None,
    files_from: Literal["first", "base"] = "first",
    seed: int = 0,
    out_shard_size: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge fine-tunes of one base model (task arithmetic, TIES, DARE, DAREx-q) into a new model directory.

    θ = θ_pre + λ·τ, with τ the weighted sum (or TIES' sign-consensus mean) of the fine-tunes' deltas after each is
    trimmed (TIES), dropped and rescaled (DARE, DAREx-q) or kept (task arithmetic). Definitions:
    lifelong_delta/delta/merge.py.

    Args:
        out: Output directory (must not exist unless --overwrite).
        base: Pretrained model: an HF directory with safetensors weights, one .safetensors file, or a Hub id
            org/name[@revision].
        models: The fine-tuned models, in order: --models F1 F2 ... (or --models F1 --models F2).
        method: task-arithmetic | ties | dare-linear | dare-ties | darex-q.
        weights: w_i, one per model (default 1 each); repeat --weights for each.
        density: Kept fraction of each delta in (0, 1]: one for all models or one per model (ties and the DARE
            merges; TIES keeps the floor(density·n) largest |δ| of each tensor).
        p: Drop rate in [0, 1) instead of --density (density = 1 - p).
        q: darex-q's rescale 1/q, q in [density, 1], one for all or one per model (default sqrt(density), which keeps
            the delta's expected squared norm).
        lambda_: λ, the scale of the merged delta (default 1); --lambda works too.
        normalize: Divide by the sum of the (agreeing) weights (default: true for ties and dare-ties, else false).
        mergekit_config: A mergekit YAML config (merge_method, base_model, models with weight/density, parameters,
            dtype) instead of the merge flags above.
        dtype: Output dtype of the floating tensors: float32 | float16 | bfloat16 (default: the base's).
        exclude: Glob patterns of tensors taken unchanged from the first model instead of merged, e.g. a task head
            'classifier.*' (which the base may lack).
        files_from: Where the config and tokenizer files come from: first (the first model) | base.
        seed: Seed of the DARE masks; model i (0-based) draws prune's DARE mask of seed + i.
        out_shard_size: Output shard size, e.g. 2GB or 500MB.
        overwrite: Replace an existing --out written by this tool.
        progress: Show a progress bar.
    """
    from lifelong_delta.delta.hub import resolve_checkpoint
    from lifelong_delta.delta.io import parse_size

    given = {
        "--base": base,
        "--models": models,
        "--method": method,
        "--weights": weights,
        "--density": density,
        "--p": p,
        "--q": q,
        "--lambda": lambda_,
        "--normalize": normalize,
        "--dtype": dtype,
    }
    if mergekit_config is not None:
        request = _from_config(mergekit_config, seed, {k: v for k, v in given.items() if v is not None}, files_from)
    else:
        request = _from_flags(base, models, method, weights, density, p, q, lambda_, normalize, seed, dtype, files_from)
    parse_size(out_shard_size)
    named = {
        "--mergekit_config": mergekit_config,
        "--base": request.base,
        **{f"--models[{i + 1}]": m for i, m in enumerate(request.models)},
    }
    outputs.check_output_dir(
        out,
        overwrite=overwrite,  # before a hub id is downloaded
        inputs={k: v for k, v in named.items() if v is not None and os.path.exists(v)},
    )
    resolved = {
        "--mergekit_config": mergekit_config,
        "--base": resolve_checkpoint(request.base, option="--base"),
        **{f"--models[{i + 1}]": resolve_checkpoint(m, option="--models") for i, m in enumerate(request.models)},
    }
    outputs.check_output_dir(out, overwrite=overwrite, inputs=resolved)
    spec = request.spec
    base_path, model_paths = resolved["--base"], [resolved[f"--models[{i + 1}]"] for i in range(spec.n_models)]
    items = _plan(base_path, model_paths, tuple(exclude or ()), request.dtype)
    _say(f"merge: {spec.method} of {spec.n_models} fine-tune(s) of {base_path}, {_settings(spec)} -> {out}")
    result = _stream(
        items,
        base_path,
        model_paths,
        spec,
        out,
        files_from=request.files_from,
        inputs=resolved,
        overwrite=overwrite,
        out_shard_size=out_shard_size,
        progress=progress,
    )
    print(
        f"merged {result.merged} tensors ({spec.method}, {spec.n_models} models); copied {result.from_base} from "
        f"the base and {result.from_first} from the first model; wrote {result.out}"
    )
    return result


def _settings(spec: MergeSpec) -> str:
    """The merge's numbers in one line: weights, densities, q's, λ, normalize, seed."""

    def values(xs: Sequence[float]) -> str:
        return ", ".join(f"{x:.4g}" for x in xs)

    parts = [f"weights {values(spec.weights)}"]
    if spec.density is not None:
        parts.append(f"density {values(spec.density)}")
    if spec.row.rescale == "q":
        parts.append(f"q {values([spec.rescale_q(i) for i in range(spec.n_models)])}")
    parts += [f"lambda {spec.lambda_:g}", f"normalize {str(spec.normalized).lower()}"]
    if spec.row.sparsify == "random":
        parts.append(f"seed {spec.seed}")
    return ", ".join(parts)


def _from_flags(
    base: str | None,
    models: list[str] | None,
    method: str | None,
    weights: list[float] | None,
    density: list[float] | None,
    p: list[float] | None,
    q: list[float] | None,
    lambda_: float | None,
    normalize: bool | None,
    seed: int,
    dtype: str | None,
    files_from: str,
) -> _Request:
    """The merge the flags describe (one-line errors naming the flag)."""
    if base is None:
        raise ValueError("--base is required (or --mergekit_config FILE, a mergekit YAML config)")
    if not models:
        raise ValueError("--models is required: the fine-tuned models to merge (--models F1 F2 ...)")
    if method is None:
        raise ValueError(f"--method is required: one of {', '.join(MERGE_METHODS)}")
    if density is not None and p is not None:
        raise ValueError("pass either --density (the kept fraction) or --p (the drop rate), not both")
    if p is not None:
        bad = [x for x in p if isinstance(x, bool) or not 0.0 <= x < 1.0]
        if bad:
            raise ValueError(f"--p {bad[0]:g} is outside [0, 1): p is the drop rate of each delta")
        density = [1.0 - x for x in p]
    if weights is not None and len(weights) != len(models):
        raise ValueError(
            f"--weights has {len(weights)} value(s) for {len(models)} model(s) (--models); give one "
            "weight per model, in the same order"
        )
    spec = MergeSpec(
        method,
        tuple(weights or [1.0] * len(models)),  # type: ignore[arg-type]
        density=None if density is None else tuple(density),
        q=None if q is None else tuple(q),
        lambda_=1.0 if lambda_ is None else lambda_,
        normalize=normalize,
        seed=seed,
    )
    return _Request(base, tuple(models), spec, dtype, files_from)


def _from_config(config: str, seed: int, conflicting: dict[str, object], files_from: str) -> _Request:
    """The merge a mergekit config describes; merge flags beside it are an error."""
    from lifelong_delta.delta.mergekit_config import load_mergekit_config

    if conflicting or files_from != "first":
        flag = next(iter(conflicting), "--files_from")
        raise ValueError(f"--mergekit_config {config} describes the merge; drop {flag} (set it in the config)")
    if not os.path.isfile(config):
        raise ValueError(f"--mergekit_config {config}: not found (a mergekit YAML file)")
    cfg = load_mergekit_config(config)
    for note in cfg.notes:
        _say(f"merge: note: {note}")
    _say(f"merge: --mergekit_config {config} = {cfg.flags()}")
    try:
        spec = MergeSpec(
            cfg.method,
            cfg.weights,
            density=cfg.density,  # type: ignore[arg-type]
            lambda_=cfg.lambda_,
            normalize=cfg.normalize,
            seed=seed,
        )
    except ValueError as e:
        raise ValueError(f"--mergekit_config {config}: {e}") from None
    return _Request(cfg.base, cfg.models, spec, cfg.dtype, cfg.files_from)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LIST])
    return shown + (f" and {len(names) - _LIST} more" if len(names) > _LIST else "")


def _check_same_layout(
    first: CheckpointReader, other: CheckpointReader, first_path: str, other_path: str, exclude: tuple[str, ...]
) -> None:
    """``other`` has exactly ``first``'s tensors: names, shapes, and which are floating. Tensors matched by
    ``exclude`` are taken from the first model alone, so another model's may differ or be missing (a task head of
    another label count)."""
    from lifelong_delta.delta.dtypes import FLOAT_CODES, dtype_name
    from lifelong_delta.delta.matching import is_excluded

    where = f"--models {other_path} does not match --models {first_path}"
    missing = [n for n in first.names() if n not in other and not is_excluded(n, exclude)]
    if missing:
        raise ValueError(f"{where}: it lacks {len(missing)} tensor(s): {_listing(missing)}")
    extra = [n for n in other.names() if n not in first and not is_excluded(n, exclude)]
    if extra:
        raise ValueError(f"{where}: it has {len(extra)} more tensor(s): {_listing(extra)}")
    for n in first.names():
        if is_excluded(n, exclude):
            continue
        if other.shape(n) != first.shape(n):
            raise ValueError(
                f"{where}: tensor {n!r} has shape {list(other.shape(n))} there but "
                f"{list(first.shape(n))} in the first model"
            )
        if (other.code(n) in FLOAT_CODES) != (first.code(n) in FLOAT_CODES):
            raise ValueError(
                f"{where}: tensor {n!r} is {dtype_name(other.code(n))} there but "
                f"{dtype_name(first.code(n))} in the first model"
            )


def _base_counterpart(name: str, match: TensorMatch, rb: CheckpointReader) -> str | None:
    """The base's name of a non-floating tensor: the same name, or the name through the match's prefix."""
    if name in rb:
        return name
    if match.prefix is not None:
        pb, pf = match.prefix
        if name.startswith(pf) and pb + name[len(pf) :] in rb:
            return pb + name[len(pf) :]
    return None


def _plan(base: str, models: Sequence[str], exclude: tuple[str, ...], dtype: str | None) -> list[_Item]:
    """Every output tensor and its source, from the headers alone (no torch); one-line errors for mismatches."""
    from lifelong_delta.delta.dtypes import FLOAT_CODES
    from lifelong_delta.delta.io import CheckpointReader
    from lifelong_delta.delta.matching import is_excluded, match_tensors

    with ExitStack() as stack:
        rb = stack.enter_context(CheckpointReader(base))
        readers = [stack.enter_context(CheckpointReader(m)) for m in models]
        first = readers[0]
        for path, reader in zip(models[1:], readers[1:]):
            _check_same_layout(first, reader, models[0], path, exclude)
        try:
            match = match_tensors(rb, first, exclude)
        except ValueError as e:
            raise ValueError(f"--models: {e}") from None
        heads = [n for n in match.finetuned_only if not is_excluded(n, exclude)]
        if heads:
            raise ValueError(
                f"{len(heads)} floating tensor(s) of the fine-tuned models have no counterpart in the "
                f"base model: {_listing(heads)}; pass --exclude PATTERN to take them unchanged from "
                f"the first model ({models[0]})"
            )
        merged = set(match.pruned)
        items = []
        for n in first.names():
            shape = first.shape(n)
            if n in merged:
                bn = match.base_name(n)
                items.append(_Item(n, "merge", bn, _CODES[dtype] if dtype else rb.code(bn), shape))
                continue
            bn = None if is_excluded(n, exclude) else _base_counterpart(n, match, rb)
            if bn is not None and rb.shape(bn) == shape and rb.code(bn) not in FLOAT_CODES:
                items.append(_Item(n, "base", bn, rb.code(bn), shape))
            else:
                code = _CODES[dtype] if dtype and first.code(n) in FLOAT_CODES else first.code(n)
                items.append(_Item(n, "first", n, code, shape))
    return items


def _merged_chunks(
    item: _Item, rb: CheckpointReader, readers: Sequence[CheckpointReader], spec: MergeSpec, outs: _Ring
) -> Iterator[object]:
    """One merged tensor, chunk by chunk: on raw words where the compiled kernel serves its dtypes (into ``outs``),
    else in torch."""
    from lifelong_delta.delta import merge_words

    codes = [item.code, rb.code(item.source_name), *(r.code(item.name) for r in readers)]
    if merge_words.applies(spec, codes):
        return merge_words.merged_chunks(
            item.name, item.source_name, item.code, rb, readers, spec, _CHUNK_ELEMENTS, outs
        )
    return _torch_chunks(item, rb, readers, spec)


def _torch_chunks(
    item: _Item, rb: CheckpointReader, readers: Sequence[CheckpointReader], spec: MergeSpec
) -> Iterator[torch.Tensor]:
    """One merged tensor through torch, chunk by chunk (TIES' cuts from each model's whole delta first)."""
    import torch

    from lifelong_delta.delta.dtypes import torch_dtype
    from lifelong_delta.delta.merge import magnitude_cut, merge_tensor
    from lifelong_delta.delta.stats import check_finite

    name, base_name = item.name, item.source_name
    cuts = None
    if spec.row.sparsify == "magnitude":
        assert spec.density is not None
        b = rb.get(base_name).to(torch.float32)
        check_finite(name, b, "base")
        cuts = []
        for i, r in enumerate(readers):
            f = r.get(name).to(torch.float32)
            check_finite(name, f, f"fine-tuned #{i + 1}")
            cuts.append(magnitude_cut(f - b, spec.density[i], name=name))
            del f
        del b
    out_dtype = torch_dtype(item.code)
    numel = math.prod(item.shape)
    for start in range(0, numel, _CHUNK_ELEMENTS):
        count = min(_CHUNK_ELEMENTS, numel - start)
        yield merge_tensor(
            rb.get_flat(base_name, start, count),
            [r.get_flat(name, start, count) for r in readers],
            spec,
            name=name,
            offset=start,
            cuts=cuts,
            out_dtype=out_dtype,
        )


def _copied_chunks(reader: CheckpointReader, item: _Item, outs: _Ring) -> Iterator[object]:
    """One tensor copied chunk by chunk: its bytes, or its values converted to ``item.code`` (``--dtype``; F32 and
    BF16 words by the compiled kernel, other dtypes by torch)."""
    from lifelong_delta.delta import _kernels
    from lifelong_delta.delta.dtypes import itemsize, torch_dtype

    info = reader.info(item.source_name)
    convert = info.code != item.code
    words = {info.code, item.code} <= set(_kernels.WORD_CODES) and _kernels.use_words()
    for start in range(0, info.numel, _CHUNK_ELEMENTS):
        count = min(_CHUNK_ELEMENTS, info.numel - start)
        if convert and words:
            out = outs.take(count * itemsize(item.code))
            _kernels.convert_words(info.code, reader.view(item.source_name, start, count), item.code, out)
            yield out
        elif convert:
            yield reader.get_flat(item.source_name, start, count).to(torch_dtype(item.code))
        else:
            yield reader.read_into(item.source_name, start, count, outs.take(count * info.itemsize))


def _stream(
    items: Sequence[_Item],
    base: str,
    models: Sequence[str],
    spec: MergeSpec,
    out: str,
    *,
    files_from: str,
    inputs: outputs.Inputs,
    overwrite: bool,
    out_shard_size: str,
    progress: bool,
) -> MergeResult:
    """Write every planned tensor into a new checkpoint at ``out`` (atomically)."""
    from pathlib import Path

    from lifelong_delta.delta.io import CheckpointReader
    from lifelong_delta.delta.streaming import _Ring
    from lifelong_delta.delta.writer import ShardedWriter
    from lifelong_delta.progress import Progress

    counts = {"merge": 0, "base": 0, "first": 0}
    outs = _Ring(ShardedWriter.PENDING + 1)  # output chunk buffers reused (fresh pages fault)
    with ExitStack() as stack:
        rb = stack.enter_context(CheckpointReader(base))
        readers = [stack.enter_context(CheckpointReader(m)) for m in models]
        metadata = {k: v for k, v in readers[0].metadata.items() if isinstance(v, str)}
        nbytes = {it.name: math.prod(it.shape) * readers[0].info(it.name).itemsize for it in items}
        writer = stack.enter_context(
            ShardedWriter(
                out,
                out_shard_size,
                overwrite=overwrite,
                metadata=metadata,
                inputs=inputs,
                command="merge",
                layout=[(it.name, it.code, it.shape) for it in items],
            )
        )
        bar = stack.enter_context(
            Progress("merging", len(items), unit="tensors", total_bytes=sum(nbytes.values()), enabled=progress)
        )
        for it in items:
            bar.update(0, detail=it.name)
            if it.source == "merge":
                chunks: Iterator[object] = _merged_chunks(it, rb, readers, spec, outs)
            else:
                chunks = _copied_chunks(rb if it.source == "base" else readers[0], it, outs)
            writer.add_chunks(it.name, it.code, it.shape, chunks)
            counts[it.source] += 1
            bar.update(1, nbytes=nbytes[it.name])
        files = base if files_from == "base" else models[0]
        writer.commit(copy_files_from=files if Path(files).is_dir() else None)
    return MergeResult(out, counts["merge"], counts["base"], counts["first"])
