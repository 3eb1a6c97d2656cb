"""The inference backends: the ONNX export run by ONNX Runtime equals eager PyTorch, a stale export is rebuilt (or
refused) and never used, and the whole-slide path gives the same maps on either backend."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")  # a dependency of the test extra; skipped only where it is not installed
onnx = pytest.importorskip("onnx")

from monai_wsl.inferers import (  # noqa: E402
    GradCAMInferer,
    OnnxNetwork,
    SlideInferer,
    StaleExportError,
    resolve_backend,
    with_backend,
)
from monai_wsl.inferers.onnx_export import export_paths  # noqa: E402
from monai_wsl.networks import CAMClassifier, MaskOutput, MaxMinUncertaintyNet  # noqa: E402

#: the largest difference between ONNX Runtime's outputs and eager PyTorch's allowed here; measured on these networks
#: and inputs: at most 4.2e-6 in the mask, 3.2e-7 in the logits (EfficientNet-lite0 on 512 x 512 patches: 2.5e-6)
TOL = 1e-4


def _randomize_batch_norm(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics and affine terms far from the identity, so that a batch norm folded wrongly shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net


def test_resolve_backend_picks_onnxruntime_on_cpus_and_torch_on_gpus(tmp_path):
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="runs the network on the CPU"):
        resolve_backend("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="inference_backend must be one of"):
        resolve_backend("tensorrt", "cpu")
    net = MaxMinUncertaintyNet(encoder="resnet10")
    assert with_backend(net, "torch") is net
    wrapped = with_backend(net, "auto")
    assert isinstance(wrapped, OnnxNetwork) and with_backend(wrapped, "auto") is wrapped
    # Grad-CAM differentiates the network: it runs PyTorch's whatever the backend (no export is made)
    cam = CAMClassifier(encoder="resnet10").eval()
    x = torch.rand(2, 3, 64, 64)
    on_ort = OnnxNetwork(MaskOutput(cam), export_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(GradCAMInferer()(x, on_ort)["mask"], GradCAMInferer()(x, MaskOutput(cam))["mask"])
    assert not list(tmp_path.iterdir())


def test_onnx_export_equals_eager_pytorch_with_batch_norm_folded(tmp_path):
    """EfficientNet-lite0's max-min network: the export's mask and logits equal eager PyTorch's for batches of any
    size (one export), there is no batch norm left in the graph, and the network is left in its own mode."""
    torch.manual_seed(0)
    net = _randomize_batch_norm(MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True)).eval()
    net.localizer_head.train()  # a module in its own mode: the export must leave it so
    ort_net = OnnxNetwork(MaskOutput(net), export_dir=tmp_path)
    net.localizer_head.eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = net.predict(x)
        net.localizer_head.train()
        got = ort_net.predict(x)
        assert net.localizer_head.training and not net.encoder.training
        net.localizer_head.eval()
        got_one = ort_net.predict(x[1:2])
        # other images through the same session, one after the other and in two threads at once: the outputs handed
        # out before are not overwritten, and each thread gets its own
        other = ort_net.predict(-x)
        threaded: dict[int, dict] = {}
        threads = [
            threading.Thread(target=lambda i=i, y=y: threaded.__setitem__(i, ort_net.predict(y)))
            for i, y in enumerate((x, -x))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        expected_other = net.predict(-x)
    for key in ("mask", "logits"):
        assert got[key].shape == expected[key].shape
        assert (got[key] - expected[key]).abs().max() <= TOL, key
        assert (other[key] - expected_other[key]).abs().max() <= TOL, key
        assert (other[key] - got[key]).abs().max() > 1e-3, key  # other images, other outputs
        assert torch.equal(threaded[0][key], got[key]) and torch.equal(threaded[1][key], other[key]), key
    assert (got_one["mask"] - expected["mask"][1:2]).abs().max() <= TOL
    assert expected["mask"].std() > 0.05  # a mask with structure, not a constant any graph would match
    path, sidecar = export_paths(tmp_path, "model", (64, 64))
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    recorded = json.loads(sidecar.read_text())
    assert recorded["key"]["input"] == [-1, 3, 64, 64] and recorded["key"]["torch"] == torch.__version__
    assert recorded["exported_from"]["network_def"]["encoder"] == "efficientnet-lite0"


def test_stale_export_is_rebuilt_or_refused_never_used(tmp_path, caplog):
    """The export beside a checkpoint: reused while it matches, rebuilt (with a warning naming it) when the weights
    change or the file is altered, refused with rebuild=False; segment and forward have their own mask-only export."""
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet10").eval()
    checkpoint = tmp_path / "model.pt"
    torch.save(net.state_dict(), checkpoint)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ort_net = OnnxNetwork(MaskOutput(net), checkpoint=checkpoint)
    with torch.no_grad():
        first = ort_net.predict(x)["mask"]
        assert (first - net.predict(x)["mask"]).abs().max() <= TOL
        assert (ort_net.segment(x) - net.segment(x)).abs().max() <= TOL
        assert (ort_net(x) - MaskOutput(net)(x)).abs().max() <= TOL
    path, sidecar = export_paths(tmp_path, "model", (64, 64))
    assert path.is_file() and export_paths(tmp_path, "model", (64, 64), "segment")[0].is_file()
    recorded = json.loads(sidecar.read_text())["exported_from"]["checkpoint"]
    import hashlib

    assert recorded["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert recorded["size"] == checkpoint.stat().st_size

    # a new process with the same model: the export is used as it is
    stamp = path.stat().st_mtime_ns
    with torch.no_grad():
        again = OnnxNetwork(MaskOutput(net), checkpoint=checkpoint).predict(x)["mask"]
    assert path.stat().st_mtime_ns == stamp and torch.equal(again, first)

    # other weights (a new checkpoint, loaded after the wrapper was made): rebuilt, the outputs follow the weights
    other = MaxMinUncertaintyNet(encoder="resnet10").eval()
    torch.save(other.state_dict(), checkpoint)
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    with caplog.at_level(logging.WARNING, logger="monai_wsl.inferers.backends"), torch.no_grad():
        second = ort_net.predict(x)["mask"]
        assert (second - net.predict(x)["mask"]).abs().max() <= TOL
    assert (second - first).abs().max() > 1e-3  # the old export would have given the old masks
    assert (
        f"{path}: it does not match the network here: weights (" in caplog.text and "exporting it again" in caplog.text
    )
    assert json.loads(sidecar.read_text())["exported_from"]["checkpoint"]["sha256"] == (
        hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )

    # an export altered after it was written, with rebuilding off: refused, naming the file and the fix
    path.write_bytes(export_paths(tmp_path, "model", (64, 64), "segment")[0].read_bytes())
    strict = OnnxNetwork(net, checkpoint=checkpoint, rebuild=False)
    with pytest.raises(StaleExportError, match=r"model\.64x64\.onnx cannot stand for .* the file changed") as error:
        strict.predict(x)
    assert "inference_backend 'torch'" in str(error.value)
    sidecar.unlink()
    with pytest.raises(StaleExportError, match="sidecar model.64x64.onnx.json .* is missing"):
        strict.predict(x)
    with torch.no_grad():  # rebuilding on (a new process; a running one keeps the session it checked): made again
        assert (OnnxNetwork(net, checkpoint=checkpoint).predict(x)["mask"] - second).abs().max() <= TOL
    assert sidecar.is_file()

    # a folder that cannot be written (here a file stands where it should be): the export is used, not kept
    (tmp_path / "blocked").write_text("")
    with caplog.at_level(logging.WARNING, logger="monai_wsl.inferers.backends"), torch.no_grad():
        unkept = OnnxNetwork(net, export_dir=tmp_path / "blocked").predict(x)["mask"]
    assert (unkept - second).abs().max() <= TOL and "cannot write the ONNX export" in caplog.text
    assert (tmp_path / "blocked").is_file()


def test_slide_path_on_onnxruntime_gives_the_maps_of_pytorch(tmp_path):
    """The whole-slide command's path (tissue, patches, flips for the uncertainty, merging, the 8-bit TIFFs) on a
    small synthetic slide (its level 1, 384 x 256, in 64-pixel patches): ONNX Runtime's map and uncertainty map
    equal eager PyTorch's to the TIFF's rounding, a region's and the class probabilities within TOL."""
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("openslide")
    from monai_wsl.data import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tif", rows=4, cols=6, tile=128, seed=1)
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True).eval()
    checkpoint = tmp_path / "models" / "model.pt"
    checkpoint.parent.mkdir()
    torch.save(net.state_dict(), checkpoint)
    results = {}
    for backend in ("torch", "onnxruntime"):
        inferer = SlideInferer(
            net,
            tmp_path / backend,
            patch_size=64,
            overlap=0.25,
            level=1,
            batch_size=8,
            progress=False,
            uncertainty=True,
            checkpoint=checkpoint,
            inference_backend=backend,
        )
        assert inferer.inference_backend == backend
        summary = inferer.run([slide])[0]
        maps = [tifffile.imread(tmp_path / backend / f"s_{m}.tif", key=0).astype(int) for m in ("map", "uncertainty")]
        region = inferer.infer_region(slide, location=(128, 128), size=(128, 128))
        results[backend] = (summary, maps, region)
    assert export_paths(checkpoint.parent, "model", (64, 64))[0].is_file()  # beside the checkpoint
    (s_torch, maps_torch, region_torch), (s_ort, maps_ort, region_ort) = results["torch"], results["onnxruntime"]
    assert s_torch["patches_run"] == s_ort["patches_run"] > 8
    for a, b in zip(maps_torch, maps_ort):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # 8-bit: a value at a rounding edge may move by one
        assert a.std() > 5  # structure, not a constant
    for key in ("mask", "uncertainty", "prob"):
        assert np.abs(region_torch[key] - region_ort[key]).max() <= TOL, key
    for key in ("slide_probability", "slide_max_probability"):
        assert s_torch[key] == pytest.approx(s_ort[key], abs=TOL), key


def test_a_volume_network_runs_on_onnxruntime_as_in_pytorch(tmp_path):
    """The 3D recipe's network (ResNet-10 with group norm, output stride 8): the same masks and logits."""
    from monai_wsl.networks.nets.encoders import ResNetEncoder

    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet10", 3, 1, output_stride=8, widen_factor=0.25, norm=("group", {"num_groups": 8}))
    net = MaxMinUncertaintyNet(spatial_dims=3, in_channels=1, encoder=encoder).eval()
    x = torch.rand(2, 1, 24, 32, 40) * 2 - 1
    with torch.no_grad():
        expected, got = net.predict(x), OnnxNetwork(net, export_dir=tmp_path).predict(x)
    assert got["mask"].shape == (2, 1, 24, 32, 40) and expected["mask"].std() > 0.01
    for key in ("mask", "logits"):
        assert (got[key] - expected[key]).abs().max() <= TOL, key
