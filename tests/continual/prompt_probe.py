"""A callback for the DDP test of the prompt methods: each rank saves its prompts and its picks on fixed images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lifelong_delta.continual.prefix import query_features
from lifelong_delta.continual.prompts import CodaPrompt, DualPrompt, L2P


class SelectionDump(L.Callback):
    """At the end of fit, write ``selection_rank{r}.pt``: the pool's tensors and its selection for 16 fixed images.

    The selection is L2P's top-k prompt indices, DualPrompt's E-prompt index or CODA-P's component weights α.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        pool = pl_module.prompts.eval()
        with torch.no_grad():
            q = query_features(pl_module.net.eval(), x, pl_module.query)
            if isinstance(pl_module, L2P):
                selection = pool(q)[1]
            elif isinstance(pl_module, DualPrompt):
                selection = pool(q, None)[1]
            else:
                assert isinstance(pl_module, CodaPrompt)
                selection = pool(q, 0, pl_module.component_range(len(pl_module._tasks) - 1)[1], False)[1]
        state = {k: v.detach().cpu() for k, v in pool.state_dict().items()}
        torch.save({"pool": state, "selection": selection.cpu()},
                   self.out_dir / f"selection_rank{trainer.global_rank}.pt")


class StateDump(L.Callback):
    """At the end of fit, write ``state_rank{r}.pt``: the module's weights, its anchors' states and its metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        anchors = [a.state_dict() for a in getattr(pl_module, "anchors", [])]
        torch.save({"weights": weights, "anchors": anchors, "R": pl_module.accuracy_matrix},
                   self.out_dir / f"state_rank{trainer.global_rank}.pt")
