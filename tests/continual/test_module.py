"""ContinualModule: masking, trainable patterns, the task-boundary life cycle and the loss composition."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from lifelong_delta.anchors import EWCAnchor, L2Anchor
from lifelong_delta.continual import ClassIncrementalDataModule, ContinualModule
from lifelong_delta.continual.backbones import features_and_logits, read_state_dict

TINY_VIT = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _module(**kwargs) -> ContinualModule:
    kwargs.setdefault("backbone_kwargs", TINY_VIT)
    return ContinualModule(**kwargs)


def _attach(module: ContinualModule, epoch: int, n_tasks: int = 3, per_task: int = 2) -> None:
    """Stand-in trainer for unit tests of training_step: only ``current_epoch`` is read."""
    module._trainer = SimpleNamespace(current_epoch=epoch)
    module._tasks = [range(t * per_task, (t + 1) * per_task) for t in range(n_tasks)]
    module.log = module.log_dict = lambda *a, **k: None


# -------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("mask_past_logits", [True, False])
def test_masking_limits_gradients_to_the_trained_classes(mask_past_logits: bool) -> None:
    m = _module(num_classes=6, mask_past_logits=mask_past_logits)
    _attach(m, epoch=1)  # task 1: classes 2, 3
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([2, 3, 3, 2, 2])
    loss = m.training_step((x, y), 0)

    logits = m.net(x)
    active = slice(2, 4) if mask_past_logits else slice(0, 4)
    target = F.one_hot(y, 6).float()
    expected = F.binary_cross_entropy_with_logits(logits[:, active], target[:, active])  # brute force
    torch.testing.assert_close(loss, expected)

    loss.backward()
    row_grad = m.net.head.weight.grad.abs().sum(1)
    assert torch.all(row_grad[4:] == 0)  # future classes: never in the loss
    assert torch.all(row_grad[2:4] > 0)
    if mask_past_logits:
        assert torch.all(row_grad[:2] == 0)  # past classes masked
    else:
        assert torch.all(row_grad[:2] > 0)


def test_ce_loss_masks_past_classes() -> None:
    m = _module(num_classes=6, loss="ce")
    _attach(m, epoch=2)  # task 2: classes 4, 5
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([4, 5, 5, 4])
    loss = m.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(m.net(x)[:, 4:6], y - 4))


# ------------------------------------------------------------------------------------------------ trainable
def test_trainable_patterns_freeze_the_rest() -> None:
    patterns = ["blocks.0.attn.qkv.*", "head.*"]
    m = _module(num_classes=4, trainable=patterns)
    flags = {n: p.requires_grad for n, p in m.net.named_parameters()}
    assert flags == {n: any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in flags}
    assert sorted(n for n, f in flags.items() if f) == [
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.qkv.weight",
        "head.bias",
        "head.weight",
    ]
    m._trainer = SimpleNamespace(num_training_batches=float("inf"), accumulate_grad_batches=1)
    opt = m.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_bad_patterns_and_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="trainable pattern 'blocks.9.*'"):
        _module(num_classes=4, trainable=["blocks.9.*"])
    with pytest.raises(ValueError, match="match no parameter"):
        _module(num_classes=4, anchors=[L2Anchor(include=["nope.*"])])
    with pytest.raises(ValueError, match="epochs_per_task"):
        _module(epochs_per_task=0)
    with pytest.raises(ValueError, match="pred_kd"):
        _module(pred_kd=-1.0)


# -------------------------------------------------------------------------------------------------- weights
def test_local_checkpoint_loads_all_but_the_head(tmp_path: Path) -> None:
    src = _module(num_classes=10)
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.net.state_dict().items()}}, tmp_path / "ck.pt")
    dst = _module(num_classes=6, pretrained=str(tmp_path / "ck.pt"))
    for name, value in dst.net.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 6
        else:
            assert torch.equal(value, src.net.state_dict()[name]), name
    assert set(read_state_dict(tmp_path / "ck.pt")) == set(src.net.state_dict())

    # a head of the right shape belongs to another label space: fresh by default, kept on request
    torch.save(src.net.state_dict(), tmp_path / "same.pt")
    fresh = _module(num_classes=10, pretrained=str(tmp_path / "same.pt"))
    kept = _module(num_classes=10, pretrained=str(tmp_path / "same.pt"), pretrained_head=True)
    assert not torch.equal(fresh.net.head.weight, src.net.head.weight)
    assert torch.equal(kept.net.head.weight, src.net.head.weight)
    assert torch.equal(fresh.net.blocks[0].attn.qkv.weight, src.net.blocks[0].attn.qkv.weight)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        _module(num_classes=6, pretrained=str(tmp_path / "missing.safetensors"))
    wider = {**TINY_VIT, "embed_dim": 64}
    with pytest.raises(ValueError, match="does not fit the backbone"):
        ContinualModule(num_classes=6, backbone_kwargs=wider, pretrained=str(tmp_path / "ck.pt"))


# ----------------------------------------------------------------------------------------------- life cycle
class _Probe(L.Callback):
    """Records at each step what the module holds, and re-computes the loss by brute force before backward."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.end_of_task: dict[int, dict[str, torch.Tensor]] = {}
        self.batch = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch = batch
        opt = trainer.optimizers[0]
        self.steps.append(
            {
                "task": module.current_task,
                "teacher": module._teacher is not None,
                "snapshots": [a.num_snapshots for a in module.anchors],
                "lr": opt.param_groups[0]["lr"],
                "fresh_optimizer": len(opt.state) == 0,
            }
        )

    def on_before_backward(self, trainer, module, loss) -> None:
        expected = _brute_force_loss(module, self.batch)
        self.steps[-1]["loss_matches"] = bool(torch.allclose(loss, expected, atol=1e-6))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.end_of_task[module.current_task] = {k: v.clone() for k, v in module.net.state_dict().items()}


@torch.no_grad()
def _brute_force_loss(m: ContinualModule, batch) -> torch.Tensor:
    x, y = batch
    t = m.current_task
    cur = m._tasks[t]
    feats, logits = features_and_logits(m.net, x)
    onehot = F.one_hot(y, logits.shape[1]).float()
    active = slice(cur.start, cur.stop)
    loss = F.binary_cross_entropy_with_logits(logits[:, active], onehot[:, active])
    if t > 0:
        t_feats, t_logits = features_and_logits(m._teacher, x)
        past = slice(0, cur.start)
        T = m.kd_temperature
        loss = loss + m.pred_kd * F.binary_cross_entropy(
            torch.sigmoid(logits[:, past] / T), torch.sigmoid(t_logits[:, past] / T)
        )
        loss = loss + m.feat_kd * ((feats - t_feats) ** 2).mean()
    params = dict(m.net.named_parameters())
    for a in m.anchors:
        omega = a.importance
        for name, ref in a.reference.items():
            loss = loss + a.strength * (omega[name] * (params[name] - ref) ** 2).sum()
    return loss


def test_task_boundaries_consolidate_anchors_teacher_and_restart_the_optimizer(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    dm = ClassIncrementalDataModule(
        dataset="digits",
        n_tasks=3,
        classes_per_task=2,
        val_fraction=0.2,
        batch_size=16,
        max_per_class=100,
        max_eval_per_class=16,
    )
    anchors = [
        L2Anchor(include=["blocks.*.attn.qkv.*", "head.*"], strength=3.0),
        EWCAnchor(include=["blocks.0.*"], strength=50.0, accumulate="online", gamma=0.5),
    ]
    # two epochs per task: one epoch (13 steps) of a scratch ViT leaves some seeds at chance on task 0
    m = _module(
        pred_kd=1.5,
        feat_kd=0.7,
        anchors=anchors,
        trainable=["blocks.*", "head.*"],
        epochs_per_task=2,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    probe = _Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(m, dm)
    assert trainer.max_epochs == 6  # n_tasks * epochs_per_task, set by the module

    by_task = {t: [s for s in probe.steps if s["task"] == t] for t in range(3)}
    assert all(by_task.values())
    # KD teacher and anchors only after task 0; one consolidation per boundary
    assert [s["teacher"] for s in by_task[0]] == [False] * len(by_task[0])
    assert all(s["teacher"] for s in by_task[1] + by_task[2])
    assert {tuple(s["snapshots"]) for s in by_task[1]} == {(1, 1)}
    assert {tuple(s["snapshots"]) for s in by_task[2]} == {(2, 2)}
    # the loss is cls + λ_kd·PredKD + λ_feat·FeatKD + Σ strength·Σω(θ−θ*)², step by step
    assert all(s["loss_matches"] for s in probe.steps)
    # optimizer and cosine schedule restart at every task
    for t in range(3):
        assert by_task[t][0]["fresh_optimizer"] and by_task[t][0]["lr"] == pytest.approx(3e-3)
        assert not any(s["fresh_optimizer"] for s in by_task[t][1:])  # not at the task's second epoch
        assert by_task[t][-1]["lr"] < 3e-3
    # the anchors and the teacher hold the weights of the end of the previous task
    for name, ref in anchors[0].reference.items():
        assert torch.equal(ref, probe.end_of_task[1][name])
    for name, value in m._teacher.state_dict().items():
        assert torch.equal(value, probe.end_of_task[1][name])

    # logged terms: PredKD / penalties only after task 0; accuracy matrix written with its keys
    lines = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), r.split(","))) for r in lines[1:]]
    logged = {"train/pred_kd", "train/feat_kd", "train/penalty0", "train/penalty1", "val/acc_task2"}
    assert logged <= set(header)
    kd_tasks = {float(r["task"]) for r in rows if r.get("train/pred_kd")}
    assert kd_tasks == {1.0, 2.0}
    metrics = json.loads((Path(trainer.log_dir) / "cl_metrics.json").read_text())
    R = metrics["accuracy_matrix"]
    assert [len(r) for r in R] == [3, 3, 3] and R[0][1] is None and R[2][2] is not None
    assert metrics["average_accuracy"] == pytest.approx(
        sum(r * n for r, n in zip(R[2], dm.task_sizes("val"))) / sum(dm.task_sizes("val"))
    )
    assert (Path(trainer.log_dir) / "accuracy_matrix.png").is_file()
    assert R[0][0] > 0.6  # task 0 is learned (two digit classes)

    # `test` evaluates every task on the test split
    results = trainer.test(m, dm, verbose=False)[0]
    assert {f"test/acc_task{j}" for j in range(3)} | {"test/acc_seen"} <= set(results)


# ------------------------------------------------------------------------------------------------- pretrain
def test_random_affine_is_seeded_and_the_identity_without_jitter() -> None:
    from lifelong_delta.continual.pretrain import random_affine

    x = torch.full((3, 1, 12, 12), -1.0)
    x[:, :, 4:8, 5:7] = 1.0
    torch.testing.assert_close(random_affine(x, degrees=0.0, scale=0.0, shift_px=0.0), x)
    torch.manual_seed(1)
    a = random_affine(x)
    torch.manual_seed(1)
    assert torch.equal(a, random_affine(x)) and not torch.equal(a, x)
    assert not torch.equal(a[0], a[1])  # each image draws its own transform
    shifted = random_affine(x[:1], degrees=0.0, scale=0.0, shift_px=1e-6)
    torch.testing.assert_close(shifted, x[:1], atol=1e-4, rtol=0)


def test_pretrain_caches_once_and_the_module_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lifelong_delta.continual.pretrain import pretrain

    options = dict(
        dataset="digits",
        cache_dir=str(tmp_path),
        name="tiny",
        epochs=1,
        batch_size=32,
        embed_dim=16,
        depth=1,
        num_heads=2,
        patch_size=4,
        img_size=8,
        max_per_class=30,
    )
    out = Path(pretrain(**options))
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_kwargs"]["img_size"] == 8 and 0.0 <= config["test_accuracy"] <= 1.0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert Path(pretrain(**options)) == out  # idempotent: nothing retrained
    assert capsys.readouterr().out.strip() == f"cached at {out}"
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directories left behind
    capsys.readouterr()
    pretrain(**{**options, "depth": 2})  # other options: the stale entry is retrained, not silently reused
    assert "trained with other options (backbone_kwargs): retraining" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["backbone_kwargs"]["depth"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    pretrain(**options)

    from lifelong_delta.continual.probe import probe

    first = probe(pretrained=str(out), dataset="digits", n_tasks=2, classes_per_task=2, max_per_class=60)
    assert first["joint_linear_probe"] > 0.5  # 4 digit classes, chance 0.25: even weak features separate them
    assert 0.0 <= first["per_task_heads_average_accuracy"] <= 1.0
    assert probe(pretrained=str(out), dataset="digits", n_tasks=2, classes_per_task=2, max_per_class=60) == first
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        probe(pretrained=str(tmp_path / "nowhere"))

    m = ContinualModule(num_classes=4, pretrained=str(out))  # the architecture comes from config.json
    weights = read_state_dict(out)
    assert torch.equal(m.net.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    assert m.net.head.weight.shape == (4, 16)
