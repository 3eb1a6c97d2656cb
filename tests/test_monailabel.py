"""MONAI Label's BundleInferTask (monailabel 0.8.5: ``tasks/infer/bundle.py`` and ``basic_infer.py``) serves a bundle
with the calls replayed here, on the bundle's own ``inference.json`` and ``metadata.json``: the served mask must be the
bundle's own. MONAI Label itself pulls another torch and numpy, so it is not installed beside the project (its server
recipe is in bundle/docs/README.md)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
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


def test_monailabel_bundle_infer_task_calls_give_the_bundles_mask(shared_data, tmp_path):
    bundle = make_bundle(tmp_path)
    image = shared_data / "glas-bmp-sample" / "train_12.bmp"  # 574 x 433, official BMP format

    # __init__: inference.json with bundle_root set, network_def instantiated; from metadata.json the first input and
    # output keys, the labels from channel_def (background dropped), the dimension from spatial_shape
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "cpu"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    key_image, image_spec = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred_spec = next(iter(meta["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred_spec["channel_def"].items() if v.lower() != "background"}
    assert (key_image, key_pred, labels, len(image_spec["spatial_shape"])) == ("image", "pred", {"gland": 1}, 2)

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
    data = Compose(pre)({key_image: str(image)})

    # run_inferer: the bundle's inferer on the batched image under no_grad; a dict output is decollated, item 0
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with torch.no_grad():
        outputs = inferer(data[key_image][None], network)
    data[key_pred] = decollate_batch(outputs)[0] if isinstance(outputs, dict) else outputs[0]

    # post_transforms: the postprocessing without SaveImaged (MONAI Label writes the result itself)
    post = parser.get_parsed_content("postprocessing", instantiate=True).transforms
    data = Compose([t for t in post if not isinstance(t, SaveImaged)])(data)
    served = np.asarray(data[key_pred])
    width, height = Image.open(image).size
    assert served.shape == (width, height)  # channel-less label map, MONAI's (W, H) axes of a PIL-read image
    assert set(np.unique(served)) <= {0, 1}

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
    assert np.array_equal(served.T.astype(bool), own)
