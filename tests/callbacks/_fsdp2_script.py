"""Run by tests/callbacks/test_fsdp2_lightning.py: ``DeltaPruning`` at fit end under Lightning's FSDP2 strategy.

Usage: ``python _fsdp2_script.py OUT_DIR``, once per rank, with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` set
(as torchrun does), so Lightning does not re-launch the script. ``configure_model`` applies ``fully_shard`` to
every layer and to the root, so each parameter is a ``Shard(0)`` DTensor on the 2-rank ``data_parallel`` mesh;
row counts of 7, 9 and 1 split 4/3, 5/4 and 1/0 over the ranks. The batch norm's running statistics are buffers,
which ``fully_shard`` leaves as plain tensors, so the callback's replicated path (one rank prunes, then broadcasts)
runs in the same fit.

For each of DARE and DAREx-q a fresh model is fitted for a few steps and pruned at fit end: DARE against the
callback's snapshot at fit start (DTensors: each rank reads its own shard), DAREx-q against
OUT_DIR/reference.safetensors (written by the test: full tensors, each rank slices its shard's range out of them).
Rank 0 saves to OUT_DIR/fsdp2.pt, per method, the full tensors (``DTensor.full_tensor()``) at fit start, at fit
end before pruning and after pruning, with the callback's kept fraction and each tensor's placements.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lifelong_delta.callbacks import DeltaPruning

EXCLUDE = ("fc2.bias",)
RUNS = {  # method name: DeltaPruning keyword arguments (and whether the reference is OUT_DIR/reference.safetensors)
    "dare": ({"p": 0.6, "method": "dare", "seed": 11}, False),
    "darex-q": ({"p": 0.5, "method": "darex-q", "q": 0.7, "seed": 5}, True),
}


class Tiny(pl.LightningModule):
    """Three linear layers and a batch norm. The loss ignores the batch, so every rank sees the same inputs and the
    batch norm's running statistics (plain tensors, not sharded) agree on every rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(5, 7)
        self.norm = torch.nn.BatchNorm1d(7)
        self.fc2 = torch.nn.Linear(7, 9)
        self.head = torch.nn.Linear(9, 1)
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.fc1, self.norm, self.fc2, self.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(self.norm(torch.tanh(self.fc1(x))))))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self(self.x), self.y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor in full (a collective: every rank must call it), as CPU copies."""
    return {
        n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
        for n, t in module.state_dict().items()
    }


class Capture(pl.Callback):
    """Keeps the full weights at fit start and at fit end (listed before ``DeltaPruning``: before it prunes)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = full_state(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = full_state(pl_module)


def fit(kwargs: dict) -> dict:
    """Fit a fresh ``Tiny`` under FSDP2 with ``DeltaPruning(**kwargs)``; return what rank 0 saves."""
    capture, pruning = Capture(), DeltaPruning(exclude=EXCLUDE, **kwargs)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture, pruning],
    )
    model = Tiny()
    trainer.fit(model, DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2))
    assert trainer.world_size == 2, trainer.world_size
    placements = {
        n: str(tuple(t.placements)) if isinstance(t, DTensor) else None for n, t in model.state_dict().items()
    }
    return {
        "pretrained": capture.start,
        "finetuned": capture.end,
        "pruned": full_state(model),
        "kept_fraction": pruning.kept_fraction,
        "placements": placements,
        "rank": trainer.global_rank,
    }


def run(out: Path) -> None:
    reference = str(out / "reference.safetensors")
    results = {
        method: fit({**kwargs, "reference": reference if from_file else None})
        for method, (kwargs, from_file) in RUNS.items()
    }
    if results["dare"]["rank"] == 0:
        torch.save(results, out / "fsdp2.pt")


if __name__ == "__main__":
    from lifelong_delta.cli import close_process_group

    try:
        run(Path(sys.argv[1]))
    finally:
        close_process_group()  # a gloo group alive at exit can abort the process
