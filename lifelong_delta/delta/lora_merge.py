"""Prune a LoRA fine-tune's delta and merge it into its base, one base tensor at a time, into a full checkpoint.

LoRA: Hu et al., arXiv 2106.09685. Pruning LoRA deltas with DARE / DAREx-q and importance methods: Deng et al.,
"DARE the Extreme", arXiv 2410.09344.

Two ways, chosen by ``lora_prune``:

* ``"product"``: the dense delta ``δ = scaling · B A`` of each adapted weight is pruned like a full fine-tune's delta
  (any method of :data:`~lifelong_delta.delta.methods.METHODS` but WANDA) and added to the base weight;
* ``"factors"``: A and B are pruned separately (each factor treated as a delta, its mask keyed by its adapter key,
  e.g. ``base_model.model.<path>.lora_A.weight``), and ``scaling · B' A'`` is added unpruned.

Tensors the adapter stores in full (``modules_to_save``) are pruned against the base like a full fine-tune in both
modes. The adapter is small and read whole; the base checkpoint is streamed; the output is a full Hugging Face model
directory (sharded safetensors plus the base's config and tokenizer files), written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lifelong_delta import outputs
from lifelong_delta.delta.choices import LoraPrune
from lifelong_delta.delta.io import CheckpointReader, parse_size
from lifelong_delta.delta.lora import (
    _FACTOR,
    LoraAdapter,
    _strip,
    load_lora_adapter,
    lora_delta_names,
    lora_deltas,
    replaced_tensors,
)
from lifelong_delta.delta.matching import _listing, _prefix_candidates, is_excluded
from lifelong_delta.delta.methods import PruneSpec, prune_delta
from lifelong_delta.delta.stats import check_finite, tensor_prune_stats
from lifelong_delta.delta.summary import PruneSummary
from lifelong_delta.delta.writer import ShardedWriter
from lifelong_delta.progress import Progress

if TYPE_CHECKING:
    from lifelong_delta.delta.pack import PackWriter

__all__ = ["LoraPrune", "stream_prune_lora"]


def _base_names(adapter_names: list[str], base: CheckpointReader) -> dict[str, str]:
    """``{adapter name: base name}``: equal names, or names that differ by one consistent dotted prefix.

    Raises:
        ValueError: naming the adapter tensors that have no counterpart in the base.
    """
    missing = [n for n in adapter_names if n not in base]
    if not missing:
        return {n: n for n in adapter_names}
    base_set = set(base.names())
    for prefix, _ in sorted(_prefix_candidates(adapter_names, base_set).items(), key=lambda kv: -kv[1]):
        if all(n.startswith(prefix) and n[len(prefix) :] in base_set for n in adapter_names):
            return {n: n[len(prefix) :] for n in adapter_names}
    raise ValueError(
        f"{len(missing)} tensor(s) of the LoRA adapter have no counterpart in the base model: "
        f"{_listing(missing)} (is --base the model the adapter was trained on?)"
    )


def _prune_factors(adapter: LoraAdapter, spec: PruneSpec, keys: set[str]) -> LoraAdapter:
    """The adapter with the factors of ``keys`` pruned by ``spec`` (each factor is its own delta)."""
    tensors = dict(adapter.tensors)
    for key in keys:
        t = tensors[key]
        tensors[key] = prune_delta(key, t.to(torch.float32), spec).to(t.dtype)
    return LoraAdapter(config=adapter.config, tensors=tensors)


@torch.no_grad()
def stream_prune_lora(
    base: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: PruneSpec,
    *,
    lora_prune: LoraPrune = "product",
    overwrite: bool = False,
    out_shard_size: str | int = "2GB",
    progress: bool = True,
    pack: bool = False,
) -> PruneSummary:
    """Prune a PEFT LoRA adapter's delta against ``base`` and write ``base + pruned delta`` as a full checkpoint.

    Every check that needs no tensor data runs before anything is written: the spec and mode, the output path, that
    the adapter and the base are readable, and that every adapted tensor exists in the base (directly or through one
    name prefix, e.g. an adapter trained on ``BertForSequenceClassification`` against a ``BertModel`` base) with the
    delta's shape. Base tensors the adapter does not touch are copied; ``spec.exclude`` patterns (matched against base
    names) merge the adapter's delta unpruned. Compute is fp32; each tensor is written in the base's dtype.

    Args:
        base: Pretrained checkpoint (HF model directory or ``.safetensors`` file).
        adapter_dir: PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        out: Output directory.
        spec: Method and settings. A method that needs input norms (WANDA) is not supported (it needs calibration
            activations of a loaded model).
        lora_prune: ``"product"`` (prune ``scaling · B A``) or ``"factors"`` (prune A and B).
        overwrite: Replace an existing ``out``.
        out_shard_size: Output shard size limit, e.g. ``"2GB"``.
        progress: Show progress on stderr (a bar on a terminal, a line every 10 s elsewhere, see
            :class:`lifelong_delta.progress.Progress`).
        pack: Write a pack of what the prune changed (:mod:`lifelong_delta.delta.pack`) instead of the checkpoint;
            ``lora_prune="product"`` only.

    Returns:
        A :class:`~lifelong_delta.delta.stats.PruneSummary` over the adapted tensors (δ before = the adapter's
        dense delta, δ after = output − base).

    Raises:
        CheckpointError: unreadable base, or ``out`` exists without ``overwrite``.
        ValueError: a bad adapter, an adapted tensor missing from the base or of another shape, WANDA, a bad mode.
    """
    _check_options(spec, lora_prune, pack)
    out = Path(out)
    inputs = {"--base": base, "--finetuned": adapter_dir}
    outputs.check_output_dir(out, overwrite=overwrite, inputs=inputs)
    parse_size(out_shard_size)
    adapter = load_lora_adapter(adapter_dir)
    full = replaced_tensors(adapter)
    product_names = lora_delta_names(adapter)
    if not product_names and not full:
        raise ValueError(f"adapter: {adapter_dir} holds no LoRA factors")
    summary = PruneSummary(spec.method, spec.p, spec.q, out=str(out))
    with CheckpointReader(base) as rb:
        to_base = _base_names(product_names + list(full), rb)
        from_base = {b: a for a, b in to_base.items()}
        factor_keys = _factor_keys(adapter, to_base, spec) if lora_prune == "factors" else {}
        pruned_adapter = (
            _prune_factors(adapter, spec, {k for keys in factor_keys.values() for k in keys})
            if factor_keys
            else adapter
        )
        names = rb.names()
        nbytes = {name: rb.info(name).nbytes for name in names}
        adapted = [n for n in names if n in from_base]
        if pack:
            sink: ShardedWriter | PackWriter = _pack_sink(out, rb, adapted, spec, overwrite=overwrite, inputs=inputs)
        else:
            sink = ShardedWriter(out, out_shard_size, overwrite=overwrite, inputs=inputs, command="prune")
        with (
            sink as writer,
            Progress("merging", len(names), unit="tensors", total_bytes=sum(nbytes.values()), enabled=progress) as bar,
        ):
            for name in names:
                bar.update(0, detail=name)
                a_name = from_base.get(name)
                b = rb.get(name)
                if a_name is None:
                    writer.add(name, b)
                    summary.copied.append(name)
                else:
                    b32, delta = _base_and_delta(name, b, a_name, adapter, full)
                    if is_excluded(name, spec.exclude):
                        merged = (b32 + delta).to(b.dtype)
                    elif name in factor_keys:
                        merged = (b32 + lora_deltas(pruned_adapter, only={a_name})[a_name]).to(b.dtype)
                    else:
                        pruned = prune_delta(name, delta, spec)
                        merged = torch.where(pruned != 0, b32 + pruned, b32).to(b.dtype)
                    writer.add(name, merged)
                    summary.tensors.append(tensor_prune_stats(name, b32, b32 + delta, merged))
                bar.update(1, nbytes=nbytes[name])
            base_dir = base if Path(base).is_dir() else None
            if pack:
                from lifelong_delta.delta.pack_format import manifest_for

                writer.commit(manifest_for(spec, rb, None), files_from=base_dir, base_dir=base_dir)
            else:
                writer.commit(copy_files_from=base_dir)
    return summary


def _check_options(spec: PruneSpec, lora_prune: LoraPrune, pack: bool) -> None:
    """Refuse a LoRA prune that cannot run: an unknown mode, a method that needs activations or a q, a factors pack.

    Raises:
        ValueError: naming the option to change.
    """
    if lora_prune not in ("product", "factors"):
        raise ValueError(f"--lora_prune {lora_prune!r} is not one of product, factors")
    if spec.row.needs_input_norms:
        raise ValueError(
            f"--method {spec.method} needs calibration activations of a loaded model, which a LoRA "
            "adapter --finetuned does not support; use --method magnitude"
        )
    if spec.lacks_q:
        raise ValueError(
            f"--method {spec.method}{'' if spec.row.rescales == ('q',) else ' with --rescale q'} needs q: pass --q Q"
        )
    if pack and lora_prune != "product":
        raise ValueError("pack stores the pruned LoRA product B·A; drop --lora_prune factors")


def _factor_keys(adapter: LoraAdapter, to_base: dict[str, str], spec: PruneSpec) -> dict[str, set[str]]:
    """``{base name: adapter keys of its A and B factors}`` for the adapted weights that ``spec.exclude`` leaves to
    prune (biases of the factors are never pruned)."""
    factor_keys: dict[str, set[str]] = {}
    for key in adapter.tensors:
        m = _FACTOR.match(_strip(key))
        if m is None or m["suffix"] == ".bias":
            continue
        name = to_base.get(f"{m['path']}.weight")
        if name is not None and not is_excluded(name, spec.exclude):
            factor_keys.setdefault(name, set()).add(key)
    return factor_keys


def _pack_sink(
    out: Path, rb: CheckpointReader, adapted: list[str], spec: PruneSpec, *, overwrite: bool, inputs: dict
) -> PackWriter:
    """A :class:`~lifelong_delta.delta.pack.PackWriter` that stores the ``adapted`` tensors and copies the rest
    from the base; excluded tensors are stored unmasked."""
    from lifelong_delta.delta.matching import TensorMatch
    from lifelong_delta.delta.pack import PackWriter

    return PackWriter(
        out,
        rb,
        TensorMatch(pruned=adapted, copied=[]),
        spec,
        overwrite=overwrite,
        inputs=inputs,
        copies_base=True,
        unmasked=[n for n in adapted if is_excluded(n, spec.exclude)],
    )


def _base_and_delta(
    name: str, b: torch.Tensor, a_name: str, adapter: LoraAdapter, full: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base tensor ``b`` and the adapter's dense delta for it, both fp32: ``full − b`` for a tensor the adapter
    stores in full, ``scaling · B A`` for an adapted one.

    Raises:
        ValueError: ``b`` is not floating or not finite, the delta's shape differs from ``b``'s, or the delta is not
            finite.
    """
    if not b.is_floating_point():
        raise ValueError(f"tensor {name!r} of the base model is not floating ({b.dtype}); the adapter cannot change it")
    check_finite(name, b, "base")
    b32 = b.to(torch.float32)
    if a_name in full:
        delta = full[a_name].to(torch.float32) - b32
        if full[a_name].shape != b.shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(b.shape)} in the base model but "
                f"{list(full[a_name].shape)} in the adapter"
            )
    else:
        delta = lora_deltas(adapter, only={a_name})[a_name]
        if delta.shape != b.shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(b.shape)} in the base model but the "
                f"adapter's delta has shape {list(delta.shape)}"
            )
    if not torch.isfinite(delta).all():
        raise ValueError(f"tensor {name!r}: the adapter's delta has non-finite values")
    return b32, delta
