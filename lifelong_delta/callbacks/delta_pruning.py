"""``DeltaPruning``: prune a trained model's delta against its pretrained reference, from a Lightning run.

DARE (arXiv 2311.03099) / DAREx-q, magnitude and structural delta pruning (DARE the Extreme, arXiv 2410.09344).
Lightning glue only: the hook calls a private runner, which calls
:func:`lifelong_delta.delta.methods.prune_tensor` once per tensor.

Under DDP the ranks share the work: tensor ``i`` (in state-dict order) is pruned by rank ``i % world_size`` and
then broadcast from that rank. Each tensor is pruned on its own device (in fp32 temporaries of one tensor, or of
one block for DARE) and the masks are a pure function of
``(seed, tensor name, element index)``, so the result is bit-identical to a single-process run. Under FSDP2
(``fully_shard``: DTensor parameters) every rank prunes its own shard where it lives, with the global element index
(:mod:`lifelong_delta.delta.sharded`; DARE and DAREx-q only), and nothing is gathered or broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lifelong_delta.anchors.base import ParameterAnchor
from lifelong_delta.delta.choices import RescaleName
from lifelong_delta.delta.io import CheckpointReader
from lifelong_delta.delta.matching import is_excluded
from lifelong_delta.delta.methods import METHODS, PruneSpec, prune_tensor
from lifelong_delta.delta.sharded import is_sharded, local_range, prune_local_shard_
from lifelong_delta.delta.stats import tensor_prune_stats

__all__ = ["DeltaPruning"]

When = Literal["fit_end", "validate", "test"]


class DeltaPruning(pl.Callback):
    """Prune ``θ − θ_ref`` of the LightningModule's floating tensors, in place, once per callback.

    Args:
        p: Drop rate in [0, 1).
        method: ``dare`` | ``darex-q`` | ``magnitude`` | ``structural``, or a method added with
            :func:`~lifelong_delta.delta.methods.register_method` (not one that needs calibration activations, such
            as ``wanda``: use ``lifelong-delta prune --method wanda`` on the saved model).
        q: DAREx-q rescale (kept entries ×1/q); required by ``darex-q``.
        seed: Mask seed.
        exclude: ``fnmatch`` globs over ``state_dict`` names left unchanged (e.g. ``"head.*"``).
        reference: Pretrained weights: a Hugging Face model directory or ``.safetensors`` file, or a
            :class:`~lifelong_delta.anchors.ParameterAnchor` whose θ* is read when pruning, not copied (e.g. the
            ``PretrainedAnchor`` that ``AdamR(anchor=...)`` pulls toward, so the run holds θ_pre once). ``None``:
            a copy of the module's weights at ``on_fit_start`` (then ``on`` must be ``"fit_end"``, or a fit must
            have run first with this callback in the same process).
        reference_prefix: Prefix that turns a reference tensor name into a ``state_dict`` name, e.g. ``"model."``
            when the LightningModule keeps the pretrained network in ``self.model`` (or the anchor was snapshotted
            on ``self.model``).
        on: When to prune: at the end of ``fit``, or at the start of ``lightning validate`` / ``lightning test``.
        rescale: ``none`` | ``dare`` | ``q`` (default per method).
        structural_axis: ``rows`` | ``columns`` (structural only).
        force: Allow ``q`` outside ``[1 − p, 1]``.

    Raises:
        ValueError: an argument is invalid (the message names it).
    """

    def __init__(
        self,
        p: float,
        method: str = "dare",
        q: float | None = None,
        seed: int = 0,
        exclude: Sequence[str] = (),
        reference: str | ParameterAnchor | None = None,
        reference_prefix: str = "",
        on: When = "fit_end",
        rescale: RescaleName | None = None,
        structural_axis: Literal["rows", "columns"] = "rows",
        force: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"DeltaPruning(method={method!r}): choose one of {sorted(METHODS)}")
        if METHODS[method].needs_input_norms:
            raise ValueError(
                f"DeltaPruning(method={method!r}) needs calibration activations, which a callback does "
                "not collect; use method='magnitude', or prune the saved model with "
                f"`lifelong-delta prune --method {method} --calib_data FILE`"
            )
        if on not in ("fit_end", "validate", "test"):
            raise ValueError(f"DeltaPruning(on={on!r}): choose 'fit_end', 'validate' or 'test'")
        if isinstance(exclude, str):
            raise ValueError(f"DeltaPruning(exclude={exclude!r}) must be a list of patterns, e.g. [{exclude!r}]")
        if reference is not None and not isinstance(reference, (str, ParameterAnchor)):
            raise TypeError(
                f"DeltaPruning(reference=...) must be a path or a ParameterAnchor, got {type(reference).__name__}"
            )
        if isinstance(reference, str) and not Path(reference).exists():
            raise ValueError(
                f"DeltaPruning(reference={reference!r}): path not found; give the pretrained model's "
                "directory or .safetensors file, or None to snapshot the weights at fit start"
            )
        self.spec = PruneSpec(
            method=method,
            p=p,
            q=q,
            rescale=rescale,
            structural_axis=structural_axis,
            seed=seed,
            exclude=tuple(exclude),
            force=force,
        )
        if self.spec.lacks_q:
            raise ValueError(f"DeltaPruning(method={method!r}) needs q (1-p <= q <= 1), e.g. q=0.2 for p=0.9")
        self.reference = reference
        self.reference_prefix = reference_prefix
        self.on = on
        self.kept_fraction: float | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._done = False

    # --------------------------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference is None and self._snapshot is None:
            self._snapshot = {n: t.detach().to("cpu", copy=True) for n, t in self._targets(pl_module).items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "fit_end":
            self._run(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "validate" and trainer.state.fn == TrainerFn.VALIDATING:
            self._run(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "test" and trainer.state.fn == TrainerFn.TESTING:
            self._run(trainer, pl_module)

    # -------------------------------------------------------------------------------------------------- runner
    def _targets(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The module's floating, non-excluded state-dict tensors, in state-dict order (shared storage)."""
        return {
            n: t
            for n, t in pl_module.state_dict(keep_vars=False).items()
            if t.is_floating_point() and not is_excluded(n, self.spec.exclude)
        }

    def _reference(self) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor], Callable[[], None]]:
        """``({state-dict name: reference shape}, load(name), close())`` without reading any tensor yet."""
        if isinstance(self.reference, ParameterAnchor):
            refs, prefix = self.reference.reference, self.reference_prefix
            if not refs:
                raise ValueError(
                    f"DeltaPruning: the reference {type(self.reference).__name__} has no θ* yet; "
                    "snapshot it (or build the AdamR that anchors it) before pruning"
                )
            return {prefix + n: tuple(t.shape) for n, t in refs.items()}, lambda n: refs[n[len(prefix) :]], lambda: None
        if self.reference is None:
            if self._snapshot is None:
                raise ValueError(
                    f"DeltaPruning(on={self.on!r}) has no pretrained weights: pass reference=PATH "
                    "(no fit ran in this process to snapshot them)"
                )
            snap = self._snapshot
            return {n: tuple(t.shape) for n, t in snap.items()}, snap.__getitem__, lambda: None
        reader, prefix = CheckpointReader(self.reference), self.reference_prefix
        shapes = {prefix + r: reader.shape(r) for r in reader.names()}
        return shapes, lambda n: reader.get(n[len(prefix) :]), reader.close

    @torch.no_grad()
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:
            return
        targets = self._targets(pl_module)
        shapes, load, close = self._reference()
        try:
            names = [n for n in targets if n in shapes]
            if not names:
                raise ValueError(
                    "DeltaPruning: no tensor of the model is in the reference"
                    + (f" {self.reference} (check reference_prefix)" if self.reference is not None else "")
                )
            for name in names:  # checked on every rank before any work, so no rank waits on a failed one
                if shapes[name] != tuple(targets[name].shape):
                    raise ValueError(
                        f"DeltaPruning: tensor {name!r} has shape {list(targets[name].shape)} but "
                        f"{list(shapes[name])} in the reference; add it to exclude"
                    )
            counts = self._prune_share(names, targets, load, trainer.world_size, trainer.global_rank)
        finally:
            close()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for i, name in enumerate(names):
                if not is_sharded(targets[name]):  # a sharded parameter was pruned in place on every rank
                    torch.distributed.broadcast(targets[name], src=i % trainer.world_size)
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        before, after = float(counts[0]), float(counts[1])
        self.kept_fraction = after / before if before else 1.0
        self._done = True
        skipped = len(targets) - len(names)
        rank_zero_info(
            f"DeltaPruning: {self.spec.method} p={self.spec.p:g} on {len(names)} tensors (kept fraction "
            f"{self.kept_fraction:.4f}" + (f", {skipped} not in the reference)" if skipped else ")")
        )

    def _prune_share(
        self,
        names: list[str],
        targets: dict[str, torch.Tensor],
        load: Callable[[str], torch.Tensor],
        world: int,
        rank: int,
    ) -> torch.Tensor:
        """Prune this rank's share (tensor ``i`` belongs to rank ``i % world``; every rank prunes its shard of a
        sharded parameter) IN PLACE, on the tensor's device.

        Returns:
            ``[nnz before, nnz after]`` of the delta over this rank's tensors and shards (float64).
        """
        counts = torch.zeros(2, dtype=torch.float64)
        for i, name in enumerate(names):
            param = targets[name]
            if is_sharded(param):
                stats = prune_local_shard_(name, param, load(name), self.spec)
                if rank == 0 or local_range(param)[1] < param.numel():  # a replicated one is counted once
                    counts += torch.tensor([stats.nnz_before, stats.nnz_after], dtype=torch.float64)
                continue
            if i % world != rank:
                continue
            current = param.detach()  # pruned where it lives (a GPU tensor stays there), one tensor at a time
            ref = load(name).to(current.device)
            merged = prune_tensor(name, ref, current, self.spec)
            stats = tensor_prune_stats(name, ref, current, merged)
            counts += torch.tensor([stats.nnz_before, stats.nnz_after], dtype=torch.float64)
            param.copy_(merged)
        return counts
