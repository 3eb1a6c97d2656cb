"""MONAI Label's BundleInferTask (monailabel 0.8.5: ``tasks/infer/bundle.py`` and ``basic_infer.py``) serves a bundle
with the calls replayed here, on the bundle's own ``inference.json`` and ``metadata.json``: the served mask must be the
bundle's own. MONAI Label itself pulls another torch and numpy, so it is not installed beside the project (its server
recipe is in bundle/docs/README.md)."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import decollate_batch
from monai.transforms import Compose, LoadImaged, SaveImaged
from PIL import Image

from monai_wsl.networks import MaxMinUncertaintyNet

REPO = Path(__file__).resolve().parents[1]


def make_bundle(root: Path) -> Path:
    """The repository's bundle configs with a model.pt (fixed random weights: this test is about the plumbing)."""
    bundle = root / "wsl_histology_segmentation"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(MaxMinUncertaintyNet(encoder="efficientnet-lite0").state_dict(), bundle / "models" / "model.pt")
    return bundle


def serve(bundle: Path, image: Path, request: dict) -> tuple[np.ndarray, Path]:
    """What MONAI Label's BundleInferTask does with ``request`` for ``image``: the label map it writes (read back) and
    the file. Its steps, in order, as in monailabel 0.8.5."""
    # __init__: inference.json with bundle_root set, network_def instantiated; from metadata.json the first input and
    # output keys, the labels from channel_def (background dropped), the dimension from spatial_shape; the bundle's
    # displayable_configs become the request's defaults
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "cpu"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    key_image, image_spec = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred_spec = next(iter(meta["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred_spec["channel_def"].items() if v.lower() != "background"}
    assert (key_image, key_pred, labels, len(image_spec["spatial_shape"])) == ("image", "pred", {"gland": 1}, 2)
    data = {"device": "cpu", **parser.get_parsed_content("displayable_configs"), **request, "image_path": str(image)}

    # _get_network: a deep copy loads model.pt with strict=False, so a key mismatch would only warn: the keys must match
    checkpoint = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint)
    assert set(network.state_dict()) == set(state)
    network = copy.deepcopy(network)
    network.load_state_dict(state, strict=False)
    network.eval()

    # pre_transforms: the preprocessing Compose's transforms, LoadImaged made to return the meta data too
    pre = list(parser.get_parsed_content("preprocessing", instantiate=True).transforms)
    for t in pre:
        if isinstance(t, LoadImaged):
            t._loader.image_only = False
    data = Compose(pre)(data)

    # run_inferer: the bundle's inferer on the batched image under no_grad; a dict output is decollated, item 0
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        outputs = inferer(data[key_image][None], network)
    data[key_pred] = decollate_batch(outputs)[0] if isinstance(outputs, dict) else outputs[0]

    # post_transforms: the postprocessing without SaveImaged
    post = parser.get_parsed_content("postprocessing", instantiate=True).transforms
    data = Compose([t for t in post if not isinstance(t, SaveImaged)])(data)

    # writer: ITK writes the label map as it is (its dtype, unless the request gives result_dtype) with the request's
    # result_extension, else the image's own
    label = np.asarray(data[key_pred])
    if data.get("result_dtype"):
        label = label.astype(data["result_dtype"])
    extension = data.get("result_extension") or "".join(image.suffixes)
    written = Path(tempfile.mkdtemp()) / f"label{extension}"
    itk.imwrite(itk.image_from_array(label.transpose().copy()), str(written))
    return np.array(Image.open(written)), written


def own_mask(bundle: Path, image: Path, work: Path) -> np.ndarray:
    """The bundle's own inference.json on ``image``: its mask PNG (0 / 255) as a bool array."""
    folder = work / "images"
    folder.mkdir(exist_ok=True)
    shutil.copy(image, folder / image.name)
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(folder),
        output_dir=str(work / "out"),
        num_workers=0,
        logging_file=False,
    )
    wf.initialize()
    wf.run()
    return np.array(Image.open(work / "out" / f"{image.stem}_mask.png")) > 0


@pytest.mark.parametrize("name", ["glas/train_12.jpg", "glas-bmp-sample/train_12.bmp"])
def test_monailabel_default_request_gives_the_bundles_mask_as_uint8_labels(shared_data, tmp_path, name):
    """MONAI Label's default request (no result_dtype, no result_extension) on a JPG and on a BMP: a uint8 label map,
    1 = gland, written as PNG (the bundle's displayable_configs), equal to the bundle's own mask."""
    bundle = make_bundle(tmp_path)
    image = shared_data / name
    served, written = serve(bundle, image, {"image": str(image)})
    width, height = Image.open(image).size
    assert written.suffix == ".png" and served.dtype == np.uint8 and served.shape == (height, width)
    assert set(np.unique(served)) == {0, 1}
    own = own_mask(bundle, image, tmp_path)
    assert own.any() and not own.all()  # a real two-region mask, not a blank
    assert np.array_equal(served.astype(bool), own)
