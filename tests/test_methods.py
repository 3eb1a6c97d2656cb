from __future__ import annotations

import pytest
import torch

from monai_wsl.losses import MaxMinUncertaintyLoss, WSLCrossEntropyLoss
from monai_wsl.methods import METHODS, build_loss, build_network
from monai_wsl.networks import CAMClassifier, DeepMILNet, GradCAMClassifier, MaxMinUncertaintyNet

# The union of settings the bundle's network_def passes to every method.
COMMON = dict(
    spatial_dims=2, in_channels=3, num_classes=2, encoder="resnet18", pretrained=False, modalities=5, kmax=0.3,
    kmin=0.0, alpha=0.6, dropout=0.1, sigma=0.15, w=5.0, scale_in_cl=0.8, shared_encoder=True, output="dict",
)  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_builds_from_the_same_settings_and_meets_the_contract(method):
    net = build_network(method, **COMMON).eval()
    x = torch.rand(2, 3, 64, 64)
    out = net(x)
    assert out["logits"].shape == (2, 2) and out["mask"].shape == (2, 1, 64, 64)
    assert out["mask"].min() >= 0 and out["mask"].max() <= 1
    pred = net.segment_and_classify(x)
    torch.testing.assert_close(pred["logits"], out["logits"])
    loss_fn = build_loss(method)
    net.train()
    loss = loss_fn(net(x), torch.tensor([0, 1]))
    assert torch.isfinite(loss) and loss_fn.terms


def test_methods_pick_their_classes_and_fixed_settings():
    assert type(build_network("maxmin", **COMMON)) is MaxMinUncertaintyNet
    assert type(build_network("deepmil", **COMMON)) is DeepMILNet
    assert build_network("cam_lse", **COMMON).pooling == "lse"
    assert build_network("wildcat", **COMMON).pooling == "wildcat"
    gradcampp = build_network("gradcampp", **COMMON)
    assert type(gradcampp) is GradCAMClassifier and gradcampp.cam_method == "gradcampp"
    assert type(build_network("cam", **COMMON)) is CAMClassifier
    assert isinstance(build_loss("maxmin", lambda_bg=0.1, bg_term="eem"), MaxMinUncertaintyLoss)
    assert build_loss("maxmin", lambda_bg=0.1, bg_term="eem").bg_term == "eem"
    assert isinstance(build_loss("gradcam"), WSLCrossEntropyLoss)


def test_ablation_switch_from_the_command_line():
    """``--loss_def#size_constraint false`` reaches the config as the string "false", which must switch ASC off."""
    assert build_loss("maxmin", size_constraint="false").size_constraint is False
    assert build_loss("maxmin", size_constraint="True").size_constraint is True
    with pytest.raises(ValueError, match="yes/no"):
        build_loss("maxmin", size_constraint="sometimes")


def test_method_errors_are_clear():
    with pytest.raises(ValueError, match="method must be one of"):
        build_network("grad-cam", **COMMON)
    with pytest.raises(ValueError, match=r"unknown network arguments \['kmaxx'\]"):
        build_network("maxmin", kmaxx=0.2)
    with pytest.raises(ValueError, match="fixes"):
        build_network("cam", pooling="max")
    with pytest.raises(ValueError, match="method must be one of"):
        build_loss("camm")


def test_cross_entropy_loss_on_dicts_and_tensors():
    logits = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, y)
    loss_fn = WSLCrossEntropyLoss()
    torch.testing.assert_close(loss_fn({"logits": logits}, y), expected)
    torch.testing.assert_close(loss_fn(logits, y), expected)
    torch.testing.assert_close(loss_fn.terms["loss_ce"], expected)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        loss_fn(logits, torch.tensor([0, 3]))
