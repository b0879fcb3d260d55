"""Run by tests/callbacks/test_delta_pruning.py: fit + prune at fit end, then validate + prune vs a reference.

Usage: python _ddp_script.py OUT_DIR {single,ddp}, or ``run(out_dir, mode)`` in-process. For ``ddp`` the test starts
both ranks itself (``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` set, as torchrun does), so the two processes import in
parallel instead of Lightning's launcher re-running the script after rank 0 has imported everything. Rank 0 writes
OUT_DIR/fit.safetensors (the model pruned at fit end against the fit-start snapshot) and OUT_DIR/validate.safetensors (a
second model pruned at the start of ``validate`` against OUT_DIR/reference.safetensors). The training loss ignores the
batch, so DDP's gradient average of identical gradients equals the single-process gradient and the trained weights agree
bit for bit.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from lifelong_delta.callbacks import DeltaPruning


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(self.x), self.y)

    def validation_step(self, batch, batch_idx):
        self.log("val", torch.nn.functional.mse_loss(self.net(self.x), self.y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test", torch.nn.functional.mse_loss(self.net(self.x), self.y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(out: Path, mode: str) -> None:
    data = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2)
    kwargs = (
        {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
        if mode == "ddp"
        else {"accelerator": "cpu", "devices": 1}
    )
    fit_cb = DeltaPruning(p=0.6, method="dare", seed=11, exclude=["net.2.bias"])
    val_cb = DeltaPruning(
        p=0.5,
        method="darex-q",
        q=0.7,
        seed=5,
        reference=str(out / "reference.safetensors"),
        reference_prefix="net.",
        on="validate",
    )
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[fit_cb, val_cb],
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **kwargs,
    )
    model = Tiny()
    trainer.fit(model, data, data)
    assert trainer.world_size == (2 if mode == "ddp" else 1), trainer.world_size
    if trainer.is_global_zero:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "fit.safetensors")
        print("KEPT", fit_cb.kept_fraction, flush=True)
    second = Tiny()
    second.load_state_dict(torch.load(out / "finetuned.pt"))
    trainer.validate(second, data)
    if trainer.is_global_zero:
        save_file({k: v.contiguous() for k, v in second.state_dict().items()}, out / "validate.safetensors")


if __name__ == "__main__":
    from lifelong_delta.cli import close_process_group

    try:
        run(Path(sys.argv[1]), sys.argv[2])
    finally:
        close_process_group()  # a gloo group alive at exit can abort the process
