"""LoRA deltas: read PEFT-format adapters without peft, and prune the product B·A or the factors.

LoRA: Hu et al., arXiv 2106.09685; rsLoRA scaling: Kalajdzievski, arXiv 2312.03732. Pruning LoRA deltas
with DARE/DAREx-q: arXiv 2410.09344.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<suffix>\.weight|\.bias)?$"
)

__all__ = [
    "LoraAdapter",
    "load_lora_adapter",
    "lora_delta_names",
    "lora_deltas",
    "lora_scaling",
    "prune_lora_factors",
    "replaced_tensors",
]


@dataclass
class LoraAdapter:
    """A PEFT adapter as plain data.

    Attributes:
        config: Parsed ``adapter_config.json``.
        tensors: Adapter state dict as saved (``base_model.model.<path>.lora_A.weight`` ...).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def load_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) from a directory.

    Raises:
        ValueError: missing or unreadable files, a non-LoRA adapter, or DoRA (not supported).
    """
    d = Path(path)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise ValueError(f"adapter: {cfg_path} not found; pass a PEFT adapter directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter: cannot read {cfg_path}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter: peft_type={config.get('peft_type')!r} in {cfg_path}; only LORA is supported")
    if config.get("use_dora"):
        raise ValueError(f"adapter: {cfg_path} is a DoRA adapter (use_dora=true); only plain LoRA is supported")
    st, binf = d / "adapter_model.safetensors", d / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(st))
        elif binf.is_file():
            tensors = torch.load(str(binf), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"adapter: no adapter_model.safetensors or adapter_model.bin in {d}")
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"adapter: cannot read the weights in {d}: {e}") from None
    return LoraAdapter(config=config, tensors=dict(tensors))


def _pattern_value(patterns: dict[str, Any] | None, module_path: str) -> Any:
    r"""PEFT's rule: the first pattern ``k`` with ``re.match(rf"(^|.*\.){k}$", module_path)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(^|.*\.){key}$", module_path):
            return value
    return None


def lora_scaling(config: dict[str, Any], module_path: str) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), honouring ``rank_pattern``/``alpha_pattern``.

    Args:
        config: Parsed ``adapter_config.json``.
        module_path: Module path without the ``base_model.model.`` prefix, e.g. ``"model.layers.0.q_proj"``.
    """
    r = _pattern_value(config.get("rank_pattern"), module_path) or config.get("r", 8)
    alpha = _pattern_value(config.get("alpha_pattern"), module_path) or config.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _strip(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def lora_delta_names(adapter: LoraAdapter) -> list[str]:
    """Base parameter names that :func:`lora_deltas` returns a delta for (without computing any product)."""
    names = []
    for key in adapter.tensors:
        m = _FACTOR.match(_strip(key))
        if m is None:
            continue
        name = f"{m['path']}.bias" if m["suffix"] == ".bias" else f"{m['path']}.weight"
        if (m["suffix"] != ".bias" or m["kind"] == "lora_B") and name not in names:
            names.append(name)
    return names


def lora_deltas(adapter: LoraAdapter, only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Dense fp32 delta of every adapted weight: ``{"<path>.weight": scaling · B @ A}``.

    ``only`` restricts the (dense, possibly large) products to those base parameter names, so a streaming caller
    holds one at a time.

    Handles ``fan_in_fan_out`` (delta transposed), embeddings (``lora_embedding_A/B``) and conv layers
    with 1×1 ``B``; the ``base_model.model.`` prefix is stripped. A ``lora_B.bias`` (``lora_bias=True``)
    gives a delta ``scaling · bias`` for ``"<path>.bias"``.

    Returns:
        ``{base parameter name: fp32 delta}`` with the base parameter's shape.

    Raises:
        ValueError: a factor without its partner, or factor shapes that do not compose.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in adapter.tensors.items():
        m = _FACTOR.match(_strip(key))
        if m is None:
            continue
        path, kind = m["path"], m["kind"]
        target = f"{path}.bias" if m["suffix"] == ".bias" else f"{path}.weight"
        if only is not None and target not in only:
            continue
        if m["suffix"] == ".bias":
            if kind == "lora_B":
                out[f"{path}.bias"] = t.to(torch.float32) * lora_scaling(adapter.config, path)
            continue
        factors.setdefault(path, {})[kind] = t.to(torch.float32)
    for path, f in factors.items():
        emb = "lora_embedding_A" in f or "lora_embedding_B" in f
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a_key not in f or b_key not in f:
            raise ValueError(f"adapter: module {path!r} has only one of {a_key}/{b_key}")
        a, b = f[a_key], f[b_key]
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"adapter: module {path!r} has {b_key} {tuple(b.shape)} and {a_key} "
                f"{tuple(a.shape)}, which do not compose"
            )
        scaling = lora_scaling(adapter.config, path)
        if emb:
            delta = (b @ a).T  # A [r, num_embeddings], B [dim, r] → [num_embeddings, dim]
        elif a.dim() > 2:  # conv: A [r, in, *k], B [out, r, 1, ...]
            if any(s != 1 for s in b.shape[2:]):
                raise ValueError(f"adapter: conv module {path!r} has a non-1x1 lora_B {tuple(b.shape)}; not supported")
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        else:
            delta = b @ a
            if adapter.config.get("fan_in_fan_out"):
                delta = delta.T
        out[f"{path}.weight"] = delta * scaling
    return out


def replaced_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Tensors the adapter stores in full (``modules_to_save``, trained biases), by base parameter name.

    They replace the base tensors outright when merging; their delta is ``tensor − θ_pre``.
    """
    return {_strip(k): t for k, t in adapter.tensors.items() if _FACTOR.match(_strip(k)) is None}


def prune_lora_factors(adapter: LoraAdapter, p: float, *, seed: int = 0, q: float | None = None) -> LoraAdapter:
    """DARE-prune the factors A and B separately (independent masks keyed by their names, each ×1/q).

    Since the masks are independent, ``E[B'A'] = BA``. Returns a new adapter; the input is not modified.
    Each factor's mask is keyed by its adapter key, e.g. ``"base_model.model.lin.lora_A.weight"``.
    Tensors stored in full (``modules_to_save``) are left as they are.
    """
    from lifelong_delta.delta.dare import dare

    tensors = {}
    for key, t in adapter.tensors.items():
        m = _FACTOR.match(_strip(key))
        if m is None or m["suffix"] == ".bias":
            tensors[key] = t
        else:
            tensors[key] = dare(t, p, seed=seed, name=key, q=q).to(t.dtype)
    return LoraAdapter(config=dict(adapter.config), tensors=tensors)
