"""3D in the bundle: the synthetic volumes, the encoder settings for them, the pre-flight check of volumes, and the
volume recipe trained, evaluated and inferred through ``python -m monai.bundle run`` as the README shows."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_wsl.data import DataError, check_run, synthetic_volume_sample, write_synthetic_volumes
from monai_wsl.networks import MaxMinUncertaintyNet
from monai_wsl.networks.nets.encoders import ResNetEncoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN = ["train.json", "recipes/volume.json"]


def test_synthetic_volumes_differ_only_inside_the_blobs():
    rng = np.random.default_rng(0)
    inside, outside, fractions = {0: [], 1: []}, {0: [], 1: []}, []
    for i in range(40):
        volume, mask = synthetic_volume_sample(i % 2, (32, 32, 32), rng)
        assert volume.shape == mask.shape == (32, 32, 32) and volume.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1}
        blob = mask.astype(bool)
        inside[i % 2].append((volume[blob].mean(), volume[blob].std()))
        outside[i % 2].append((volume[~blob].mean(), volume[~blob].std()))
        fractions.append(blob.mean())
    assert 0.1 < np.mean(fractions) < 0.4  # blobs fill a good part of a volume, as glands do a GlaS image
    inside0, inside1 = np.array(inside[0]), np.array(inside[1])
    outside0, outside1 = np.array(outside[0]), np.array(outside[1])
    # the same brightness everywhere in both classes; the texture of the blobs alone tells them apart
    assert abs(inside0[:, 0].mean() - inside1[:, 0].mean()) < 5
    assert (
        abs(outside0[:, 0].mean() - outside1[:, 0].mean()) < 5
        and abs(outside0[:, 1].mean() - outside1[:, 1].mean()) < 2
    )
    assert inside1[:, 1].min() > 3 * inside0[:, 1].max()
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        synthetic_volume_sample(2)


def test_write_synthetic_volumes_writes_nifti_and_a_datalist(tmp_path):
    datalist = write_synthetic_volumes(tmp_path, num_train=4, num_valid=2, size=(32, 32, 32), seed=3)
    content = json.loads(datalist.read_text())
    assert [i["label"] for i in content["training"]] == [0, 1, 0, 1] and len(content["validation"]) == 2
    item = content["training"][1]
    image, mask = nib.load(tmp_path / item["image"]), nib.load(tmp_path / item["mask"])
    assert image.shape == mask.shape == (32, 32, 32) and item["image"].endswith(".nii.gz")
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 255}
    again = synthetic_volume_sample(1, (32, 32, 32), np.random.default_rng(3))  # the second of the seed's stream
    first = synthetic_volume_sample(0, (32, 32, 32), np.random.default_rng(3))
    assert not np.array_equal(first[0], again[0])
    assert np.array_equal(np.asarray(nib.load(tmp_path / content["training"][0]["image"]).dataobj), first[0])


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_resnet_encoder_output_stride_width_and_norm(stride):
    encoder = ResNetEncoder(
        "resnet10", 3, 1, output_stride=stride, widen_factor=0.25, norm=("group", {"num_groups": 8})
    )
    features = encoder(torch.randn(2, 1, 64, 64, 32))
    assert features.shape == (2, 128, 64 // stride, 64 // stride, 32 // stride) and encoder.out_channels == 128
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in encoder.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in encoder.modules())
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        ResNetEncoder("resnet10", 3, 1, output_stride=4)


def test_a_3d_network_gives_volume_masks_and_says_its_smallest_input():
    encoder = ResNetEncoder("resnet10", 3, 1, output_stride=8, widen_factor=0.25)
    net = MaxMinUncertaintyNet(spatial_dims=3, in_channels=1, num_classes=2, encoder=encoder).eval()
    out = net.predict(torch.randn(1, 1, 32, 32, 24))
    assert out["mask"].shape == (1, 1, 32, 32, 24) and out["logits"].shape == (1, 2)
    assert net.min_spatial_size == 10  # stride 8 at the classifier's scale 0.8
    with pytest.raises(ValueError, match="each side must be at least 10"):
        net.predict(torch.randn(1, 1, 32, 32, 8))


def test_preflight_checks_volumes_as_volumes(tmp_path):
    datalist = write_synthetic_volumes(tmp_path, num_train=2, num_valid=2, size=(32, 32, 32), seed=0)
    check_run(datalist, {"training": False, "validation": True}, min_size=10, spatial_dims=3)  # no error
    with pytest.raises(DataError, match=r"expected a 2D image \(height, width\)"):
        check_run(datalist, {"training": False}, min_size=10)  # volumes given to the 2D recipe
    with pytest.raises(DataError, match=r"is 32 x 32 x 32 pixels; the network needs at least 40"):
        check_run(datalist, {"training": False}, min_size=40, spatial_dims=3)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.uint8), np.eye(4)), str(flat))
    with pytest.raises(DataError, match=r"flat.nii.gz has shape \(32, 32\): expected a volume"):
        check_run(images=[flat], spatial_dims=3)


def bundle(configs: list[str], root: Path, *extra: str) -> str:
    files = "[" + ",".join(f"'{CONFIGS / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--meta_file",
           str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(root),
           "--progress_bar", "false", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def check_outputs(root: Path) -> dict[str, float]:
    """Evaluation and inference of the trained volume model: NIfTI masks of the volumes' size and affine, the same
    in both; returns the evaluation's metrics."""
    log = bundle([*TRAIN, "evaluate.json"], root)
    assert f"evaluation: the results are in {root / 'eval' / 'volume'}" in log
    metrics = {name: float(value) for name, value in csv.reader(open(root / "eval" / "volume" / "metrics.csv"))}
    data = root / "data" / "synthetic_3d"
    validation = json.loads((data / "datalist.json").read_text())["validation"]
    log = bundle(["inference.json", "recipes/volume_inference.json"], root, "--dataset_dir", str(data))
    assert f"inference: the results are in {root / 'inference' / 'volume'}" in log
    for item in validation:
        stem = item["image"].split(".")[0]
        evaluated = nib.load(root / "eval" / "volume" / "masks" / f"{stem}_mask.nii.gz")
        inferred = nib.load(root / "inference" / "volume" / f"{stem}_mask.nii.gz")
        assert evaluated.shape == inferred.shape == (32, 32, 32)
        assert np.allclose(inferred.affine, nib.load(data / item["image"]).affine)
        assert np.array_equal(np.asarray(evaluated.dataobj) > 0, np.asarray(inferred.dataobj) > 0)
        assert (root / "eval" / "volume" / "overlays" / f"{stem}_overlay.png").is_file()
    rows = list(csv.reader(open(root / "inference" / "volume" / "predictions.csv")))
    assert len(rows) == len(list(data.glob("*.nii.gz"))) // 2  # every volume, masks left out
    return metrics


@pytest.mark.slow  # the 3D recipe trained, evaluated and run (48 s)
def test_volume_recipe_trains_evaluates_and_infers_through_the_bundle(tmp_path):
    """Two epochs on a few volumes: the whole path runs and writes what it should (the quality is the slow test's)."""
    small = '{"num_train": 4, "num_valid": 2, "size": [32, 32, 32], "seed": 0}'
    log = bundle(TRAIN, tmp_path, "--max_epochs", "2", "--synthetic_data", small, "--num_workers", "0")
    assert f"selected model: {tmp_path / 'models' / 'volume' / 'model.pt'}" in log
    card = json.loads((tmp_path / "models" / "volume" / "model_card.json").read_text())
    assert card["trained_on"]["synthetic"] is True and card["trained_on"]["encoder"].startswith("resnet10 (3D")
    metrics = check_outputs(tmp_path)
    assert set(metrics) >= {"val_accuracy", "val_pxap", "val_f1_pos"}


@pytest.mark.slow
def test_volume_quick_start_finds_the_planted_blobs(tmp_path):
    """The 3D quick start as the README gives it (24 epochs, about 2.5 minutes on 2 cores): it tells the classes apart
    and its mask ranks blob voxels above the rest far better than chance (the blobs' share of the voxels)."""
    bundle(TRAIN, tmp_path)
    metrics = check_outputs(tmp_path)
    data = tmp_path / "data" / "synthetic_3d"
    masks = [
        np.asarray(nib.load(data / i["mask"]).dataobj) > 0
        for i in json.loads((data / "datalist.json").read_text())["validation"]
    ]
    chance = float(np.mean(masks))  # the average precision of a mask that knows nothing
    assert metrics["val_accuracy"] >= 0.75, metrics
    assert metrics["val_pxap"] > 2 * chance, (metrics, chance)
