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

from monai_wsl.inferers import with_backend
from monai_wsl.networks import MaxMinUncertaintyNet

REPO = Path(__file__).resolve().parents[1]


def make_bundle(root: Path) -> Path:
    """The repository's bundle configs with a model.pt (fixed random weights: this test is about the plumbing)."""
    bundle = root / "wsl_histology_segmentation"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(
        MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True).state_dict(), bundle / "models" / "model.pt"
    )
    return bundle


def serve(bundle: Path, image: Path, request: dict, inference_backend: str | None = None) -> tuple[np.ndarray, Path]:
    """What MONAI Label's BundleInferTask does with ``request`` for ``image``: the label map it writes (read back) and
    the file. Its steps, in order, as in monailabel 0.8.5. ``inference_backend``: the bundle's, or this one (as set in
    its inference.json)."""
    # __init__: inference.json with bundle_root set, network_def instantiated; from metadata.json the first input and
    # output keys, the labels from channel_def (background dropped), the dimension from spatial_shape; the bundle's
    # displayable_configs become the request's defaults
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "cpu"})
    if inference_backend is not None:
        parser.config["inference_backend"] = inference_backend
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
    # and ours (monai_wsl.apps.monailabel.BundleImageInferTask._get_network, which only scripts/monailabel_check.py
    # runs, against a real MONAI Label): run by the bundle's inference_backend
    network = with_backend(
        network, parser.get_parsed_content("inference_backend"), "cpu", checkpoint=bundle / "models" / "model.pt"
    )

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
    1 = gland, written as PNG (the bundle's displayable_configs), equal to the bundle's own mask, both run by the
    default backend (on a CPU the network's export in ONNX Runtime)."""
    bundle = make_bundle(tmp_path)
    image = shared_data / name
    served, written = serve(bundle, image, {"image": str(image)})
    assert list((bundle / "models").glob("model.*.onnx")), "the export, beside the model"
    width, height = Image.open(image).size
    assert written.suffix == ".png" and served.dtype == np.uint8 and served.shape == (height, width)
    assert set(np.unique(served)) == {0, 1}
    own = own_mask(bundle, image, tmp_path)
    assert own.any() and not own.all()  # a real two-region mask, not a blank
    assert np.array_equal(served.astype(bool), own)


# ---------------------------------------------------------------------------------------------------------------------
# Whole slides: MONAI Label's pathology request (a region of a slide: location, size, level) through the bundle's own
# SlideInferer.infer_region, and the regions back as MONAI Label's annotation in level-0 pixels
# (monai_wsl.apps.slide_region, which needs no monailabel; the MONAI Label task and app around it are checked against a
# running server, bundle/docs/README.md).

from monai_wsl.apps import (  # noqa: E402
    MAX_REGION_PIXELS,
    build_slide_inferer,
    check_region_request,
    infer_slide_region,
    region_annotation,
)
from monai_wsl.data import DataError, write_synthetic_slide  # noqa: E402
from tests import test_slides  # noqa: E402

real_svs = test_slides.real_svs  # the small real SVS (2220 x 2967, one level), fetched once and cached


@pytest.fixture(scope="module")
def slide_bundle(tmp_path_factory) -> Path:
    """The repository's bundle configs with a model.pt: ImageNet encoder, fixed random heads (its masks have
    structure; what is checked is the plumbing, against the mask the same inferer gives)."""
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def region_inferer(slide_bundle):
    """The bundle's SlideInferer as the MONAI Label task builds it, with 256-pixel patches to keep the tests short."""
    return build_slide_inferer(slide_bundle, device="cpu", overrides={"patch_size": 256, "overlap": 0.25})


def rasterise(annotation: dict, location, downsample: float, shape) -> np.ndarray:
    """The annotation's polygons (exterior minus holes) drawn back onto the region's pixel grid (a pixel is in when its
    centre is)."""
    from skimage.draw import polygon2mask

    out = np.zeros(shape, bool)
    for element in annotation["elements"]:
        for i, ring in enumerate(element["contours"]):
            xy = np.asarray(ring, float)
            rows = (xy[:, 1] - location[1]) / downsample - 0.5
            cols = (xy[:, 0] - location[0]) / downsample - 0.5
            drawn = polygon2mask(shape, np.stack([rows, cols], 1))
            out = out | drawn if i == 0 else out & ~drawn
    return out


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it."""
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def assert_polygons_are_the_mask(annotation: dict, pred: np.ndarray, location, downsample: float) -> None:
    """Polygons traced from ``pred`` (simplified within half a mask pixel) cover its pixels except along its edges:
    the pixels they get wrong are at most a tenth of its boundary pixels, and the areas agree within 1 %."""
    drawn = rasterise(annotation, location, downsample, pred.shape)
    wrong = int((drawn != pred.astype(bool)).sum())
    assert wrong <= 0.1 * boundary(pred.astype(bool)).sum(), (wrong, int(boundary(pred.astype(bool)).sum()))
    assert drawn.sum() == pytest.approx(pred.sum(), rel=0.01)


def points(annotation: dict) -> np.ndarray:
    return np.concatenate([np.asarray(r, float) for e in annotation["elements"] for r in e["contours"]])


def test_region_annotation_gives_level0_polygons_with_holes_as_monai_label_reads_them():
    """A ring (with its hole) and a small blob on a region at level-0 (1000, 2000), read at downsample 4: MONAI Label's
    annotation of a tile, polygons in level-0 pixels inside the region, drawn back they are the mask; min_poly_area
    (pixels of the level read, as MONAI Label's) drops the blob."""
    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:60] = True
    mask[20:30, 30:50] = False  # the hole
    mask[50:53, 5:8] = True  # 9 pixels
    location, ds = (1000, 2000), 4.0
    annotation = region_annotation(mask, location, ds, label="gland", size=(80, 60), level=2)
    assert annotation["location"] == [1000, 2000] and annotation["size"] == [80, 60] and annotation["level"] == 2
    assert annotation["labels"] == {"gland": [0, 166, 166]}
    assert sorted(len(e["contours"]) for e in annotation["elements"]) == [1, 2]  # the blob; the ring and its hole
    xy = points(annotation)
    assert xy[:, 0].min() >= 1000 + 5 * ds - 1e-6 and xy[:, 0].max() <= 1000 + 60 * ds + 1e-6
    assert xy[:, 1].min() >= 2000 + 10 * ds - 1e-6 and xy[:, 1].max() <= 2000 + 53 * ds + 1e-6
    assert (rasterise(annotation, location, ds, mask.shape) == mask).all()
    json.dumps(annotation)  # what MONAI Label sends on: plain JSON
    kept = region_annotation(mask, location, ds, min_poly_area=20)
    assert [len(e["contours"]) for e in kept["elements"]] == [2]


def test_real_svs_region_gives_level0_polygons_of_the_regions_mask(real_svs, region_inferer):
    """A region of the real SVS, as MONAI Label sends a tile: the label map is the bundle inferer's own mask at the
    threshold, and the polygons are that label map in level-0 pixels, inside the region."""
    location, size = (1000, 1200), (500, 380)  # wider than high, away from the diagonal: an x / y swap would show
    own = region_inferer.infer_region(real_svs, location=location, size=size, level=0)["mask"]
    threshold = float(np.quantile(own, 0.6))  # the mask's own scale: a region map, neither empty nor full
    out = infer_slide_region(
        region_inferer, {"image": str(real_svs), "location": location, "size": size, "level": 0, "threshold": threshold}
    )
    assert out["pred"].shape == (380, 500) and out["pred"].dtype == np.uint8
    assert np.array_equal(out["mask"], own)  # the same code path as the bundle's infer_region
    assert np.array_equal(out["pred"], (own >= threshold).astype(np.uint8))
    assert 0.3 < out["pred"].mean() < 0.5
    xy = points(out["annotation"])
    assert len(out["annotation"]["elements"]) >= 1
    assert xy[:, 0].min() >= 1000 and xy[:, 0].max() <= 1500 and xy[:, 1].min() >= 1200 and xy[:, 1].max() <= 1580
    assert_polygons_are_the_mask(out["annotation"], out["pred"], location, 1.0)
    probs = out["class_probabilities"]
    assert set(probs) == {"benign", "malignant"} and sum(probs.values()) == pytest.approx(1, abs=1e-4)


def test_region_at_level_1_maps_back_to_level_0(tmp_path, region_inferer):
    """A region asked at level 1 of a pyramidal slide (location in level-0 pixels, size in level-1 pixels, as
    OpenSlide's read_region and MONAI Label's pathology app take them): its polygons come back in level-0 pixels,
    twice the level-1 extent, and drawn back at level 1 they are the label map."""
    slide = write_synthetic_slide(tmp_path / "synthetic_slide.tif")  # 3072 x 2048 at level 0, levels halving
    location, size = (1024, 512), (384, 256)  # level 0: x 1024..1792, y 512..1024
    own = region_inferer.infer_region(slide, location=location, size=size, level=1)["mask"]
    threshold = float(np.quantile(own, 0.6))
    out = infer_slide_region(
        region_inferer, {"image": str(slide), "location": location, "size": size, "level": 1, "threshold": threshold}
    )
    assert out["region"].downsample == pytest.approx(2.0) and out["annotation"]["level"] == 1
    assert np.array_equal(out["pred"], (own >= threshold).astype(np.uint8)) and 0.3 < out["pred"].mean() < 0.5
    xy = points(out["annotation"])
    assert xy[:, 0].min() >= 1024 and xy[:, 0].max() <= 1792 and xy[:, 1].min() >= 512 and xy[:, 1].max() <= 1024
    assert xy[:, 0].max() - xy[:, 0].min() > 384  # spans more than the level-1 width: scaled to level 0
    assert_polygons_are_the_mask(out["annotation"], out["pred"], location, 2.0)


def test_region_past_the_slide_edge_keeps_its_regions_on_the_slide(real_svs, region_inferer):
    """A region reaching past the right and bottom edges of the real SVS (2220 x 2967): the part beyond is glass, never
    a region; the polygons stay on the slide and are the label map there."""
    location, size = (2220 - 200, 2967 - 100), (512, 256)
    own = region_inferer.infer_region(real_svs, location=location, size=size, level=0)["mask"]
    threshold = float(np.quantile(own[:100, :200], 0.5))
    out = infer_slide_region(
        region_inferer, {"image": str(real_svs), "location": location, "size": size, "threshold": threshold}
    )
    assert out["region"].inside == (200, 100)
    assert out["pred"][100:, :].sum() == 0 and out["pred"][:, 200:].sum() == 0
    assert np.array_equal(out["pred"][:100, :200], (own[:100, :200] >= threshold).astype(np.uint8))
    assert out["pred"].sum() > 0
    xy = points(out["annotation"])
    assert xy[:, 0].min() >= 2020 and xy[:, 0].max() <= 2220 and xy[:, 1].min() >= 2867 and xy[:, 1].max() <= 2967
    assert_polygons_are_the_mask(out["annotation"], out["pred"], location, 1.0)


def test_bad_region_requests_name_the_slide_and_the_fix(tmp_path, real_svs, region_inferer):
    missing = tmp_path / "gone.svs"
    cases = [
        ({"image": str(missing), "size": (256, 256)}, [str(missing), "does not exist"]),
        ({"image": str(real_svs), "size": (256, 256), "level": 3}, [str(real_svs), "no level 3", "1 level(s)"]),
        ({"image": str(real_svs), "location": (5000, 10), "size": (256, 256)}, [str(real_svs), "2220 x 2967"]),
        ({"image": str(real_svs), "location": (-1, 0), "size": (256, 256)}, [str(real_svs), "does not start"]),
        ({"image": str(real_svs)}, [str(real_svs), "no size"]),
        ({"image": str(real_svs), "size": (0, 256)}, [str(real_svs), "empty"]),
        ({"image": str(real_svs), "size": (MAX_REGION_PIXELS, 2)}, [str(real_svs), "too large", "tile_size"]),
        ({"image": str(real_svs), "size": "big"}, [str(real_svs), "two whole numbers"]),
        ({"image": str(real_svs), "location": "12", "size": (64, 64)}, [str(real_svs), "two whole numbers"]),
    ]
    for request, words in cases:
        with pytest.raises(DataError) as e:
            check_region_request(request)
        assert all(w in str(e.value) for w in words), (request, str(e.value))
    with pytest.raises(DataError, match="threshold 1.5"):  # the same checks on the task's path, before anything runs
        infer_slide_region(region_inferer, {"image": str(real_svs), "size": (64, 64), "threshold": 1.5})
    with pytest.raises(DataError, match="no level 2"):
        infer_slide_region(region_inferer, {"image": str(real_svs), "size": (64, 64), "level": 2})
    with pytest.raises(DataError, match="must be numbers"):  # a 400 in MONAI Label, not a 500
        infer_slide_region(region_inferer, {"image": str(real_svs), "size": (64, 64), "min_poly_area": "big"})


def test_build_slide_inferer_is_the_bundles_wsi_definition(slide_bundle, tmp_path):
    """The MONAI Label task's inferer is inference.json + inference_wsi.json: their patch size, overlap, threshold and
    region name, and model.pt's weights; a missing model is refused naming the file."""
    inferer = build_slide_inferer(slide_bundle, device="cpu")
    wsi = json.loads((REPO / "bundle" / "configs" / "inference_wsi.json").read_text())
    assert (inferer.patch_size, inferer.overlap, inferer.threshold, inferer.region_name) == (
        wsi["patch_size"],
        wsi["overlap"],
        wsi["threshold"],
        wsi["region_name"],
    )
    assert (inferer.num_workers, inferer.uncertainty) == (2, False)
    from monai_wsl.inferers.backends import onnxruntime_available

    assert inferer.inference_backend == ("onnxruntime" if onnxruntime_available() else "torch")  # "auto" on a CPU
    overridden = build_slide_inferer(slide_bundle, device="cpu", overrides={"uncertainty": "true", "num_workers": 0})
    assert (overridden.num_workers, overridden.uncertainty) == (0, True)  # as --uncertainty true --num_workers 0
    saved = torch.load(slide_bundle / "models" / "model.pt", weights_only=True)
    loaded = inferer.network.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k].cpu(), saved[k]) for k in saved)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.pt")):
        build_slide_inferer(slide_bundle, tmp_path / "none.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="inference_wsi.json"):
        build_slide_inferer(tmp_path, device="cpu")


def test_monai_wsl_imports_without_monailabel_and_the_task_says_how_to_get_it():
    """monailabel is optional: importing monai_wsl (and monai_wsl.apps) does not import it; where it is not installed,
    the MONAI Label task module says what to install."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util, monai_wsl, monai_wsl.apps\n"
        "assert 'monailabel' not in sys.modules, 'monai_wsl imported monailabel'\n"
        "if importlib.util.find_spec('monailabel') is None:\n"
        "    try:\n"
        "        import monai_wsl.apps.monailabel\n"
        "    except ImportError as e:\n"
        "        assert 'pip install monailabel' in str(e), e\n"
        "        print('refused')\n"
        "else:\n"
        "    import monai_wsl.apps.monailabel\n"
        "    print('imported')\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() in ("refused", "imported")


def test_region_tiles_cover_a_level_1_region_whole(tmp_path):
    """MONAI Label 0.8.5 cuts a region into tiles in level-0 pixels but reads each at the request's level; the app
    gives it these tiles instead: at level 1 (downsample 2) they cover the region's level-1 pixels once each, their
    locations in level-0 pixels."""
    from monai_wsl.apps import region_tiles

    slide = write_synthetic_slide(tmp_path / "synthetic_slide.tif")  # 3072 x 2048 at level 0, levels halving
    region = check_region_request({"image": str(slide), "location": (1000, 500), "size": (700, 300), "level": 1})
    tiles = region_tiles(region, (256, 256))
    assert len(tiles) == 3 * 2
    covered = np.zeros((300, 700), int)
    for t in tiles:
        c = round((t["location"][0] - 1000) / region.downsample)
        r = round((t["location"][1] - 500) / region.downsample)
        w, h = t["size"]
        assert (t["location"][0] - 1000) % 2 == 0 and w <= 256 and h <= 256
        covered[r : r + h, c : c + w] += 1
    assert (covered == 1).all()  # the whole region, no pixel twice
    assert tiles[-1] == {"location": (1000 + 2 * 512, 500 + 512), "size": (700 - 512, 300 - 256)}
    one = region_tiles(region, region.size)
    assert one == [{"location": (1000, 500), "size": (700, 300)}]
    with pytest.raises(DataError, match="tile_size"):
        region_tiles(region, (0, 256))


def test_a_model_of_the_synthetic_set_is_served_with_a_warning(tmp_path):
    """The MONAI Label app logs this warning when the model card says the synthetic set (the quick start); a model
    trained on other data, or one without a card, gets none; an unknown id is answered with the id."""
    from monai_wsl.apps import synthetic_model_warning, unknown_image_message

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    assert synthetic_model_warning(checkpoint) is None  # no card
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"trained_on": {"synthetic": False, "datalist": "runs/glas/datalist.json"}}))
    assert synthetic_model_warning(checkpoint) is None
    card.write_text(json.dumps({"trained_on": {"synthetic": True, "datalist": "bundle/data/synthetic/datalist.json"}}))
    warning = synthetic_model_warning(checkpoint)
    assert str(checkpoint) in warning and "synthetic set" in warning and "Train" in warning
    card.write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        synthetic_model_warning(checkpoint)
    message = unknown_image_message("train_99", tmp_path)
    assert "'train_99'" in message and str(tmp_path) in message


@pytest.mark.parametrize(
    ("request_", "region"),
    [
        ({"image": "/studies/train_12.jpg"}, False),  # /infer/{model} on a GlaS image: the bundle's image task
        ({"image": "/studies/train_1.BMP", "output": "image"}, False),
        ({"image": "/studies/cmu_small_region.svs"}, True),  # a slide file goes to the slide task (which asks a size)
        ({"image": "/studies/slide.TIFF"}, True),
        ({"image": "/studies/train_12.jpg", "location": [0, 0], "size": [512, 512]}, True),  # a tile of /infer/wsi_v2
        ({"image": "/studies/train_12.jpg", "size": [512, 512]}, True),
        ({"image": "/studies/train_12.jpg", "location": None, "size": None}, False),
        ({"image": None}, False),
    ],
)
def test_a_request_goes_to_the_slide_task_when_it_asks_for_a_region_or_names_a_slide(request_, region):
    """The app serves images and slide regions under one model name: a request with a location or a size (every tile
    of /infer/wsi_v2) or one for a slide file is a region; any other is an image for the bundle's inference.json."""
    from monai_wsl.apps import is_region_request

    assert is_region_request(request_) is region
