"""DeltaPruning: argument validation, fit-end / validate / test pruning, and 2-process gloo DDP == 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from lifelong_delta.anchors import L2Anchor, PretrainedAnchor
from lifelong_delta.callbacks import DeltaPruning
from lifelong_delta.delta.methods import PruneSpec, prune_tensor
from lifelong_delta.optim import AdamR
from tests.callbacks._ddp_script import Tiny, run

SCRIPT = Path(__file__).with_name("_ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        limit_test_batches=1,
        **kwargs,
    )


def _data() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.0}, r"p=1\.0 is outside \[0, 1\)"),
        ({"p": 0.5, "method": "nope"}, "method='nope'.*choose one of"),
        ({"p": 0.5, "method": "wanda"}, "needs calibration activations"),
        ({"p": 0.5, "method": "darex-q"}, "needs q"),
        ({"p": 0.9, "method": "darex-q", "q": 0.01}, "below 1-p"),
        ({"p": 0.5, "on": "predict"}, "on='predict'.*'fit_end', 'validate' or 'test'"),
        ({"p": 0.5, "exclude": "head.*"}, r"must be a list of patterns, e\.g\. \['head\.\*'\]"),
        ({"p": 0.5, "reference": "/no/such/model"}, "reference='/no/such/model'.*not found"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaPruning(**kwargs)


def test_fit_end_prunes_against_fit_start_snapshot():
    plain = Tiny()
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    _trainer([]).fit(plain, _data())
    cb = DeltaPruning(p=0.7, seed=2, exclude=["net.0.bias"])
    pruned = Tiny()
    _trainer([cb]).fit(pruned, _data())
    spec = PruneSpec("dare", 0.7, seed=2)
    trained, got = plain.state_dict(), pruned.state_dict()
    for name in ("net.0.weight", "net.2.weight", "net.2.bias"):
        assert torch.equal(got[name], prune_tensor(name, init[name], trained[name], spec)), name
    assert torch.equal(got["net.0.bias"], trained["net.0.bias"])  # excluded
    assert not torch.equal(got["net.0.weight"], trained["net.0.weight"])
    assert 0.15 < cb.kept_fraction < 0.45


def test_validate_and_test_prune_once_against_reference(tmp_path):
    ref = Tiny()
    save_file(
        {k[len("net.") :]: v.contiguous() for k, v in ref.state_dict().items() if k.startswith("net.")},
        tmp_path / "ref.safetensors",
    )
    ft = Tiny()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1)
    ft_sd = {k: v.clone() for k, v in ft.state_dict().items()}
    cb = DeltaPruning(
        p=0.5,
        method="darex-q",
        q=0.8,
        reference=str(tmp_path / "ref.safetensors"),
        reference_prefix="net.",
        on="validate",
    )
    trainer = _trainer([cb])
    trainer.validate(ft, _data())
    trainer.validate(ft, _data())  # a second validate does not prune again
    spec = PruneSpec("darex-q", 0.5, q=0.8)
    for name, value in ft.state_dict().items():
        if name.startswith("net."):
            assert torch.equal(value, prune_tensor(name, ref.state_dict()[name], ft_sd[name], spec)), name
    assert torch.equal(ft.state_dict()["steps"], ft_sd["steps"])

    test_cb = DeltaPruning(p=0.5, reference=str(tmp_path / "ref.safetensors"), reference_prefix="net.", on="test")
    other = Tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    trainer = _trainer([test_cb])
    trainer.validate(other, _data())
    assert torch.equal(other.state_dict()["net.0.weight"], ft_sd["net.0.weight"])  # not on validate
    trainer.test(other, _data())
    assert not torch.equal(other.state_dict()["net.0.weight"], ft_sd["net.0.weight"])


def test_on_validate_does_not_prune_during_fit_validation():
    cb = DeltaPruning(p=0.9, on="validate")
    model = Tiny()
    _trainer([cb]).fit(model, _data(), _data())
    assert cb.kept_fraction is None


def test_validate_without_reference_or_fit_is_an_error():
    with pytest.raises(ValueError, match="pass reference=PATH"):
        _trainer([DeltaPruning(p=0.5, on="validate")]).validate(Tiny(), _data())


def test_reference_with_no_matching_names(tmp_path):
    save_file({"other": torch.zeros(2)}, tmp_path / "ref.safetensors")
    cb = DeltaPruning(p=0.5, reference=str(tmp_path / "ref.safetensors"), on="test")
    with pytest.raises(ValueError, match="no tensor of the model is in the reference.*reference_prefix"):
        _trainer([cb]).test(Tiny(), _data())


def test_reference_shape_mismatch_names_the_tensor(tmp_path):
    save_file({"0.weight": torch.zeros(16, 7)}, tmp_path / "ref.safetensors")
    cb = DeltaPruning(p=0.5, reference=str(tmp_path / "ref.safetensors"), reference_prefix="net.", on="test")
    model = Tiny()
    before = model.state_dict()["net.0.weight"].clone()
    with pytest.raises(ValueError, match=r"tensor 'net\.0\.weight' has shape \[16, 6\] but \[16, 7\]"):
        _trainer([cb]).test(model, _data())
    assert torch.equal(model.state_dict()["net.0.weight"], before)


class AdamRTiny(Tiny):
    """``Tiny`` trained by AdamR toward ``anchor`` (anchored when the optimiser is built)."""

    def __init__(self, anchor: PretrainedAnchor) -> None:
        super().__init__()
        self.anchor = anchor

    def configure_optimizers(self):
        return AdamR(self.named_parameters(), lr=0.05, reg=0.5, anchor=self.anchor)


def _reference_bytes(*holders: object) -> int:
    """Bytes of the distinct storages of the reference tensors reachable from ``holders`` (through attributes,
    dicts, lists and tuples), skipping the zero-stride ω = 1 views of a unit-importance anchor."""
    seen: dict[int, int] = {}
    stack, visited = list(holders), set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 1 or any(obj.stride()):
                seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, (PretrainedAnchor, DeltaPruning)):
            stack.extend(vars(obj).values())
    return sum(seen.values())


def test_anchor_reference_is_held_once_by_adamr_the_anchor_and_the_callback():
    """AdamR pulls toward the anchor's θ_pre and DeltaPruning prunes against the same tensors: one copy in memory
    (the default set-up, AdamR's own anchor and the callback's fit-start copy, holds two)."""
    anchor = PretrainedAnchor()
    cb = DeltaPruning(p=0.7, seed=2, exclude=["net.0.bias"], reference=anchor)
    model = AdamRTiny(anchor)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, torch.Tensor] = {}

    class Spy(pl.Callback):  # what the callback reads, one tensor at a time, while it prunes
        def on_fit_end(self, trainer, pl_module):
            shapes, load, _close = cb._reference()
            seen.update({n: load(n) for n in shapes})

    trainer = _trainer([Spy(), cb])
    trainer.fit(model, _data())
    opt = trainer.optimizers[0]
    assert opt.anchor is anchor and cb._snapshot is None
    ptrs = {
        "adamr": {p.data_ptr() for p in opt.pretrained.values()},
        "anchor": {t.data_ptr() for t in anchor.reference.values()},
        "adamr state": {t.data_ptr() for t in opt.state_dict()["anchor"]["reference"].values()},
        "callback": {t.data_ptr() for t in seen.values()},
    }
    assert len(ptrs["anchor"]) == 4 and all(v == ptrs["anchor"] for v in ptrs.values()), ptrs
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert _reference_bytes(anchor, cb, opt.pretrained, seen) == param_bytes  # θ_pre once, pull cache included
    for name in ("net.0.weight", "net.2.weight", "net.2.bias"):  # pruned against θ_pre, the weights at fit start
        assert torch.equal(anchor.reference[name], init[name])
        assert not torch.equal(model.state_dict()[name], init[name])
    assert 0.15 < cb.kept_fraction < 0.45

    own_cb = DeltaPruning(p=0.7, seed=2)
    trainer = _trainer([own_cb])
    trainer.fit(AdamRTiny(PretrainedAnchor()), _data())
    assert _reference_bytes(trainer.optimizers[0].anchor, own_cb) == 2 * param_bytes


def test_anchor_reference_prunes_like_the_fit_start_snapshot():
    """The same run pruned against the shared anchor and against the callback's own copy: the same weights."""
    own = AdamRTiny(PretrainedAnchor())
    _trainer([DeltaPruning(p=0.7, seed=2)]).fit(own, _data())
    anchor = PretrainedAnchor()
    shared = AdamRTiny(anchor)
    _trainer([DeltaPruning(p=0.7, seed=2, reference=anchor)]).fit(shared, _data())
    for name, value in own.state_dict().items():
        assert torch.equal(value, shared.state_dict()[name]), name


def test_anchor_reference_with_a_prefix_and_errors():
    anchor = PretrainedAnchor()
    model = Tiny()
    anchor.snapshot_(model.net)  # names '0.weight', ...: the state dict says 'net.0.weight'
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    cb = DeltaPruning(p=0.5, reference=anchor, reference_prefix="net.", on="test")
    _trainer([cb]).test(model, _data())
    spec = PruneSpec("dare", 0.5)
    for name in ("net.0.weight", "net.2.bias"):
        ref = anchor.reference[name[len("net.") :]]
        assert torch.equal(model.state_dict()[name], prune_tensor(name, ref, tuned[name], spec))
    with pytest.raises(ValueError, match="no tensor of the model is in the reference.*check reference_prefix"):
        _trainer([DeltaPruning(p=0.5, reference=anchor, on="test")]).test(Tiny(), _data())
    with pytest.raises(ValueError, match="L2Anchor has no θ\\* yet"):
        _trainer([DeltaPruning(p=0.5, reference=L2Anchor(), on="test")]).test(Tiny(), _data())
    with pytest.raises(TypeError, match="must be a path or a ParameterAnchor"):
        DeltaPruning(p=0.5, reference={"net.0.weight": torch.zeros(16, 6)})


def _run_ddp(out: Path) -> None:
    """Start both ranks of a 2-process gloo DDP run of the script (as torchrun would)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), str(out), "ddp"],
                env=env,
                cwd=out,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]


@pytest.mark.ddp
def test_ddp_two_gloo_processes_bit_identical_to_one(tmp_path):
    ref = Tiny()
    ft = Tiny()
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for mode in ("single", "ddp"):
        d = tmp_path / mode
        d.mkdir()
        save_file(
            {k[len("net.") :]: v.contiguous() for k, v in ref.state_dict().items() if k.startswith("net.")},
            d / "reference.safetensors",
        )
        torch.save(ft.state_dict(), d / "finetuned.pt")
    run(tmp_path / "single", "single")
    _run_ddp(tmp_path / "ddp")
    for stage in ("fit", "validate"):
        one, two = (
            load_file(tmp_path / "single" / f"{stage}.safetensors"),
            load_file(tmp_path / "ddp" / f"{stage}.safetensors"),
        )
        assert one.keys() == two.keys()
        for k in one:
            assert torch.equal(one[k], two[k]), (stage, k)
    # the validate stage is the reference prune of the given fine-tuned weights
    got = load_file(tmp_path / "ddp" / "validate.safetensors")
    spec = PruneSpec("darex-q", 0.5, q=0.7, seed=5)
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        assert torch.equal(got[name], prune_tensor(name, ref.state_dict()[name], ft.state_dict()[name], spec))
    fit = load_file(tmp_path / "ddp" / "fit.safetensors")
    assert (fit["net.0.weight"] == ref.state_dict()["net.0.weight"]).float().mean() > 0.4  # ~60% dropped
