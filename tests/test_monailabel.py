"""MONAI Label loads the bundle with its BundleInferTask and infers a GlaS image, giving the same mask as the bundle's
own inference. MONAI Label lives in its own folder (scripts/install_monailabel.sh); the test skips without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_wsl.networks import MaxMinUncertaintyNet
from tests.monailabel_env import import_bundle_infer_task

REPO = Path(__file__).resolve().parents[1]


def make_bundle(root: Path) -> Path:
    """The repository's bundle configs with a model.pt (fixed random weights: this test is about the plumbing)."""
    bundle = root / "wsl_histology_segmentation"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", output="mask")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_monailabel_bundle_infer_task_matches_the_bundle(shared_data, tmp_path):
    BundleInferTask = import_bundle_infer_task()
    bundle = make_bundle(tmp_path)
    image = shared_data / "glas-bmp-sample" / "train_12.bmp"  # 574 x 433, official BMP format

    task = BundleInferTask(str(bundle), conf={})
    assert task.is_valid() and task.dimension == 2
    assert task.labels == {"gland": 1}
    label_file, result = task({"image": str(image), "device": "cpu", "result_dtype": "uint8", "logging": "WARNING"})
    try:
        served = np.array(Image.open(label_file))
    finally:
        Path(label_file).unlink(missing_ok=True)
    width, height = Image.open(image).size
    assert served.shape == (height, width) and served.dtype == np.uint8
    assert set(np.unique(served)) <= {0, 1}
    assert result["label_names"] == {"gland": 1}

    # the bundle's own inference.json on the same image
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(image, folder / image.name)
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(folder),
        output_dir=str(tmp_path / "out"),
        num_workers=0,
        logging_file=False,
    )
    wf.initialize()
    wf.run()
    own = np.array(Image.open(tmp_path / "out" / "train_12_mask.png")) > 0
    assert own.any() and not own.all()  # a real two-region mask, not a blank
    assert np.array_equal(served.astype(bool), own)
