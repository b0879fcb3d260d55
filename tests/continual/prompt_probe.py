"""A callback for the DDP test of the prompt methods: each rank saves its keys and its prompt picks on fixed images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lifelong_delta.continual.prefix import query_features
from lifelong_delta.continual.prompts import select_prompts


class SelectionDump(L.Callback):
    """At the end of fit, write ``selection_rank{r}.pt``: the L2P keys and the top-k picks of 16 fixed images."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        pool = pl_module.prompts
        with torch.no_grad():
            idx, _ = select_prompts(query_features(pl_module.net.eval(), x, pl_module.query), pool.keys, pool.top_k)
        torch.save({"keys": pool.keys.detach().cpu(), "selection": idx.cpu()},
                   self.out_dir / f"selection_rank{trainer.global_rank}.pt")
