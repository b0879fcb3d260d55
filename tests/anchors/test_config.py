"""Anchors build from YAML through jsonargparse (as LightningCLI does), with typed, validated options; a
PretrainedAnchor configured next to a previous-task anchor of a ContinualModule runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from lifelong_delta.anchors import EWCAnchor, L2Anchor, ParameterAnchor

YAML = """
anchors:
  - class_path: lifelong_delta.anchors.L2Anchor
    init_args: {include: ["blocks.[0-4].attn.qkv.*", "head.*"], strength: 100.}
  - class_path: lifelong_delta.anchors.EWCAnchor
    init_args: {include: ["blocks.*"], strength: 1000.0, label: sampled, accumulate: online, gamma: 0.9,
                n_samples: 64}
"""


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--anchors", type=list[ParameterAnchor])
    return p


def test_yaml_builds_anchors():
    p = parser()
    l2, ewc = p.instantiate_classes(p.parse_string(YAML)).anchors
    assert isinstance(l2, L2Anchor) and l2.include == ("blocks.[0-4].attn.qkv.*", "head.*") and l2.strength == 100.0
    assert isinstance(ewc, EWCAnchor) and (ewc.label, ewc.accumulation, ewc.gamma, ewc.n_samples) == (
        "sampled",
        "online",
        0.9,
        64,
    )


def test_yaml_rejects_unknown_choice():
    with pytest.raises(Exception, match="label"):
        parser().parse_string(YAML.replace("label: sampled", "label: soft"))


# --------------------------------------------------------------------------- a PretrainedAnchor in a ContinualModule
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _tiny_overrides(tmp_path: Path) -> Path:
    """Digits, two tasks of two classes, a random 4-block ViT at 8x8 px: a run of a few seconds."""
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(f"""
trainer:
  enable_progress_bar: false
  log_every_n_steps: 1
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: run}}}}
  callbacks: []
  enable_checkpointing: false
model:
  init_args:
    pretrained: false
    backbone_kwargs: {{img_size: 8, patch_size: 4, in_chans: 1, embed_dim: 64, depth: 4, num_heads: 4,
                       class_token: false, global_pool: avg}}
data:
  init_args: {{dataset: digits, n_tasks: 2, classes_per_task: 2, max_per_class: 24, batch_size: 16,
               eval_batch_size: 64, val_fraction: 0.2, max_eval_per_class: null}}
""")
    return tiny


def _cli(*configs: Path, extra: Sequence[str] = ()):
    """A LightningCLI (not run) of configs/cl_eval/mnist/base.yaml with ``configs`` layered on it, as ``lightning fit
    -c ...`` builds it."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        run=False,
        auto_configure_optimizers=False,
        args=[a for c in (CONFIGS / "cl_eval" / "mnist" / "base.yaml", *configs) for a in ("-c", str(c))] + [*extra],
    )


def test_pretrained_anchor_next_to_a_previous_task_anchor_from_yaml(tmp_path):
    """configs/cl_pretrained_anchor.yaml on the MNIST base: the PretrainedAnchor holds the weights of the first
    training step through both tasks while the L2 anchor re-anchors at the task boundary; both penalties are logged."""
    import lightning.pytorch as pl

    from lifelong_delta.anchors import PretrainedAnchor

    cli = _cli(CONFIGS / "cl_pretrained_anchor.yaml", _tiny_overrides(tmp_path))
    l2, pre = cli.model.anchors
    assert isinstance(l2, L2Anchor) and isinstance(pre, PretrainedAnchor) and pre.include == l2.include
    first: dict[str, torch.Tensor] = {}

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not first:
                first.update({n: p.detach().clone() for n, p in module.net.named_parameters() if "qkv" in n})

    cli.trainer.callbacks.append(FirstStep())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(first) == 8 and set(pre.reference) == set(first) and pre.num_snapshots == 1
    assert all(torch.equal(pre.reference[n], first[n]) for n in first)  # θ_pre, through the task boundary
    assert l2.num_snapshots == 1 and not any(torch.equal(l2.reference[n], first[n]) for n in first)
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/penalty0", "train/penalty1"} <= set(header)
    assert len(cli.model.accuracy_matrix) == 2


def test_lifelong_adamr_config_pulls_the_delta_toward_the_callbacks_theta_pre_and_leaves_the_head(tmp_path):
    """configs/lifelong_deltas_adamr.yaml: AdamR gets the module's parameters by name, and its PretrainedAnchor holds
    the QKV that LifelongDeltas prunes (θ_pre, the same values as the callback's reference), not the head."""
    from lifelong_delta.callbacks import LifelongDeltas
    from lifelong_delta.optim import AdamR

    tiny = _tiny_overrides(tmp_path)
    kept = tiny.read_text().replace("  callbacks: []\n", "").replace("  enable_checkpointing: false\n", "")
    tiny.write_text(kept)  # the config's callbacks: LifelongDeltas, and the checkpoint it saves
    cli = _cli(
        CONFIGS / "lifelong_deltas.yaml",
        CONFIGS / "lifelong_deltas_adamr.yaml",
        tiny,
        extra=["--trainer.callbacks.init_args.p=[0.0]"],
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (deltas,) = [c for c in cli.trainer.callbacks if isinstance(c, LifelongDeltas)]
    (opt,) = cli.trainer.optimizers
    assert isinstance(opt, AdamR)
    names = [n for group in opt.param_groups for n in group["param_names"]]
    assert "head.weight" in names and set(deltas.names) == {n for n in names if not n.startswith("head.")}
    pre = opt.anchor.reference
    assert set(pre) == set(deltas.names)  # the head is not pulled
    assert all(torch.equal(pre[n], deltas.anchor.reference[n]) for n in pre)
