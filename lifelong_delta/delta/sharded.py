"""Pruning a sharded parameter where it lives: each rank prunes its own shard of an FSDP2 (``fully_shard``) DTensor.

DARE's mask is a pure function of (seed, tensor name, flat element index) (:mod:`lifelong_delta.delta.masks`), so a
rank that knows where its shard starts in the flattened global tensor draws exactly the bits a single process would:
no gather, no broadcast, and the same result bit for bit on any number of ranks. A ``Shard(0)`` placement (FSDP2's)
keeps whole rows on a rank, so its shard is one contiguous range of the flat tensor; a replicated tensor is pruned
whole on every rank, with the same result everywhere.

Only element-wise methods (the registry row's ``elementwise``: DARE, DAREx-q) prune shards: the others rank whole
rows or tensors (a 1-D tensor's top-k, structural row choices) and would need the rest of the tensor.
"""

from __future__ import annotations

import math

import torch

from lifelong_delta.delta.methods import METHODS, PruneSpec, prune_tensor
from lifelong_delta.delta.stats import tensor_prune_stats
from lifelong_delta.delta.summary import TensorPruneStats

__all__ = ["is_sharded", "local_range", "prune_local_shard_"]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a ``fully_shard``-ed module, or another distributed tensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_range(t: torch.Tensor) -> tuple[int, int]:
    """``(flat offset, numel)`` of this rank's local shard of DTensor ``t`` within the flattened global tensor.

    Raises:
        ValueError: the shard is not one contiguous range (a placement other than ``Shard(0)`` or ``Replicate``,
            or a mesh of more than one dimension that shards it).
    """
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(t.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return 0, t.numel()
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(
            f"a DTensor placed as {placements} is not one contiguous range of the flat tensor; "
            "shard it on dim 0 (FSDP2's fully_shard does)"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
    row = math.prod(t.shape[1:])
    return offset[0] * row if local_shape[0] else 0, math.prod(local_shape)


@torch.no_grad()
def prune_local_shard_(
    name: str, param: torch.Tensor, reference: torch.Tensor, spec: PruneSpec, q: float | None = None
) -> TensorPruneStats:
    """Prune this rank's local shard of DTensor ``param`` IN PLACE against the full ``reference`` tensor.

    Computed in fp32 on the shard's device and written in the parameter's dtype, like
    :func:`lifelong_delta.delta.methods.prune_tensor`, whose result for the whole tensor it reproduces bit for bit.

    Args:
        name: The tensor's name (keys its mask).
        param: A DTensor parameter (``Shard(0)`` or replicated).
        reference: The full reference tensor θ_ref (global shape), or a DTensor laid out like ``param``.
        spec: An element-wise method (dare, darex-q).
        q: Per-tensor q overriding ``spec.q``.

    Returns:
        The statistics of this rank's shard (sum them over ranks for the tensor's).

    Raises:
        ValueError: another method, a placement that is not one contiguous range, or mismatched shapes.
    """
    if not spec.row.elementwise:
        usable = " or ".join(m for m, row in METHODS.items() if row.elementwise)
        raise ValueError(
            f"method {spec.method!r} ranks whole rows or tensors, so it cannot prune the shard of "
            f"{name!r} alone; use {usable} on sharded parameters, or prune the saved model"
        )
    if tuple(reference.shape) != tuple(param.shape):
        raise ValueError(f"tensor {name!r} has shape {list(param.shape)} but {list(reference.shape)} in the reference")
    offset, numel = local_range(param)
    local = param.to_local()
    if is_sharded(reference):
        ref = reference.to_local()
    else:
        ref = reference.detach().reshape(-1)[offset : offset + numel].view(local.shape)
    current = local.detach()
    ref = ref.to(current.device)  # a CPU reference next to a GPU shard: the statistics below compare the two too
    merged = prune_tensor(name, ref, current, spec, q=q, offset=offset)
    stats = tensor_prune_stats(name, ref, current, merged)
    local.copy_(merged)
    return stats
