"""LifelongDeltas: per-task packed deltas against θ_pre, checked against brute force on a tiny stream."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lifelong_delta.callbacks import LifelongDeltas
from lifelong_delta.continual import ClassIncrementalDataModule, ContinualModule
from lifelong_delta.delta.dare import dare_merge
from lifelong_delta.delta.darex import select_q_grid

TINY_VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
TRAINED = ["blocks.*.attn.qkv.*", "head.*"]
QKV = [f"blocks.{b}.attn.qkv.{k}" for b in range(2) for k in ("weight", "bias")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Record(L.Callback):
    """Records the delta's parameters at each task's start and end (before LifelongDeltas resets them)."""

    def __init__(self) -> None:
        self.start: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []

    def _params(self, module: ContinualModule) -> dict[str, torch.Tensor]:
        named = dict(module.net.named_parameters())
        return {n: named[n].detach().clone() for n in [*QKV, "head.weight", "head.bias"]}

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start.append(self._params(module))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.end.append(self._params(module))


def _fit(
    tmp_path: Path, callback: LifelongDeltas, n_tasks: int = 3
) -> tuple[ContinualModule, _Record, ClassIncrementalDataModule]:
    L.seed_everything(0, verbose=False)
    record = _Record()
    module = ContinualModule(backbone_kwargs=TINY_VIT, trainable=TRAINED, epochs_per_task=1)
    data = ClassIncrementalDataModule(
        dataset="digits",
        n_tasks=n_tasks,
        classes_per_task=2,
        val_fraction=0.2,
        batch_size=16,
        eval_batch_size=64,
        max_per_class=40,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=n_tasks,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[record, callback],
    )
    trainer.fit(module, datamodule=data)
    return module, record, data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("lifelong")
    callback = LifelongDeltas(p=[0.0, 0.9], q="unlabelled", seed=7)
    module, record, data = _fit(tmp, callback)
    return tmp, callback, module, record, data


def test_each_task_trains_from_the_pretrained_weights(run) -> None:
    _, callback, module, record, _ = run
    pre = callback.anchor.reference
    for t in range(3):
        for n in QKV:
            assert torch.equal(record.start[t][n], pre[n]), (t, n)  # reset after every task
        assert not torch.equal(record.end[t][QKV[0]], pre[QKV[0]])  # and the task did train it
    final = dict(module.net.named_parameters())
    for n in QKV:  # the model is left as fit left it (θ_pre after the reset), evaluation undone
        assert torch.equal(final[n], pre[n])


def test_the_dense_bank_restores_each_task_bit_for_bit(run) -> None:
    _, callback, module, record, _ = run
    bank, params = callback.banks[0.0], dict(module.net.named_parameters())
    for t in range(3):
        with bank.use(f"task{t}"):
            for n in QKV:
                assert torch.equal(params[n], record.end[t][n]), (t, n)


def test_the_pruned_bank_is_prunes_dare_with_the_tasks_seed_and_q(run) -> None:
    _, callback, module, record, _ = run
    bank, params, pre = callback.banks[0.9], dict(module.net.named_parameters()), callback.anchor.reference
    for t in range(3):
        q = callback.records[0.9][t]["q"]
        assert 0.1 <= q <= 1.0
        with bank.use(f"task{t}"):
            for n in QKV:
                expected = dare_merge(pre[n], record.end[t][n], 0.9, seed=7 + t, name=n, q=q)
                assert torch.equal(params[n], expected), (t, n)


def test_grid_q_minimises_the_tasks_loss_on_its_training_batches(tmp_path: Path) -> None:
    callback = LifelongDeltas(p=[0.9], q="grid", seed=3, calib_batches=2)
    module, record, data = _fit(tmp_path, callback, n_tasks=2)
    net, tasks = module.net, module._tasks
    pre, params = callback.anchor.reference, dict(module.net.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    net.eval()
    for t, cls in enumerate(tasks):
        batches = list(data.task_dataloader(t, "train", shuffle=False))[:2]

        def loss(q: float, t: int = t, cls: range = cls, batches: list = batches) -> float:
            with torch.no_grad():
                for n in ("head.weight", "head.bias"):
                    params[n].copy_(record.end[t][n])
                for n in QKV:
                    params[n].copy_(dare_merge(pre[n], record.end[t][n], 0.9, seed=3 + t, name=n, q=q))
                return float(
                    torch.stack(
                        [
                            torch.nn.functional.cross_entropy(net(x)[:, cls.start : cls.stop], y - cls.start)
                            for x, y in batches
                        ]
                    ).mean()
                )

        expected = select_q_grid(loss, 0.9, mode="min")
        assert callback.records[0.9][t]["q"] == expected.q, (t, expected.table)
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v)


def _brute_force(
    module: ContinualModule, data: ClassIncrementalDataModule, thetas: list[dict[str, torch.Tensor]]
) -> tuple[float, float]:
    """Task-IL and class-IL accuracy by loading each task's weights into the model, sample by sample."""
    net, tasks = module.net, module._tasks
    params = dict(net.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    xs, ys = zip(*[(x, y) for loader in data.val_dataloader() for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    scores = []
    net.eval()
    with torch.no_grad():
        for t, cls in enumerate(tasks):
            for n, v in thetas[t].items():
                params[n].copy_(v)
            logits = net(x)[:, cls.start : cls.stop]
            scores.append((torch.sigmoid(logits).amax(1), logits.argmax(1) + cls.start))
        for n, v in saved.items():
            params[n].copy_(v)
    own = torch.tensor([next(t for t, c in enumerate(tasks) if int(label) in c) for label in y])
    task_il = torch.stack([scores[int(t)][1][i] for i, t in enumerate(own)]) == y
    conf = torch.stack([s[0] for s in scores])  # [tasks, samples]
    pick = conf.argmax(0)  # first task on a tie, as the callback (strictly better replaces)
    class_il = torch.stack([scores[int(t)][1][i] for i, t in enumerate(pick)]) == y
    return float(task_il.double().mean()), float(class_il.double().mean())


def test_task_and_class_incremental_accuracy_match_brute_force(run) -> None:
    tmp, callback, module, record, data = run
    head = {"head.weight": record.end[-1]["head.weight"], "head.bias": record.end[-1]["head.bias"]}
    thetas = [{**{n: record.end[t][n] for n in QKV}, **head} for t in range(3)]
    task_il, class_il = _brute_force(module, data, thetas)
    got = callback.metrics["by_p"]["0"]
    assert got["task_il_accuracy"] == pytest.approx(task_il, abs=1e-12)
    assert got["class_il_accuracy"] == pytest.approx(class_il, abs=1e-12)
    assert got["task_il_accuracy"] > 0.5  # above chance on two-class tasks
    written = json.loads((tmp / "run" / "version_0" / "lifelong_metrics.json").read_text())
    assert written["by_p"]["0.9"] == callback.metrics["by_p"]["0.9"]
    assert written["forward_passes_per_sample"] == {"task_il": 1, "class_il": 3}


def test_bytes_per_task_counts_the_pack_and_the_heads_rows(run) -> None:
    tmp, callback, *_ = run
    dense, pruned = callback.metrics["by_p"]["0"], callback.metrics["by_p"]["0.9"]
    head_rows = 2 * (32 + 1) * 4
    packs = tmp / "run" / "version_0" / "task_deltas"
    for p, m in (("0", dense), ("0.9", pruned)):
        files = [f for t in range(3) for f in (packs / f"p{p}" / f"task{t}.delta").rglob("*") if f.is_file()]
        assert m["bytes_per_task"] == pytest.approx(sum(f.stat().st_size for f in files) / 3 + head_rows)
    qkv_bytes = 2 * (32 * 96 + 96) * 4
    assert dense["dense_bytes_per_task"] == qkv_bytes + head_rows
    assert pruned["bytes_per_task"] < 0.3 * dense["bytes_per_task"]


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"drop rates in \[0, 1\)"):
        LifelongDeltas(p=[1.0])
    with pytest.raises(ValueError, match="repeats"):
        LifelongDeltas(p=[0.9, 0.9])
    with pytest.raises(ValueError, match=r"\[1 - p, 1\]"):
        LifelongDeltas(p=[0.9], q=0.05)
    with pytest.raises(ValueError, match="confidence"):
        LifelongDeltas(confidence="vote")
    with pytest.raises(ValueError, match="'unlabelled', 'grid', 'dare'"):
        LifelongDeltas(q="labelled")


def test_only_the_head_training_is_refused(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    module = ContinualModule(backbone_kwargs=TINY_VIT, trainable=["head.*"])
    data = ClassIncrementalDataModule(
        dataset="digits", n_tasks=2, classes_per_task=2, val_fraction=0.2, max_per_class=10
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[LifelongDeltas()],
    )
    with pytest.raises(ValueError, match="backbone parameters that train"):
        trainer.fit(module, datamodule=data)
