"""``LifelongDeltas``: a continual learner that never forgets a learned task, at about 1 % of a model per task.

The two halves of the framework meet here. A :class:`~lifelong_delta.anchors.PretrainedAnchor` holds θ_pre, the
pretrained values of the parameters a :class:`~lifelong_delta.continual.ContinualModule` trains (its backbone
part; the head is handled below). At the end of each task ``t`` the callback

1. takes the task's delta ``δ_t = θ_t − θ_pre`` of those parameters;
2. prunes it with DAREx-q at each drop rate ``p`` (``p = 0``: the dense delta, θ_t stored whole), the mask seeded by
   ``seed + t`` and q chosen per :attr:`LifelongDeltas.q` on a few of the task's own training batches: without labels,
   minimising the change of the pooled features (:func:`~lifelong_delta.delta.darex.select_q_unlabelled`), or with
   them, minimising the task's loss (the paper's grid q);
3. packs it (:func:`~lifelong_delta.delta.pack.stream_pack`: the kept values only; the mask comes back from the
   seed), keeps the head rows of the task's classes, and adds the pack to a
   :class:`~lifelong_delta.delta.bank.DeltaBank` of task deltas;
4. resets the parameters to θ_pre, so that the next task trains from the pretrained model (``reset``).

At the end of fit, on the validation data of every task (the split the module's accuracy matrix uses):

* **task-incremental** accuracy (task id given): the samples of task ``t`` go through the model with task
  ``t``'s delta swapped in and are classified among task ``t``'s classes; one forward pass per sample;
* **class-incremental** accuracy (no task id): every sample goes through the model once per task delta, and the
  prediction of the most confident task wins. Confidence is the highest sigmoid of the task's classes
  (``max_sigmoid``, default, matching the BCE head), or the lowest entropy of the softmax over them (``entropy``).
  That costs ``T`` forward passes per sample for ``T`` tasks, which ``lifelong_metrics.json`` reports next to the
  accuracy of the task inference itself.

Both go to ``lifelong_metrics.json`` in the run's log directory and to the trainer's loggers
(``lifelong/p<p>/task_il_accuracy``, ...). The head stays shared: with ``mask_past_logits`` (the module's default)
task ``t`` trains only its own classes' rows, and the callback stores those rows per task anyway, so a head
changed later (weight decay, another loss) is put back before evaluation. Their bytes count in
``bytes_per_task``, with the pack's files.

The callback's state travels in Lightning checkpoints (:meth:`LifelongDeltas.state_dict`), so ``fit(ckpt_path=...)``
continues the stream: θ_pre, the stored tasks' head rows and records, and the work folder come back, and the stored
tasks' packs are read back from that folder into fresh banks. Under DDP rank 0 writes the packs and every rank reads
them after a barrier, so all ranks hold the same banks and compute the same metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lifelong_delta import outputs
from lifelong_delta.anchors.pretrained import PretrainedAnchor
from lifelong_delta.callbacks.lifelong_deltas_metrics import Confidence, evaluate_bank, mean_or_nan, select_q_by_loss

__all__ = ["LifelongDeltas", "pack_bytes"]

QRule = Literal["unlabelled", "grid", "dare"]
METRICS_FILE = "lifelong_metrics.json"
BASE_FILE = "base.safetensors"
_STATE_VERSION = 1


def pack_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a pack directory takes on disk (its files' sizes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _p_label(p: float) -> str:
    return f"{p:g}"


class LifelongDeltas(pl.Callback):
    """Per-task packed deltas of a :class:`~lifelong_delta.continual.ContinualModule`, swapped in for evaluation.

    Args:
        p: Drop rates; one bank of task deltas per value. ``0`` keeps the dense delta (every value, packed).
        q: The DAREx-q rescale of the kept values (×1/q): a number in ``[1 − p, 1]`` for every task,
            ``"unlabelled"`` (per task, the q on a grid over ``[1 − p, 1]`` that keeps the pooled features of
            ``calib_batches`` of the task's training batches closest to the unpruned model's), ``"grid"`` (per task,
            the q on that grid with the lowest cross-entropy over the task's classes on those batches, labels used:
            the paper's DAREx-q with the training data the task already has), or ``"dare"`` (``q = 1 − p``).
        seed: Mask seed; task ``t`` draws with ``seed + t``.
        confidence: How class-incremental evaluation picks the task: ``max_sigmoid`` or ``entropy``.
        calib_batches: Training batches of the task for ``q: unlabelled`` and ``q: grid``.
        reset: Put the trained parameters back to θ_pre after packing a task, so each delta holds one task.
        out_dir: Where the packs go (``<work>/p<p>/task<t>.delta``); default ``task_deltas`` in the run's log
            directory.
        anchor: The :class:`~lifelong_delta.anchors.PretrainedAnchor` holding θ_pre (shared with an optimiser
            that pulls toward it, e.g. AdamR); default: one made when training starts, from the parameters that
            train. A given anchor is not saved in the callback's checkpoint state: its owner restores it (AdamR's or
            the module's state, or the reference it was built with), and a resumed fit checks it against the base
            the packs were made against.

    Resume: the checkpoint holds θ_pre (of the callback's own anchor), the delta's parameter names, the work folder
    and, per stored task, its head rows, q and bytes. A resumed fit reads the stored tasks' packs back from
    ``out_dir`` if given, else from the folder the interrupted fit wrote, and replaces the packs of later tasks.
    """

    def __init__(
        self,
        p: Sequence[float] | float = (0.0, 0.99),
        q: float | QRule = "unlabelled",
        seed: int = 0,
        confidence: Confidence = "max_sigmoid",
        calib_batches: int = 4,
        reset: bool = True,
        out_dir: str | None = None,
        anchor: PretrainedAnchor | None = None,
    ) -> None:
        super().__init__()
        ps = [p] if isinstance(p, (int, float)) else list(p)
        if not ps or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0 for x in ps):
            raise ValueError(f"LifelongDeltas(p={p!r}): give drop rates in [0, 1), e.g. [0, 0.99] (0: dense)")
        if len(set(ps)) != len(ps):
            raise ValueError(f"LifelongDeltas(p={p!r}) repeats a drop rate")
        if isinstance(q, str):
            if q not in ("unlabelled", "grid", "dare"):
                raise ValueError(f"LifelongDeltas(q={q!r}): use 'unlabelled', 'grid', 'dare' or a number in [1 - p, 1]")
        elif isinstance(q, bool) or not all(1.0 - x <= q <= 1.0 for x in ps if x > 0):
            raise ValueError(f"LifelongDeltas(q={q!r}) must lie in [1 - p, 1] for every p in {ps}")
        if confidence not in ("max_sigmoid", "entropy"):
            raise ValueError(f"LifelongDeltas(confidence={confidence!r}): use 'max_sigmoid' or 'entropy'")
        if isinstance(calib_batches, bool) or calib_batches < 1:
            raise ValueError(f"LifelongDeltas(calib_batches={calib_batches!r}) must be an integer >= 1")
        self.ps = [float(x) for x in ps]
        self.q, self.seed, self.confidence = q, int(seed), confidence
        self.calib_batches, self.reset, self.out_dir = int(calib_batches), reset, out_dir
        self.anchor = anchor
        self._owns_anchor = anchor is None
        self.names: list[str] = []  # the delta's parameters (trainable, not the head)
        self.banks: dict[float, Any] = {}  # p -> DeltaBank
        self.head_rows: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # task -> (first class, head rows)
        self.records: dict[float, dict[int, dict[str, float]]] = {}  # p -> task -> q, bytes
        self.metrics: dict[str, Any] | None = None
        self._work: Path | None = None
        self._resume: dict[str, Any] | None = None  # a checkpoint's state, applied when training starts

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not at fit start: a resumed fit has restored the model, its anchors and the optimiser (AdamR's
        # anchor) by now, whatever the strategy's restore order
        self._setup(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = pl_module.epochs_per_task
        if (trainer.current_epoch + 1) % every == 0:
            self._store_task(trainer, pl_module, trainer.current_epoch // every)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resume is not None:  # resumed from the stream's last checkpoint: nothing left to train
            self._setup(trainer, pl_module)
        if not self.head_rows:
            return
        self.metrics = self.evaluate(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    f"lifelong/p{p}/{k}": v
                    for p, m in self.metrics["by_p"].items()
                    for k, v in m.items()
                    if isinstance(v, float)
                },
                step=trainer.global_step,
            )
        path = Path(trainer.log_dir or trainer.default_root_dir) / METRICS_FILE  # log_dir: a collective under DDP
        if trainer.is_global_zero:
            outputs.write_file(path, (json.dumps(self.metrics, indent=1) + "\n").encode())
            lines = [
                f"  p={p}: task-IL {m['task_il_accuracy']:.4f}, class-IL {m['class_il_accuracy']:.4f}, "
                f"{m['bytes_per_task'] / 1024:.1f} KiB/task ({100 * m['bytes_fraction']:.2f} % of dense)"
                for p, m in self.metrics["by_p"].items()
            ]
            print("\n".join([f"LifelongDeltas: wrote {path}", *lines]), flush=True)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs, the packs aside (they stay in the work folder): θ_pre (``None`` for a given
        anchor, which its owner restores), the delta's parameter names, the work folder, and per stored task its
        head rows and records. Empty before training starts."""
        if self._resume is not None:
            return self._resume
        if self._work is None:
            return {}
        return {
            "version": _STATE_VERSION,
            "p": list(self.ps),
            "names": list(self.names),
            "work": str(self._work),
            "reference": {n: self._reference(n) for n in self.names} if self._owns_anchor else None,
            "head_rows": {
                t: (start, {n: r.cpu() for n, r in rows.items()}) for t, (start, rows) in self.head_rows.items()
            },
            "records": {p: {t: dict(r) for t, r in rec.items()} for p, rec in self.records.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's :meth:`state_dict` for the resumed fit; it is applied when training starts."""
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"LifelongDeltas: unknown checkpoint state version {state_dict.get('version')!r}")
        if [float(p) for p in state_dict["p"]] != self.ps:
            raise ValueError(
                f"LifelongDeltas(p={self.ps}): the checkpoint's run packed at p = {state_dict['p']}; resume with its p"
            )
        if (state_dict["reference"] is None) == self._owns_anchor:
            given = "was given" if state_dict["reference"] is None else "was not given"
            raise ValueError(f"LifelongDeltas(anchor=...) {given} in the checkpoint's run; resume with the same")
        self._resume = state_dict

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in checkpoint.get("callbacks", {}):
            raise ValueError(
                "LifelongDeltas: the checkpoint holds no LifelongDeltas state (its run had no such callback), so "
                "θ_pre and the earlier tasks' deltas are unknown; start the stream afresh"
            )

    # --------------------------------------------------------------------------------------------- set-up
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Name the delta's parameters, fix θ_pre and the work folder, and make the banks: empty, or holding the
        packs of the tasks the checkpoint's run stored."""
        net = _net(pl_module)
        state, self._resume = self._resume, None
        head = {id(p) for p in net.get_classifier().parameters()}
        self.names = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in head]
        if not self.names:
            raise ValueError(
                "LifelongDeltas needs backbone parameters that train (model.init_args.trainable), "
                "e.g. ['blocks.*.attn.qkv.*', 'head.*']; only the head trains now"
            )
        if state is None:
            if self._owns_anchor:
                self.anchor = PretrainedAnchor(include=self.names)
                self.anchor.snapshot_(net)
            self.head_rows, self.records = {}, {p: {} for p in self.ps}
            work = Path(trainer.log_dir or trainer.default_root_dir) / "task_deltas"
        else:
            self._restore(state, net)
            work = Path(state["work"])
        missing = [n for n in self.names if n not in self.anchor.reference]
        if missing:
            raise ValueError(
                f"LifelongDeltas(anchor=...) has no reference for trained parameter {missing[0]!r} "
                f"({len(missing)} missing); include every parameter that trains"
            )
        self._work = Path(self.out_dir).absolute() if self.out_dir else work.absolute()
        outputs.check_can_create(self._work, option="LifelongDeltas(out_dir)")
        if state is None:
            old = next(self._work.glob("p*/task*.delta"), None)
            if old is not None:
                raise ValueError(
                    f"LifelongDeltas(out_dir): {old} holds another run's pack; use an empty folder, or resume "
                    "that run with ckpt_path"
                )
        base = self._work / BASE_FILE
        if trainer.is_global_zero and (state is None or not base.is_file()):
            self._work.mkdir(parents=True, exist_ok=True)
            _save(base, {n: self._reference(n) for n in self.names})
        trainer.strategy.barrier()
        from lifelong_delta.delta.bank import DeltaBank

        self.banks = {p: DeltaBank(net) for p in self.ps}
        if state is not None:
            self._check_base(base)
            self._add_stored_packs(net)

    def _restore(self, state: dict[str, Any], net: torch.nn.Module) -> None:
        """θ_pre (of the callback's own anchor), head rows and records from a checkpoint's state."""
        if state["names"] != self.names:
            raise ValueError(
                f"LifelongDeltas: the checkpoint's run trained {len(state['names'])} backbone tensors "
                f"({state['names'][0]!r}, ...), this model {len(self.names)} ({self.names[0]!r}, ...); resume "
                "with the run's model.init_args.trainable"
            )
        if state["reference"] is not None:
            device = next(net.parameters()).device
            reference = {n: t.to(device) for n, t in state["reference"].items()}
            self.anchor = PretrainedAnchor.from_reference(reference, include=self.names)
        self.head_rows = {int(t): (int(start), dict(rows)) for t, (start, rows) in state["head_rows"].items()}
        self.records = {float(p): {int(t): dict(r) for t, r in rec.items()} for p, rec in state["records"].items()}

    def _check_base(self, base: Path) -> None:
        """Raises ValueError unless θ_pre equals the base the work folder's packs were made against."""
        from safetensors.torch import load_file

        stored = load_file(base)
        for n in self.names:
            if n not in stored or not torch.equal(stored[n], self._reference(n)):
                raise ValueError(
                    f"LifelongDeltas: θ_pre of {n!r} is not the base in {base} that the packs were made against; "
                    "resume with the run's anchor and its restored state"
                )

    @torch.no_grad()
    def _add_stored_packs(self, net: torch.nn.Module) -> None:
        """Read the stored tasks' packs into the banks; the model holds θ_pre meanwhile, as a bank requires."""
        paths = {(p, t): self._pack_path(p, t) for t in sorted(self.head_rows) for p in self.ps}
        for (p, t), path in paths.items():
            if not path.is_dir():
                raise FileNotFoundError(
                    f"LifelongDeltas: the checkpoint's task {t} has no pack at p = {_p_label(p)}: {path} is missing "
                    "(out_dir=... where the packs are, if they moved)"
                )
        params = dict(net.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        self._load_reference(net)
        try:
            for (p, t), path in paths.items():
                self.banks[p].add(f"task{t}", path)
        finally:
            for n, v in saved.items():
                params[n].copy_(v)
        rank_zero_info(f"LifelongDeltas: resumed with tasks {sorted(self.head_rows)} from {self._work}")

    # --------------------------------------------------------------------------------------------- storing
    def _reference(self, name: str) -> torch.Tensor:
        return self.anchor.reference[name].detach().cpu()

    @torch.no_grad()
    def _store_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        from lifelong_delta.delta.methods import PruneSpec
        from lifelong_delta.delta.pack import stream_pack

        net, work = _net(pl_module), self._work
        assert work is not None
        params = dict(net.named_parameters())
        trained = {n: params[n].detach().cpu().clone() for n in self.names}
        classes = pl_module._tasks[t]
        self.head_rows[t] = (
            classes.start,
            {n: p.detach()[classes.start : classes.stop].clone() for n, p in net.get_classifier().named_parameters()},
        )
        ft = work / f"task{t}.safetensors"
        qs = self._choose_qs(pl_module, t, trained)
        if trainer.is_global_zero:
            _save(ft, trained)
            try:
                for p in self.ps:
                    spec = (
                        PruneSpec("darex-q", p, q=qs[p], seed=self.seed + t)
                        if p > 0
                        else PruneSpec("dare", 0.0, exclude=("*",))
                    )  # every tensor stored whole: θ_t exactly
                    # a pack of this task left by an interrupted run is replaced
                    stream_pack(work / BASE_FILE, ft, self._pack_path(p, t), spec, overwrite=True, progress=False)
            finally:
                ft.unlink(missing_ok=True)
        trainer.strategy.barrier()
        self._load_reference(net)  # a bank checks its base when a pack is added
        head_bytes = _nbytes(self.head_rows[t][1].values())
        for p in self.ps:
            self.banks[p].add(f"task{t}", self._pack_path(p, t))
            self.records[p][t] = {"q": qs[p], "bytes": float(pack_bytes(self._pack_path(p, t)) + head_bytes)}
        if not self.reset:
            for n in self.names:
                params[n].copy_(trained[n])
        rank_zero_info(
            f"LifelongDeltas: task {t} packed at p = {', '.join(map(_p_label, self.ps))} "
            f"(q = {', '.join(f'{qs[p]:.4g}' for p in self.ps)})"
        )

    @torch.no_grad()
    def _load_reference(self, net: torch.nn.Module) -> None:
        """Write θ_pre into the delta's parameters (in place)."""
        params = dict(net.named_parameters())
        for n in self.names:
            params[n].copy_(self.anchor.reference[n])

    def _pack_path(self, p: float, t: int) -> Path:
        assert self._work is not None
        return self._work / f"p{_p_label(p)}" / f"task{t}.delta"

    def _choose_qs(self, pl_module: pl.LightningModule, t: int, trained: dict[str, torch.Tensor]) -> dict[float, float]:
        """The rescale q of task ``t``'s delta at every drop rate."""
        if not isinstance(self.q, str):
            return {p: (float(self.q) if p > 0 else 1.0) for p in self.ps}
        if self.q == "dare" or all(p == 0 for p in self.ps):
            return {p: 1.0 - p for p in self.ps}
        from lifelong_delta.continual.backbones import features_and_logits
        from lifelong_delta.delta.darex import MaskedDelta, select_q_unlabelled

        net, classes = _net(pl_module), pl_module._tasks[t]
        base = {n: self._reference(n) for n in self.names}
        loader = pl_module.trainer.datamodule.task_dataloader(t, "train", shuffle=False)
        batches = []
        for x, y in loader:
            batches.append((x.to(pl_module.device), y.to(pl_module.device) - classes.start))
            if len(batches) == self.calib_batches:
                break
        qs = {}
        for p in self.ps:
            if p == 0:
                qs[p] = 1.0
                continue
            masked = MaskedDelta.build(base, trained, p, seed=self.seed + t)
            if self.q == "unlabelled":
                xs = [x for x, _ in batches]
                qs[p] = select_q_unlabelled(net, masked, xs, lambda m, x: features_and_logits(m, x)[0]).q
            else:
                qs[p] = select_q_by_loss(net, masked, batches, classes, p)
        return qs

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Task- and class-incremental accuracy of every bank on the validation data of the stored tasks.

        The model is left as it was (the delta's parameters and the head are restored afterwards).
        """
        net, dm = _net(pl_module), pl_module.trainer.datamodule
        tasks = [pl_module._tasks[t] for t in sorted(self.head_rows)]
        loaders = dm.val_dataloader()[: len(tasks)]
        if not loaders:
            raise ValueError("LifelongDeltas evaluates on the validation data: use val_fraction > 0")
        params = dict(net.named_parameters())
        classifier = dict(net.get_classifier().named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        saved_head = {n: p.detach().clone() for n, p in classifier.items()}
        was_training = net.training
        net.eval()
        try:
            self._load_reference(net)
            for start, rows in self.head_rows.values():
                for n, r in rows.items():
                    classifier[n][start : start + r.shape[0]].copy_(r)
            by_p = {
                _p_label(p): evaluate_bank(
                    self.banks[p], self.records[p], net, tasks, loaders, pl_module.device, self.confidence
                )
                for p in self.ps
            }
        finally:
            for n, v in saved.items():
                params[n].copy_(v)
            for n, v in saved_head.items():
                classifier[n].copy_(v)
            net.train(was_training)
        dense = _nbytes(self.anchor.reference[n] for n in self.names)
        head = mean_or_nan([_nbytes(rows.values()) for _, rows in self.head_rows.values()])
        for m in by_p.values():
            m["dense_bytes_per_task"] = float(dense + head)
            m["bytes_fraction"] = m["bytes_per_task"] / m["dense_bytes_per_task"]
        return {
            "tasks": len(tasks),
            "confidence": self.confidence,
            "q_rule": self.q,
            "seed": self.seed,
            "forward_passes_per_sample": {"task_il": 1, "class_il": len(tasks)},
            "by_p": by_p,
        }


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _net(pl_module: pl.LightningModule) -> torch.nn.Module:
    net = getattr(pl_module, "net", None)
    if net is None or not hasattr(pl_module, "_tasks") or not hasattr(pl_module, "epochs_per_task"):
        raise TypeError(f"LifelongDeltas works with a ContinualModule, got {type(pl_module).__name__}")
    return net


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    outputs.write_file(path, save({n: t.contiguous() for n, t in tensors.items()}))
