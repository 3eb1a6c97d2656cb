"""A dict from a plain MONAI pipeline goes straight into the network, the loss and the metrics: shown on the official
GlaS on-disk format (BMP images, instance-id BMP masks)."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Resized,
    ScaleIntensityRanged,
)

from monai_wsl.data import create_glas_datalist
from monai_wsl.losses import MaxMinUncertaintyLoss
from monai_wsl.metrics import PixelAPMetric
from monai_wsl.networks import MaxMinUncertaintyNet
from monai_wsl.transforms import BinarizeMaskd, CheckLabeld, CheckSameSized, EnsureRGBd


def test_monai_pipeline_into_network_loss_and_metrics(shared_data):
    split = create_glas_datalist(shared_data / "glas-bmp-sample")
    datalist = split["training"] + split["validation"]
    assert sorted(item["label"] for item in datalist) == [0, 0, 1]
    transform = Compose(
        [
            LoadImaged(keys=["image", "mask"]),
            EnsureChannelFirstd(keys=["image", "mask"]),
            EnsureRGBd(keys="image"),
            BinarizeMaskd(keys="mask"),
            CheckSameSized(keys=["image", "mask"]),
            CheckLabeld(keys="label", num_classes=2),
            ScaleIntensityRanged(keys="image", a_min=0, a_max=255, b_min=-1, b_max=1),  # the recipe's [-1, 1]
            Resized(keys=["image", "mask"], spatial_size=(128, 96), mode=("bilinear", "nearest")),
            EnsureTyped(keys="label", dtype=torch.long),
        ]
    )
    batch = next(iter(DataLoader(Dataset(datalist, transform), batch_size=3)))
    assert batch["image"].shape == (3, 3, 128, 96) and batch["mask"].shape == (3, 1, 128, 96)
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}

    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True)
    loss_fn = MaxMinUncertaintyLoss()
    out = net(batch["image"])
    loss = loss_fn(out, batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), sum(loss_fn.terms.values()))

    f1_pos, pxap = DiceMetric(), PixelAPMetric()  # F1+ as the bundle computes it, on the mask M >= 0.5
    f1_pos((out["mask"].detach() >= 0.5).float(), batch["mask"])
    pxap(out["mask"].detach(), batch["mask"])
    assert 0 <= f1_pos.aggregate().item() <= 1
    # PxAP of any map is at least about the foreground prevalence and at most 1
    assert 0 < pxap.aggregate().item() <= 1


def test_a_wrong_pipeline_is_named(shared_data):
    item = create_glas_datalist(shared_data / "glas-bmp-sample")["training"][0]
    load = Compose([LoadImaged(keys=["image", "mask"]), EnsureChannelFirstd(keys=["image", "mask"])])
    data = load(item)
    net = MaxMinUncertaintyNet(encoder="resnet18")
    with pytest.raises(ValueError, match="add a batch dimension"):
        net(data["image"].float())  # forgot the DataLoader's batch dimension
    with pytest.raises(ValueError, match="binarise it first"):
        PixelAPMetric()(torch.rand(1, *data["mask"].shape), data["mask"][None])  # instance ids, not 0/1
