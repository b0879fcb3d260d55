"""The DDP tests' tools: callbacks that dump each rank's state, and a runner of one cl_eval config on 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from lifelong_delta.continual.prefix import query_features
from lifelong_delta.continual.prompts import L2P, CodaPrompt, DualPrompt


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
        torch.save(
            {"pool": state, "selection": selection.cpu()}, self.out_dir / f"selection_rank{trainer.global_rank}.pt"
        )


class StateDump(L.Callback):
    """At the end of fit, write ``state_rank{r}.pt``: the module's weights, its anchors' states and its metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        anchors = [a.state_dict() for a in getattr(pl_module, "anchors", [])]
        torch.save(
            {"weights": weights, "anchors": anchors, "R": pl_module.accuracy_matrix},
            self.out_dir / f"state_rank{trainer.global_rank}.pt",
        )


ROOT = Path(__file__).resolve().parents[2]
#: a 4-block ViT on 8x8 images, the shape of the offline backbone's configs
TINY = {
    "img_size": 8,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "class_token": False,
    "global_pool": "avg",
}


def run_ddp(
    tmp_path: Path, method: str, callback: str, model_extra: str = "", n_tasks: int = 2, classes_per_task: int = 2
) -> str:
    """``lightning fit`` of ``configs/cl_eval/mnist/<method>.yaml`` on sklearn digits with a tiny random ViT, on 2
    CPU gloo processes, with ``callback`` (a class of this module) writing into ``tmp_path``; returns the output."""
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        f"""
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 2
  enable_progress_bar: false
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: ddp}}}}
  callbacks:
    - class_path: tests.continual.prompt_probe.{callback}
      init_args: {{out_dir: {tmp_path}}}
model:
  init_args:
    pretrained: false
    backbone_kwargs: {TINY}
    {model_extra}
data:
  init_args: {{dataset: digits, n_tasks: {n_tasks}, classes_per_task: {classes_per_task}, max_per_class: 32,
               batch_size: 8, eval_batch_size: 64, val_fraction: 0.2, max_eval_per_class: null}}
"""
    )
    cfg = ROOT / "configs" / "cl_eval" / "mnist"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(ROOT),
    }
    lightning = Path(sys.executable).parent / "lightning"
    args = [str(lightning), "fit", "-c", str(cfg / "base.yaml"), "-c", str(cfg / f"{method}.yaml"), "-c", str(tiny)]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "MEMBER: 2/2" in out
    return out
