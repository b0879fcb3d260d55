"""Anchors build from YAML through jsonargparse (as LightningCLI does), with typed, validated options."""

from __future__ import annotations

import pytest
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
    assert (
        isinstance(l2, L2Anchor)
        and l2.include == ("blocks.[0-4].attn.qkv.*", "head.*")
        and l2.strength == 100.0
    )
    assert isinstance(ewc, EWCAnchor) and (ewc.label, ewc.accumulation, ewc.gamma, ewc.n_samples) == (
        "sampled",
        "online",
        0.9,
        64,
    )


def test_yaml_rejects_unknown_choice():
    with pytest.raises(Exception, match="label"):
        parser().parse_string(YAML.replace("label: sampled", "label: soft"))
