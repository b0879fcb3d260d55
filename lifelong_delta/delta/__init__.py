"""Delta-parameter pruning: pure tensor / state-dict functions (no Lightning).

DARE (arXiv 2311.03099), DAREx-q, importance and structural pruning (arXiv 2410.09344), LoRA deltas.

The names below are imported on first use (PEP 562), so ``import lifelong_delta.delta.choices`` and the
``lifelong-delta`` command line start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "analytic_q": ("analytic_q_per_layer", "analytic_row_q", "min_mse_q_per_layer"),
    "bank": ("DeltaBank",),
    "dare": ("dare", "dare_merge", "resolve_q"),
    "darex": ("MaskedDelta", "QSearchResult", "default_coarse_grid", "select_q_grid", "select_q_unlabelled"),
    "importance": ("InputStats", "collect_input_stats", "importance_prune"),
    "lora": ("LoraAdapter", "load_lora_adapter", "lora_deltas", "prune_lora_factors", "replaced_tensors"),
    "masks": ("keep_mask", "numba_available", "set_backend", "tensor_key", "uniform"),
    "matching": ("is_excluded", "match_tensors"),
    "methods": ("METHODS", "PruneSpec", "keep_mask_for", "prune_delta", "prune_tensor"),
    "structural": ("structural_keep", "structural_prune"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
