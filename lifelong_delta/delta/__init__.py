"""Delta-parameter pruning: pure tensor / state-dict functions (no Lightning).

DARE (arXiv 2311.03099), DAREx-q, importance and structural pruning (arXiv 2410.09344), LoRA deltas.
"""

from lifelong_delta.delta.analytic_q import analytic_q_per_layer, analytic_row_q, min_mse_q_per_layer
from lifelong_delta.delta.dare import dare, dare_merge, resolve_q
from lifelong_delta.delta.darex import MaskedDelta, QSearchResult, default_coarse_grid, select_q_grid, select_q_unlabelled
from lifelong_delta.delta.importance import InputStats, collect_input_stats, importance_prune
from lifelong_delta.delta.lora import (
    LoraAdapter,
    load_lora_adapter,
    lora_deltas,
    prune_lora_factors,
    replaced_tensors,
)
from lifelong_delta.delta.masks import keep_mask, numba_available, set_backend, tensor_key, uniform
from lifelong_delta.delta.methods import METHODS, PruneSpec, is_excluded, keep_mask_for, prune_delta, prune_tensor
from lifelong_delta.delta.structural import structural_keep, structural_prune

__all__ = [
    "dare",
    "dare_merge",
    "resolve_q",
    "MaskedDelta",
    "QSearchResult",
    "analytic_q_per_layer",
    "analytic_row_q",
    "min_mse_q_per_layer",
    "default_coarse_grid",
    "select_q_grid",
    "select_q_unlabelled",
    "InputStats",
    "collect_input_stats",
    "importance_prune",
    "LoraAdapter",
    "load_lora_adapter",
    "lora_deltas",
    "prune_lora_factors",
    "replaced_tensors",
    "keep_mask",
    "numba_available",
    "set_backend",
    "tensor_key",
    "uniform",
    "METHODS",
    "PruneSpec",
    "is_excluded",
    "keep_mask_for",
    "prune_delta",
    "prune_tensor",
    "structural_keep",
    "structural_prune",
]
