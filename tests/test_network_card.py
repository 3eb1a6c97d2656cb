"""One definition of the network: a tiny model trained with non-default settings (``w``, ``scale_in_cl``, the WILDCAT
head's, the padding) records them all in its model card, and evaluation, inference, whole-slide inference, the
TorchScript export and the MONAI Label paths build that network from the card alone (the same masks as the trained
network's own), while a setting that contradicts the card is refused, naming it."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_wsl.model_card import MODEL_CARD, network_from_card
from monai_wsl.networks import MaskOutput, MaxMinUncertaintyNet
from tests.test_bundle import CONFIGS, REPO, run, workflow

tifffile = pytest.importorskip("tifffile")

#: the training's settings, none of them the default (the hazard: evaluated without them, other masks and no warning)
TRAINED = {
    "network_def#w": 7.5,
    "network_def#scale_in_cl": 0.7,
    "network_def#wildcat#kmax": 0.25,
    "network_def#wildcat#kmin": 0.1,
    "network_def#wildcat#alpha": 0.7,
    "padding_mode": "replicate",
    "network_def#pretrained": False,
    "max_epochs": 1,
}


#: eager PyTorch: this tiny model (no ImageNet weights, one epoch) has features of about 1e-9 and maps flat to within
#: float precision, which the per-image min-max normalisation of the mask magnifies, so any other arithmetic (ONNX
#: Runtime's, the inference default on CPUs) gives other masks; the backends are compared in tests/test_backends.py
TORCH = {"inference_backend": "torch"}


def settings(net: MaxMinUncertaintyNet) -> dict:
    """The settings a trained max-min network runs with: none of them is in its state dict, so a network built with
    other values loads the weights without a word."""
    pool = net.localizer_head.pool
    return {
        "class": type(net).__name__,
        "w": net.w,
        "scale_in_cl": net.scale_in_cl,
        "kmax": pool.kmax,
        "kmin": pool.kmin,
        "alpha": pool.alpha,
        "modalities": net.localizer_head.modalities,
        "classifier_kmax": net.classifier_head.pool.kmax,
        "padding_mode": net.padding_mode,
        "pads": sorted({type(m).__name__ for m in net.encoder.modules() if "Pad" in type(m).__name__}),
        "shared_encoder": net.shared_encoder,
        "train_mask_norm": net.train_mask_norm,
        "spatial_dims": net.spatial_dims,
        "num_classes": net.num_classes,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A bundle root with one epoch of training (TRAINED settings) on the small synthetic set, and the trained
    network itself with the selected model's weights: the reference every built network is held to (in the layout
    the evaluation and inference paths run it in: training on a CPU ran it in channels-last, whose convolutions
    round otherwise)."""
    root = tmp_path_factory.mktemp("carded")
    wf = run(workflow(root, **TRAINED))
    own = copy.deepcopy(wf.parser.get_parsed_content("network_def")).cpu().eval()
    own = own.to(memory_format=torch.contiguous_format)
    own.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    return root, own


def same_network(built: torch.nn.Module, own: MaxMinUncertaintyNet) -> None:
    """``built`` is ``own``: the same settings, the same definition but the initial weights, the same outputs."""
    built = built.network if isinstance(built, MaskOutput) else built
    assert settings(built) == settings(own)
    config = {k: v for k, v in built.get_config().items() if k not in ("pretrained", "pretrained_path")}
    assert config == {k: v for k, v in own.get_config().items() if k not in ("pretrained", "pretrained_path")}
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mine, theirs = own.predict(x), built.cpu().eval().predict(x)
    torch.testing.assert_close(theirs["mask"], mine["mask"], rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs["logits"], mine["logits"], rtol=0, atol=1e-5)


def own_mask(own: MaxMinUncertaintyNet, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return own.predict(torch.as_tensor(image)[None].float())["mask"][0, 0]


def assert_mask_file_is(path: Path, soft: torch.Tensor, threshold: float = 0.5) -> None:
    """A saved 0 / 255 PNG mask (MONAI's (W, H) axes of a PNG-read image) is ``soft >= threshold``, but where the soft
    value is within 1e-5 of the threshold (a batch of other size may round there otherwise)."""
    saved = torch.from_numpy(np.array(Image.open(path)) > 0).T
    expected = soft >= threshold
    undecided = (soft - threshold).abs() < 1e-5
    assert saved.shape == expected.shape and torch.equal(saved[~undecided], expected[~undecided])


def test_the_card_records_the_whole_network_definition(trained):
    root, own = trained
    card = json.loads((root / "models" / MODEL_CARD).read_text())
    recorded = card["network_def"]
    assert recorded == json.loads(json.dumps(own.get_config()))
    assert recorded["_target_"] == "monai_wsl.networks.nets.maxmin.MaxMinUncertaintyNet"
    assert (recorded["w"], recorded["scale_in_cl"], recorded["padding_mode"]) == (7.5, 0.7, "replicate")
    assert recorded["wildcat"] == {"modalities": 5, "kmax": 0.25, "kmin": 0.1, "alpha": 0.7, "dropout": 0.1}
    assert card["trained_on"]["padding_mode"] == "replicate"
    # the hazard this guards against: the same weights in a network of the default settings give other maps
    default = MaxMinUncertaintyNet(encoder="efficientnet-lite0").eval()
    default.load_state_dict(own.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(default.predict(x)["mask"], own.predict(x)["mask"], atol=1e-3)


def test_evaluate_builds_the_trained_network_and_its_masks(trained, tmp_path):
    root, own = trained
    wf = run(workflow(root, ("train.json", "evaluate.json"), output_dir=str(tmp_path), **TORCH))
    same_network(wf.parser.get_parsed_content("network"), own)  # the weights the evaluation loaded
    dataset = wf.parser.get_parsed_content("validate#dataset")
    assert len(dataset) == 4
    for item in dataset:
        stem = Path(item["image"].meta["filename_or_obj"]).name.split(".")[0]
        assert_mask_file_is(tmp_path / "masks" / f"{stem}_mask.png", own_mask(own, item["image"]))
    # a setting the card holds, given again with its value, is accepted; one it contradicts is refused
    same = workflow(root, ("train.json", "evaluate.json"), output_dir=str(tmp_path), **{"network_def#w": 7.5})
    same.initialize()
    assert same.parser.get_parsed_content("network_def").w == 7.5


def test_a_setting_that_contradicts_the_card_is_refused_naming_it(trained, tmp_path):
    root, _ = trained
    card = root / "models" / MODEL_CARD
    cases = [
        (("train.json", "evaluate.json"), {"network_def#wildcat#kmax": 0.3}, "network_def#wildcat#kmax = 0.3 given"),
        (("inference.json",), {"network_def#network#scale_in_cl": 0.8}, "network_def#scale_in_cl = 0.8 given"),
    ]
    for configs, override, said in cases:
        wf = workflow(root, configs, "infer" if len(configs) == 1 else "train", output_dir=str(tmp_path), **override)
        with pytest.raises(RuntimeError) as info:
            wf.initialize()
        error, text = info.value, ""
        while error is not None:
            text, error = text + str(error), error.__cause__
        assert str(card) in text and said in text, text[-2000:]
    # the command line, as a user types it
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               str([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]), "--bundle_root", str(root),
               "--output_dir", str(tmp_path / "cli"), "--num_workers", "0", "--network_def#w", "5.0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode != 0
    assert str(card) in done.stderr and "network_def#w = 5.0 given, 7.5 in the card" in done.stderr
    assert not (tmp_path / "cli" / "metrics.csv").exists()


def test_inference_and_torchscript_export_build_the_trained_network(trained, tmp_path):
    from monai.bundle import ckpt_export

    root, own = trained
    data = root / "data" / "synthetic"
    wf = run(workflow(root, ("inference.json",), "infer", dataset_dir=str(data), output_dir=str(tmp_path), **TORCH))
    same_network(wf.parser.get_parsed_content("network"), own)
    for item in wf.parser.get_parsed_content("dataset"):
        stem = Path(item["image"].meta["filename_or_obj"]).name.split(".")[0]
        assert_mask_file_is(tmp_path / f"{stem}_mask.png", own_mask(own, item["image"]))

    exported_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported_file),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        use_trace=True,
        input_shape=[1, 3, 64, 64],
        bundle_root=str(root),
    )
    exported = torch.jit.load(str(exported_file))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(exported(x), MaskOutput(own)(x), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def carded_bundle(trained, tmp_path_factory):
    """A bundle folder as MONAI Label is given it: the repository's configs, the model and its card."""
    root, _ = trained
    bundle = tmp_path_factory.mktemp("served") / "wsl_histology_segmentation"
    shutil.copytree(CONFIGS, bundle / "configs")
    shutil.copytree(root / "models", bundle / "models", ignore=shutil.ignore_patterns("checkpoint*"))
    return bundle


def test_whole_slide_and_monai_label_region_build_the_trained_network(trained, carded_bundle, tmp_path):
    from monai_wsl.apps import build_slide_inferer, infer_slide_region
    from tests.test_slides import write_slide

    root, own = trained
    image = np.array(Image.open(sorted((root / "data" / "synthetic").glob("validation_*[0-9].png"))[0]).convert("RGB"))
    rgb = np.tile(image[:64, :64], (2, 2, 1))  # 128 x 128: four 64-pixel patches of tissue
    slide = write_slide(tmp_path / "s.tif", rgb=rgb, tile=64)
    overrides = {
        **TORCH,
        "patch_size": 64,
        "overlap": 0.0,
        "num_workers": 0,
        "output_dir": str(tmp_path / "out"),
        "min_tissue": 0.0,
    }
    inferer = build_slide_inferer(carded_bundle, device="cpu", overrides=overrides)  # as the MONAI Label task does
    same_network(inferer.network, own)
    patches = [torch.from_numpy(rgb[y : y + 64, x : x + 64]).permute(2, 0, 1) for y in (0, 64) for x in (0, 64)]
    with torch.no_grad():  # the trained network on the four patches, preprocessed as the whole-slide path does
        masks = own.predict(torch.as_tensor(inferer.preprocessing(torch.stack(patches).float())))["mask"][:, 0]
    expected = torch.cat([torch.cat([masks[0], masks[1]], 1), torch.cat([masks[2], masks[3]], 1)], 0).numpy()
    region = infer_slide_region(inferer, {"image": str(slide), "location": (0, 0), "size": (128, 128), "level": 0})
    undecided = np.abs(expected - 0.5) < 1e-5
    assert np.array_equal(region["pred"][~undecided], (expected >= 0.5)[~undecided])
    inferer.run([slide])  # inference_wsi.json's whole-slide path: the map, 8-bit
    level0 = tifffile.imread(tmp_path / "out" / "s_map.tif", key=0).astype(float)
    assert level0.shape == (128, 128) and np.abs(level0 - expected * 255).max() <= 0.5 + 1e-3


def test_monai_label_bundle_task_serves_the_trained_networks_mask(trained, carded_bundle, tmp_path):
    from monai.transforms import ScaleIntensityRange

    from tests.test_monailabel import serve

    root, own = trained
    image = sorted((root / "data" / "synthetic").glob("validation_*[0-9].png"))[0]
    # (H, W), as the label file reads back; in eager PyTorch, as TORCH above says why (ONNX Runtime's masks of this
    # model differ by up to 0.04)
    served, _ = serve(carded_bundle, image, {"image": str(image)}, inference_backend="torch")
    scale = ScaleIntensityRange(a_min=0, a_max=255, b_min=-1.0, b_max=1.0, clip=True)  # inference.json's
    pixels = torch.as_tensor(
        scale(torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float())
    )
    soft = own_mask(own, pixels.transpose(1, 2)).T.numpy()  # the bundle runs on MONAI's (W, H) axes of a PNG
    decided = np.abs(soft - 0.5) >= 1e-5
    assert served.shape == soft.shape and np.array_equal(served[decided], (soft >= 0.5)[decided])


def test_a_model_without_network_def_in_its_card_is_built_from_the_configuration(tmp_path, caplog):
    """Models saved before cards recorded network_def (no card, or a card of trained_on alone): the configuration's
    settings and the class defaults, the class and padding an older card names; a warning says so (once per model
    when there is no card at all)."""
    checkpoint = tmp_path / "model.pt"
    plain = network_from_card(checkpoint, without_card={"encoder": "efficientnet-lite0"}, w=7.5)
    assert type(plain).__name__ == "MaxMinUncertaintyNet" and plain.w == 7.5 and plain.padding_mode == "zeros"
    assert f"no {MODEL_CARD} beside {checkpoint}" in caplog.text and "--network_def#padding_mode" in caplog.text
    network_from_card(checkpoint, without_card={"encoder": "efficientnet-lite0"}, w=7.5)
    assert len(caplog.records) == 1
    caplog.clear()
    (tmp_path / MODEL_CARD).write_text(
        json.dumps({"trained_on": {"network": "CAMClassifier", "padding_mode": "replicate"}})
    )
    older = network_from_card(checkpoint, without_card={"encoder": "efficientnet-lite0"})
    assert type(older).__name__ == "CAMClassifier" and older.padding_mode == "replicate"
    assert "does not record the network's definition" in caplog.text and str(tmp_path / MODEL_CARD) in caplog.text
    (tmp_path / MODEL_CARD).write_text(json.dumps({"network_def": ["not", "a", "config"]}))
    with pytest.raises(ValueError, match="is damaged"):
        network_from_card(checkpoint)


def test_a_served_synthetic_set_model_is_warned_of_once_in_the_servers_log(tmp_path, caplog, monkeypatch):
    """Under MONAI Label (its launcher sets MONAI_LABEL_APP_DIR) any app whose network is built from the card, such as
    MONAI Label's monaibundle app running inference.json, logs that a quick-start model's masks mean nothing, once per
    model; outside MONAI Label (the quick start's own evaluation) and for a model of other data, nothing."""
    checkpoint = tmp_path / "model.pt"
    card = {"trained_on": {"synthetic": True, "datalist": "bundle/data/synthetic/datalist.json"}}
    (tmp_path / MODEL_CARD).write_text(json.dumps(card))
    without = {"encoder": "efficientnet-lite0"}
    caplog.set_level(logging.WARNING)
    network_from_card(checkpoint, without_card=without)
    assert "synthetic set" not in caplog.text
    monkeypatch.setenv("MONAI_LABEL_APP_DIR", str(tmp_path / "app"))
    network_from_card(checkpoint, without_card=without)
    network_from_card(checkpoint, without_card=without)
    warnings = [r.getMessage() for r in caplog.records if "synthetic set" in r.getMessage()]
    assert len(warnings) == 1 and str(checkpoint) in warnings[0] and "Train on your data" in warnings[0]
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    (other.parent / MODEL_CARD).write_text(json.dumps({"trained_on": {"synthetic": False}}))
    network_from_card(other, without_card=without)
    assert len([r for r in caplog.records if "synthetic set" in r.getMessage()]) == 1


def test_snapshots_are_built_as_their_training_from_its_card(tmp_path, caplog):
    """The weights --snapshot_interval keeps in models/snapshots/ have no card of their own: the training's card in
    models/ gives their network (here edge padding and another w), not the defaults; a card in snapshots/ wins."""
    from monai_wsl.model_card import card_file

    models = tmp_path / "models"
    (models / "snapshots").mkdir(parents=True)
    snapshot = models / "snapshots" / "model_epoch=10.pt"
    net_def = {
        "_target_": "monai_wsl.networks.MaxMinUncertaintyNet",
        "encoder": "efficientnet-lite0",
        "w": 7.5,
        "padding_mode": "replicate",
        "pretrained": False,
    }
    (models / MODEL_CARD).write_text(json.dumps({"network_def": net_def}))
    assert card_file(snapshot) == models / MODEL_CARD
    net = network_from_card(snapshot, without_card={"encoder": "efficientnet-lite0"})
    assert net.w == 7.5 and net.padding_mode == "replicate" and not caplog.records
    # only a snapshots/ folder borrows its training's card: another folder's checkpoint does not
    elsewhere = tmp_path / "other" / "model.pt"
    elsewhere.parent.mkdir()
    assert card_file(elsewhere) == elsewhere.parent / MODEL_CARD
    assert network_from_card(elsewhere, without_card={"encoder": "efficientnet-lite0"}).padding_mode == "zeros"
    (models / "snapshots" / MODEL_CARD).write_text(json.dumps({"network_def": {**net_def, "w": 5.0}}))
    assert card_file(snapshot) == models / "snapshots" / MODEL_CARD
    assert network_from_card(snapshot).w == 5.0
