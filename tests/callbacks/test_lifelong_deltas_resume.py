"""LifelongDeltas across a resumed fit and on two DDP processes: the banks, packs and metrics of one stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lifelong_delta.anchors import PretrainedAnchor
from lifelong_delta.callbacks import LifelongDeltas
from lifelong_delta.continual import ClassIncrementalDataModule, ContinualModule
from lifelong_delta.delta.dare import dare_merge

TINY_VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
TRAINED = ["blocks.*.attn.qkv.*", "head.*"]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Killed(Exception):
    pass


class _Kill(L.Callback):
    """Stops the fit at the start of ``epoch``, as a killed job would (the previous epoch's checkpoint is saved)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise _Killed


def _fit(
    root: Path,
    name: str,
    epochs_per_task: int = 1,
    kill_at: int | None = None,
    ckpt_path: Path | None = None,
    check_val_every_n_epoch: int = 1,
    extra: tuple[L.Callback, ...] = (),
    **kwargs,
) -> tuple[L.Trainer, LifelongDeltas]:
    """A 3-task stream with LifelongDeltas and a checkpoint per epoch in ``root/name/ckpt``."""
    L.seed_everything(0, verbose=False)
    module = ContinualModule(backbone_kwargs=TINY_VIT, trainable=TRAINED, epochs_per_task=epochs_per_task)
    data = ClassIncrementalDataModule(
        dataset="digits",
        n_tasks=3,
        classes_per_task=2,
        val_fraction=0.2,
        batch_size=16,
        eval_batch_size=64,
        max_per_class=40,
    )
    callback = LifelongDeltas(**{"p": [0.0, 0.9], "q": "unlabelled", "seed": 7, **kwargs})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=check_val_every_n_epoch,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(root, name=name, version=0),
        callbacks=[
            ModelCheckpoint(dirpath=root / name / "ckpt", filename="{epoch}", save_top_k=-1),
            *extra,
            callback,
            *([] if kill_at is None else [_Kill(kill_at)]),
        ],
    )
    if kill_at is None:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(_Killed):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, callback


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run per (epochs per task, validation interval)."""
    root, runs = tmp_path_factory.mktemp("uninterrupted"), {}

    def run(epochs_per_task: int, check_val_every_n_epoch: int = 1) -> tuple[Path, LifelongDeltas]:
        key = (epochs_per_task, check_val_every_n_epoch)
        if key not in runs:
            name = f"e{epochs_per_task}v{check_val_every_n_epoch}"
            _, callback = _fit(root, name, epochs_per_task, check_val_every_n_epoch=check_val_every_n_epoch)
            runs[key] = (root / name / "version_0", callback)
        return runs[key]

    return run


@pytest.mark.parametrize(
    ("epochs_per_task", "check_val_every_n_epoch", "resume_epoch", "stored"),
    [(1, 1, 0, [0]), (2, 1, 2, [0]), (2, 2, 1, [])],
    ids=["at-task-boundary", "mid-task", "saved-at-validation-end"],
)
def test_a_killed_and_resumed_stream_equals_an_uninterrupted_one(
    tmp_path: Path, uninterrupted, epochs_per_task: int, check_val_every_n_epoch: int, resume_epoch: int, stored
) -> None:
    """Killed in task 1 of 3, resumed from the last checkpoint. With validation every 2 epochs the checkpoint is
    saved at validation end, before task 0 is packed: the resumed fit runs that epoch's end again and replaces the
    pack the killed fit left."""
    full_dir, full = uninterrupted(epochs_per_task, check_val_every_n_epoch)
    _fit(tmp_path, "killed", epochs_per_task, kill_at=resume_epoch + 1, check_val_every_n_epoch=check_val_every_n_epoch)
    ckpt = tmp_path / "killed" / "ckpt" / f"epoch={resume_epoch}.ckpt"
    work = tmp_path / "killed" / "version_0" / "task_deltas"
    assert sorted(torch.load(ckpt, weights_only=False)["callbacks"]["LifelongDeltas"]["head_rows"]) == stored
    assert [f.name for f in work.glob("p0/task*.delta")] == ["task0.delta"]

    _, resumed = _fit(
        tmp_path, "resumed", epochs_per_task, ckpt_path=ckpt, check_val_every_n_epoch=check_val_every_n_epoch
    )
    # the resumed run continues in the killed run's folder, and ends with the uninterrupted run's packs and metrics
    assert resumed._work == work
    assert _files(work) == _files(full_dir / "task_deltas")
    assert (tmp_path / "resumed" / "version_0" / "lifelong_metrics.json").read_text() == (
        full_dir / "lifelong_metrics.json"
    ).read_text()
    assert resumed.metrics["tasks"] == 3 and resumed.banks[0.9].names == ["task0", "task1", "task2"]
    for n, v in full.anchor.reference.items():
        assert torch.equal(resumed.anchor.reference[n], v), n


def test_resuming_from_the_streams_last_checkpoint_evaluates_the_same(tmp_path: Path, uninterrupted) -> None:
    full_dir, _ = uninterrupted(1)
    packs = _files(full_dir / "task_deltas")
    _, again = _fit(tmp_path, "again", ckpt_path=full_dir.parent / "ckpt" / "epoch=2.ckpt")  # nothing left to train
    assert again.metrics is not None and _files(full_dir / "task_deltas") == packs
    metrics = tmp_path / "again" / "version_0" / "lifelong_metrics.json"
    assert metrics.read_text() == (full_dir / "lifelong_metrics.json").read_text()


def test_a_missing_pack_or_state_stops_the_resume_in_one_line(tmp_path: Path) -> None:
    _fit(tmp_path, "killed", kill_at=1)
    ckpt = tmp_path / "killed" / "ckpt" / "epoch=0.ckpt"
    pack = tmp_path / "killed" / "version_0" / "task_deltas" / "p0.9" / "task0.delta"
    hidden = pack.with_name("moved")
    pack.rename(hidden)
    with pytest.raises(FileNotFoundError, match=r"task 0 has no pack at p = 0\.9: .*task0\.delta is missing"):
        _fit(tmp_path, "resumed", ckpt_path=ckpt)
    hidden.rename(pack)

    with pytest.raises(ValueError, match=r"LifelongDeltas\(p=\[0\.0, 0\.99\]\).*p = \[0\.0, 0\.9\]"):
        _fit(tmp_path, "other_p", ckpt_path=ckpt, p=[0.0, 0.99])

    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint["callbacks"]["LifelongDeltas"]
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    with pytest.raises(ValueError, match="holds no LifelongDeltas state"):
        _fit(tmp_path, "stateless", ckpt_path=tmp_path / "stateless.ckpt")

    # a fresh run does not write over another run's packs
    with pytest.raises(ValueError, match=r"task0\.delta holds another run's pack"):
        _fit(tmp_path, "fresh", out_dir=str(tmp_path / "killed" / "version_0" / "task_deltas"))


class _AnchorOwner(L.Callback):
    """Owns a PretrainedAnchor given to LifelongDeltas(anchor=...), as AdamR or the module would: anchors it at fit
    start (a no-op once anchored) and keeps it in the checkpoint; ``restores=False`` forgets to load it back."""

    def __init__(self, anchor: PretrainedAnchor, restores: bool) -> None:
        self.anchor, self.restores = anchor, restores

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.anchor.snapshot_(module.net)

    def state_dict(self) -> dict:
        return self.anchor.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self.restores:
            self.anchor.load_state_dict(state_dict)


def test_a_given_anchor_is_restored_by_its_owner_and_checked_against_the_packs(tmp_path: Path, uninterrupted) -> None:
    """Killed mid-task (a checkpoint at a task boundary holds θ_pre in the model, hiding a lost anchor)."""
    full_dir, _ = uninterrupted(2)

    def fit(name: str, restores: bool = True, **kwargs) -> LifelongDeltas:
        anchor = PretrainedAnchor(include=["blocks.*.attn.qkv.*"])
        return _fit(tmp_path, name, 2, anchor=anchor, extra=(_AnchorOwner(anchor, restores),), **kwargs)[1]

    fit("killed", kill_at=3)
    ckpt = tmp_path / "killed" / "ckpt" / "epoch=2.ckpt"
    assert torch.load(ckpt, weights_only=False)["callbacks"]["LifelongDeltas"]["reference"] is None  # held once
    fit("resumed", ckpt_path=ckpt)
    assert _files(tmp_path / "killed" / "version_0" / "task_deltas") == _files(full_dir / "task_deltas")
    assert (tmp_path / "resumed" / "version_0" / "lifelong_metrics.json").read_text() == (
        full_dir / "lifelong_metrics.json"
    ).read_text()

    # not restored, the anchor takes the resumed (trained) weights as θ_pre: the packs' base says otherwise
    with pytest.raises(ValueError, match=r"θ_pre of 'blocks\.0\.attn\.qkv\.weight' is not the base in .*base"):
        fit("unrestored", restores=False, ckpt_path=ckpt)
    with pytest.raises(ValueError, match=r"anchor=\.\.\.\) was given in the checkpoint's run"):
        _fit(tmp_path, "own_anchor", 2, ckpt_path=ckpt)


class BankDump(L.Callback):
    """Listed before LifelongDeltas: records the delta's parameters at every task's end (before the reset), and
    after fit writes ``banks_rank{r}.pt`` in ``out_dir``: those, θ_pre, every bank's tasks applied to the model, the
    records and the metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.trained: list[dict[str, torch.Tensor]] = []

    def _lifelong(self, trainer: L.Trainer) -> LifelongDeltas:
        return next(c for c in trainer.callbacks if isinstance(c, LifelongDeltas))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        params = dict(module.net.named_parameters())
        self.trained.append({n: params[n].detach().clone() for n in self._lifelong(trainer).names})

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        callback, params = self._lifelong(trainer), dict(module.net.named_parameters())
        banks = {}
        for p, bank in callback.banks.items():
            for name in bank.names:
                with bank.use(name):
                    banks[p, name] = {n: params[n].detach().clone() for n in callback.names}
        state = {
            "trained": self.trained,
            "reference": dict(callback.anchor.reference),
            "banks": banks,
            "records": callback.records,
            "metrics": callback.metrics,
        }
        torch.save(state, self.out_dir / f"banks_rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_two_ddp_processes_end_with_rank_zeros_packs_and_equal_banks(tmp_path: Path) -> None:
    """``lightning fit`` of configs/lifelong_deltas.yaml on a tiny stream with 2 gloo processes. DDP splits every
    batch between the ranks, so the numbers are not a single process's; what holds: rank 0 packs the weights the
    ranks trained (equal on both), and both ranks read those packs into equal banks and get equal metrics."""
    tiny = tmp_path / "tiny.yaml"
    vit = {**TINY_VIT, "class_token": False, "global_pool": "avg"}
    tiny.write_text(
        f"""
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  enable_progress_bar: false
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: ddp}}}}
  callbacks:
    - class_path: tests.callbacks.test_lifelong_deltas_resume.BankDump
      init_args: {{out_dir: {tmp_path}}}
    - class_path: lifelong_delta.callbacks.LifelongDeltas
      init_args: {{p: [0.0, 0.9], q: unlabelled, seed: 7, calib_batches: 2}}
model:
  init_args:
    pretrained: false
    backbone_kwargs: {vit}
    trainable: {TRAINED}
data:
  init_args: {{dataset: digits, n_tasks: 2, classes_per_task: 2, max_per_class: 32,
               batch_size: 8, eval_batch_size: 64, val_fraction: 0.2, max_eval_per_class: null}}
"""
    )
    configs = [ROOT / "configs" / "cl_eval" / "mnist" / "base.yaml", ROOT / "configs" / "lifelong_deltas.yaml", tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT)
    lightning = Path(sys.executable).parent / "lightning"
    args = [str(lightning), "fit", *(a for c in configs for a in ("-c", str(c)))]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MEMBER: 2/2" in run.stdout + run.stderr

    dumps = [torch.load(tmp_path / f"banks_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key in ("trained", "reference", "banks"):
        assert _equal(dumps[0][key], dumps[1][key]), key
    assert dumps[0]["records"] == dumps[1]["records"] and dumps[0]["metrics"] == dumps[1]["metrics"]
    written = list(tmp_path.glob("ddp/version_*/lifelong_metrics.json"))
    assert len(written) == 1 and json.loads(written[0].read_text()) == dumps[0]["metrics"]  # rank 0 writes, once

    # the packs hold what rank 0 trained: the dense bank gives it back, the pruned one its DARE at the task's q
    dump, pre = dumps[0], dumps[0]["reference"]
    assert len(dump["trained"]) == 2 and dump["metrics"]["tasks"] == 2
    for t in range(2):
        q = dump["records"][0.9][t]["q"]
        for n, trained in dump["trained"][t].items():
            assert torch.equal(dump["banks"][0.0, f"task{t}"][n], trained), (t, n)
            expected = dare_merge(pre[n], trained, 0.9, seed=7 + t, name=n, q=q)
            assert torch.equal(dump["banks"][0.9, f"task{t}"][n], expected), (t, n)
        assert not torch.equal(dump["trained"][t][n], pre[n])  # the task trained the delta's parameters


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b
