"""The ONNX export of a monai_wsl network, and what it was exported from.

The export (:func:`export_onnx`) is the network's ``predict``: ``image (B, C, H, W)`` -> ``mask (B, 1, H, W)``,
``logits (B, K)``, traced by PyTorch's TorchScript-based ONNX exporter in evaluation mode, which folds every batch
norm into its convolution; the batch is dynamic, the spatial size is that of the images it was exported for (the
WILDCAT pooling's top-k counts and the classifier's resize are sizes of the trace), so a path that meets another
image size exports once more for it. ``segment`` (the mask alone, which test-time flips and ``MaskOutput``'s view
run) has an export of its own, ``<stem>.<H>x<W>.mask.onnx``: ONNX Runtime runs every node of a graph whatever
outputs are asked for. Each export is written beside the checkpoint, ``<stem>.<H>x<W>.onnx``, with a sidecar
``<stem>.<H>x<W>.onnx.json`` that records what it was exported from: a digest of the weights and of the network's
structure (its ``repr`` and config), the input size, the outputs, the checkpoint (path, size, modification time,
sha256), the model card's ``network_def``, the torch / onnx versions, the opset and the ONNX file's own sha256
(:func:`export_mismatch` says why an export does not stand for a network).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_wsl.networks.conversions import unwrap
from monai_wsl.networks.nets.base import MaskOutput
from monai_wsl.utils import atomic_write, write_json_atomic

__all__ = [
    "OPSET",
    "OUTPUTS",
    "inner_network",
    "weights_digest",
    "structure_digest",
    "export_key",
    "export_paths",
    "export_onnx",
    "make_export",
    "write_export",
    "export_mismatch",
]

#: the ONNX opset of the exports (ONNX Runtime 1.16 and later run it)
OPSET = 17
#: the sidecar's format; a sidecar of another format is rebuilt
SIDECAR_FORMAT = 1

#: what an export computes: ``predict`` (the mask and the logits, the localizer and the classifier) or ``segment``
#: (the mask alone: ONNX Runtime runs every node of a graph whatever outputs are asked, so the mask has its own)
OUTPUTS = {"predict": ("mask", "logits"), "segment": ("mask",)}


class _Traced(nn.Module):
    """``predict`` (or ``segment``) as a module whose outputs are a tuple: what the exporter traces."""

    def __init__(self, network: nn.Module, kind: str) -> None:
        super().__init__()
        self.network, self.kind = network, kind

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kind == "segment":
            return (self.network.segment(x),)
        out = self.network.predict(x)
        return out["mask"], out["logits"]


def inner_network(network: nn.Module) -> nn.Module:
    """The network that predicts (out of DDP and :class:`MaskOutput`)."""
    net = unwrap(network)
    return net.network if isinstance(net, MaskOutput) else net


def weights_digest(network: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``network`` (name, dtype, shape and bytes): what an export computes
    with."""
    h = hashlib.sha256()
    for name, t in network.state_dict(keep_vars=False).items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def structure_digest(network: nn.Module) -> str:
    """sha256 of what defines the function besides the weights: the modules as ``repr`` prints them (padding modules,
    convolutions' padding, WILDCAT's settings) and the network's config where it records one."""
    config = network.get_config() if hasattr(network, "get_config") else None
    text = json.dumps({"class": type(network).__qualname__, "repr": repr(network), "config": config}, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_record(checkpoint: str | Path | None) -> dict | None:
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    path = Path(checkpoint)
    stat = path.stat()
    return {
        "file": str(path.resolve()),
        "size": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(),
        "sha256": _file_sha256(path),
    }


def export_key(
    network: nn.Module, spatial_size: tuple[int, ...], in_channels: int, kind: str = "predict"
) -> dict[str, Any]:
    """What an export must match to stand for ``network`` on images of ``spatial_size``: the sidecar's ``key``."""
    net = inner_network(network)
    return {
        "format": SIDECAR_FORMAT,
        "outputs": list(OUTPUTS[kind]),
        "weights_sha256": weights_digest(net),
        "structure_sha256": structure_digest(net),
        "input": [-1, int(in_channels), *(int(s) for s in spatial_size)],
        "opset": OPSET,
        "torch": torch.__version__,
    }


def export_paths(
    directory: str | Path, stem: str, spatial_size: tuple[int, ...], kind: str = "predict"
) -> tuple[Path, Path]:
    """The ONNX file and its sidecar for images of ``spatial_size``: ``<stem>.<H>x<W>.onnx`` (``predict``) or
    ``<stem>.<H>x<W>.mask.onnx`` (``segment``), and the same name with ``.json`` added."""
    size = "x".join(str(int(s)) for s in spatial_size)
    name = f"{stem}.{size}.onnx" if kind == "predict" else f"{stem}.{size}.mask.onnx"
    return Path(directory) / name, Path(directory) / f"{name}.json"


def _export_bytes(network: nn.Module, spatial_size: tuple[int, ...], in_channels: int, kind: str) -> bytes:
    """``network.predict`` (or ``segment``) as an ONNX model (bytes), in evaluation mode; every module's mode is
    left as it was."""
    net = inner_network(network)
    modes = {m: m.training for m in net.modules()}
    module = _Traced(net, kind).eval()
    outputs = list(OUTPUTS[kind])
    example = torch.zeros(2, in_channels, *spatial_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the legacy exporter's deprecation notice, and the tracer's notes on Python ints and bools taken from
            # tensors: those are the sizes the export is keyed on
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,  # with eval mode: batch norm folded into the convolutions
                input_names=["image"],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
            )
    finally:  # the exporter restores the wrapper's mode recursively: put back each module's own
        for m, training in modes.items():
            m.training = training
    return buffer.getvalue()


def export_onnx(
    network: nn.Module,
    path: str | Path,
    spatial_size: tuple[int, ...],
    in_channels: int | None = None,
    checkpoint: str | Path | None = None,
    kind: str = "predict",
) -> tuple[bytes, dict]:
    """Export ``network.predict`` (``kind="segment"``: ``network.segment``) for images of ``spatial_size`` to
    ``path`` and write its sidecar ``path + .json``, both atomically (a reader sees the previous pair or the new
    one). Returns the ONNX bytes and the sidecar."""
    data, sidecar = make_export(network, spatial_size, in_channels, checkpoint, kind)
    write_export(Path(path), data, sidecar)
    return data, sidecar


def write_export(path: Path, data: bytes, sidecar: dict) -> None:
    with atomic_write(path) as (tmp,):
        tmp.write_bytes(data)
    write_json_atomic(Path(f"{path}.json"), sidecar)


def make_export(
    network: nn.Module,
    spatial_size: tuple[int, ...],
    in_channels: int | None = None,
    checkpoint: str | Path | None = None,
    kind: str = "predict",
) -> tuple[bytes, dict]:
    """The ONNX bytes of ``network.predict`` (or ``segment``) and their sidecar (see :func:`export_onnx`)."""
    if kind not in OUTPUTS:
        raise ValueError(f"kind must be one of {tuple(OUTPUTS)}, got {kind!r}.")
    in_channels = int(in_channels or getattr(inner_network(network), "in_channels", 3))
    key = export_key(network, spatial_size, in_channels, kind)
    data = _export_bytes(network, tuple(spatial_size), in_channels, kind)
    import onnx

    sidecar = {
        "key": key,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "exported_from": {
            "checkpoint": _checkpoint_record(checkpoint),
            "network_def": _network_def(network),
            "onnx": onnx.__version__,
            "exporter": "torch.onnx.export (TorchScript-based, dynamo=False), eval mode: batch norm folded",
            "outputs": {"mask": "(B, 1, H, W) in [0, 1]", "logits": "(B, K)"}
            if kind == "predict"
            else {"mask": "(B, 1, H, W) in [0, 1]"},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    return data, sidecar


def _network_def(network: nn.Module) -> Any:
    net = inner_network(network)
    try:
        return net.get_config() if hasattr(net, "get_config") else type(net).__qualname__
    except TypeError:  # a module argument that records no config
        return type(net).__qualname__


def export_mismatch(path: Path, key: dict) -> tuple[str | None, bytes | None]:
    """Why the export at ``path`` does not stand for ``key`` (None when it does), and its bytes when it does."""
    sidecar_path = Path(f"{path}.json")
    if not path.is_file():
        return "it does not exist", None
    if not sidecar_path.is_file():
        return f"its sidecar {sidecar_path.name} (what it was exported from) is missing", None
    try:
        sidecar = json.loads(sidecar_path.read_text())
        recorded, recorded_sha = sidecar["key"], sidecar["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its sidecar {sidecar_path.name} is damaged ({type(e).__name__}: {e})", None
    differ = [k for k in key if recorded.get(k) != key[k]]
    if differ:
        names = {
            "weights_sha256": "weights",
            "structure_sha256": "network structure or settings",
            "input": "input size",
            "outputs": "outputs",
            "torch": "torch version",
        }
        what = ", ".join(f"{names.get(k, k)} ({recorded.get(k)!r:.40} there, {key[k]!r:.40} here)" for k in differ)
        return f"it does not match the network here: {what}", None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded_sha:
        return f"the file changed after it was exported (its sha256 is not the one {sidecar_path.name} records)", None
    return None, data
