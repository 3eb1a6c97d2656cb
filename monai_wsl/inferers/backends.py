"""Inference backends: the network as eager PyTorch, or its prediction exported to ONNX and run by ONNX Runtime on
CPUs, where EfficientNet-lite runs several times faster than in eager PyTorch.

:func:`with_backend` gives the network an inference path runs: the network itself (``"torch"``), or an
:class:`OnnxNetwork` (``"onnxruntime"``), an ``nn.Module`` with the same ``predict`` / ``segment`` / ``forward``, so
that ``SlideInferer``, ``WSLInferer`` and MONAI's evaluators run it unchanged. ``"auto"`` picks ONNX Runtime on a CPU
when it is installed (a dependency of the package), PyTorch otherwise (GPUs).

The export (:func:`export_onnx`) is the network's ``predict``: ``image (B, C, H, W)`` -> ``mask (B, 1, H, W)``,
``logits (B, K)``, traced by PyTorch's TorchScript-based ONNX exporter in evaluation mode, which folds every batch
norm into its convolution; the batch is dynamic, the spatial size is that of the images it was exported for (the
WILDCAT pooling's top-k counts and the classifier's resize are sizes of the trace), so a path that meets another
image size exports once more for it. ``segment`` (the mask alone, which test-time flips and ``MaskOutput``'s view
run) has an export of its own, ``<stem>.<H>x<W>.mask.onnx``: ONNX Runtime runs every node of a graph whatever
outputs are asked for. Each export is written beside the checkpoint, ``<stem>.<H>x<W>.onnx``, with a sidecar
``<stem>.<H>x<W>.onnx.json`` that records what it was exported from: a digest of the weights and of the network's
structure (its ``repr`` and config), the input size, the outputs, the checkpoint (path, size, modification time,
sha256), the model card's ``network_def``, the torch / onnx versions, the opset and the ONNX file's own sha256. An
export is used only when its sidecar matches the network being run, weights included; any other (stale, damaged,
from another model, another torch) is rebuilt, with a warning that names the file and why, or, with
``rebuild=False``, refused with an error that names the file and the fix. The session is made from the bytes that
were checked (or exported), so a file replaced meanwhile is never run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
import threading
import warnings
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import convert_to_dst_type

from monai_wsl.networks.conversions import unwrap
from monai_wsl.networks.nets.base import MaskOutput
from monai_wsl.networks.utils import as_plain_tensor
from monai_wsl.utils import atomic_write, write_json_atomic

__all__ = [
    "BACKENDS",
    "OPSET",
    "StaleExportError",
    "onnxruntime_available",
    "resolve_backend",
    "with_backend",
    "export_onnx",
    "export_paths",
    "export_key",
    "OnnxNetwork",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
#: the ONNX opset of the exports (ONNX Runtime 1.16 and later run it)
OPSET = 17
#: the sidecar's format; a sidecar of another format is rebuilt
SIDECAR_FORMAT = 1
_INSTALL = "pip install onnxruntime onnx (dependencies of monai_wsl: pip install -e . installs them)"


class StaleExportError(RuntimeError):
    """An ONNX export that does not match the network it would stand for, and may not be rebuilt."""


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ``onnx`` package (which PyTorch's exporter needs) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve_backend(backend: str, device: str | torch.device | None = None) -> str:
    """``"torch"`` or ``"onnxruntime"``: ``backend`` as asked, ``"auto"`` resolved (ONNX Runtime on a CPU when it is
    installed, PyTorch otherwise). Raises a ``ValueError`` for an unknown name or ONNX Runtime on a GPU (its CPU
    build is what the project installs), an ``ImportError`` naming the install when ONNX Runtime is asked for and
    missing."""
    if backend not in BACKENDS:
        raise ValueError(f"inference_backend must be one of {BACKENDS}, got {backend!r}.")
    device = torch.device(device if device is not None else "cpu")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(
                f"inference_backend 'onnxruntime' runs the network on the CPU, and the device is {device}: use "
                "'torch' (or 'auto', which picks PyTorch on GPUs), or --device cpu."
            )
        if not onnxruntime_available():
            raise ImportError(f"inference_backend 'onnxruntime' needs ONNX Runtime and onnx: {_INSTALL}.")
    return backend


def with_backend(
    network: nn.Module,
    backend: str = "auto",
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    export_dir: str | Path | None = None,
    rebuild: bool = True,
) -> nn.Module:
    """The module an inference path runs: ``network`` itself for PyTorch, an :class:`OnnxNetwork` around it for ONNX
    Runtime (see :func:`resolve_backend`; ``device`` defaults to the network's). An :class:`OnnxNetwork` is returned
    as it is. ``checkpoint``, ``export_dir`` and ``rebuild``: see :class:`OnnxNetwork`."""
    if isinstance(network, OnnxNetwork):
        return network
    if device is None:
        device = next(iter(network.parameters()), torch.empty(0)).device
    if resolve_backend(backend, device) == "torch":
        return network
    return OnnxNetwork(network, checkpoint=checkpoint, export_dir=export_dir, rebuild=rebuild)


# ---------------------------------------------------------------------------------------------------- the export
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


def _inner(network: nn.Module) -> nn.Module:
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
    net = _inner(network)
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
    net = _inner(network)
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
    data, sidecar = _export(network, spatial_size, in_channels, checkpoint, kind)
    _write(Path(path), data, sidecar)
    return data, sidecar


def _write(path: Path, data: bytes, sidecar: dict) -> None:
    with atomic_write(path) as (tmp,):
        tmp.write_bytes(data)
    write_json_atomic(Path(f"{path}.json"), sidecar)


def _export(
    network: nn.Module,
    spatial_size: tuple[int, ...],
    in_channels: int | None = None,
    checkpoint: str | Path | None = None,
    kind: str = "predict",
) -> tuple[bytes, dict]:
    """The ONNX bytes of ``network.predict`` (or ``segment``) and their sidecar (see :func:`export_onnx`)."""
    if kind not in OUTPUTS:
        raise ValueError(f"kind must be one of {tuple(OUTPUTS)}, got {kind!r}.")
    in_channels = int(in_channels or getattr(_inner(network), "in_channels", 3))
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
    net = _inner(network)
    try:
        return net.get_config() if hasattr(net, "get_config") else type(net).__qualname__
    except TypeError:  # a module argument that records no config
        return type(net).__qualname__


def _mismatch(path: Path, key: dict) -> tuple[str | None, bytes | None]:
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


# ---------------------------------------------------------------------------------------------------- the module
class OnnxNetwork(nn.Module):
    """A monai_wsl network run by ONNX Runtime on the CPU: ``predict(x) -> {"mask", "logits"}``, ``segment(x)`` (the
    mask alone, from an export of its own) and ``forward(x)`` ``[1 - M, M]`` as
    :class:`~monai_wsl.networks.MaskOutput` gives, on ``(B, C, *spatial)`` float images, outputs on the input's
    device.

    Nothing is exported until images arrive: at the first batch of each spatial size, the network's weights as they
    are then (a checkpoint loaded after this module was made included) are looked up in the export beside
    ``checkpoint`` (see the module's doc), which is used when its sidecar matches, else rebuilt (``rebuild=False``:
    refused with :class:`StaleExportError`). Loading other weights later (into this module or the network) is
    noticed at the next batch, which then uses a matching export.

    Args:
        network: a :class:`~monai_wsl.networks.WSLNet` or its ``MaskOutput`` view, with its weights (it is kept, its
            ``state_dict`` / ``load_state_dict`` are this module's, as ``MaskOutput``'s are).
        checkpoint: the model file: the exports go beside it, named after it, and their sidecars record it.
        export_dir: where the exports go instead (default: beside ``checkpoint``; without one, a temporary folder
            removed when this module is).
        rebuild: rebuild a missing or stale export (default), or refuse it. An export that cannot be written (a
            read-only folder) is used for this run without being kept, with a warning.
        num_threads: ONNX Runtime's threads (default: ``torch.get_num_threads()``, which follows
            ``OMP_NUM_THREADS``).
    """

    def __init__(
        self,
        network: nn.Module,
        checkpoint: str | Path | None = None,
        export_dir: str | Path | None = None,
        rebuild: bool = True,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if export_dir is None and self.checkpoint is not None:
            export_dir = self.checkpoint.parent
        if export_dir is None:
            export_dir = tempfile.mkdtemp(prefix="monai_wsl_onnx_")
            weakref.finalize(self, shutil.rmtree, export_dir, True)
        self.export_dir = Path(export_dir)
        self.stem = self.checkpoint.stem if self.checkpoint is not None else "model"
        self.rebuild = bool(rebuild)
        self.num_threads = num_threads
        self._sessions: dict[tuple, tuple[tuple, Any]] = {}
        self._lock = threading.Lock()

    # the wrapped network's attributes the inference paths read
    @property
    def min_spatial_size(self) -> int:
        return int(getattr(self.network, "min_spatial_size", 1))

    @property
    def in_channels(self) -> int:
        return int(getattr(_inner(self.network), "in_channels", 3))

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def export_path(self, spatial_size: tuple[int, ...], kind: str = "predict") -> Path:
        """The ONNX file for images of ``spatial_size`` (``kind``: ``"predict"`` or ``"segment"``)."""
        return export_paths(self.export_dir, self.stem, spatial_size, kind)[0]

    def _versions(self) -> tuple:
        """The tensors' version counters: they move when the weights are changed in place (``load_state_dict``)."""
        net = _inner(self.network)
        return tuple((id(t), t._version) for t in (*net.parameters(), *net.buffers()))

    def session(self, spatial_size: tuple[int, ...], kind: str = "predict") -> Any:
        """The ONNX Runtime session for images of ``spatial_size``, from a matching export (rebuilt when stale)."""
        spatial_size = tuple(int(s) for s in spatial_size)
        versions, where = self._versions(), (kind, spatial_size)
        cached = self._sessions.get(where)
        if cached is not None and cached[0] == versions:
            return cached[1]
        with self._lock:
            cached = self._sessions.get(where)
            if cached is not None and cached[0] == versions:
                return cached[1]
            session = self._load(spatial_size, kind)
            self._sessions[where] = (versions, session)
            return session

    def _load(self, spatial_size: tuple[int, ...], kind: str) -> Any:
        path = self.export_path(spatial_size, kind)
        key = export_key(self.network, spatial_size, self.in_channels, kind)
        why, data = _mismatch(path, key)
        if why is not None:
            if not self.rebuild:
                raise StaleExportError(
                    f"{path} cannot stand for the network being run: {why}. Remove it (and {path.name}.json) to "
                    "export it again, allow rebuilding, or run with inference_backend 'torch'."
                )
            if path.exists():
                logger.warning(f"{path}: {why}; exporting it again")
            else:
                logger.info(f"exporting the network for {'x'.join(map(str, spatial_size))} images to {path}")
            data, sidecar = _export(self.network, spatial_size, self.in_channels, self.checkpoint, kind)
            try:
                _write(path, data, sidecar)
            except OSError as e:  # a read-only model folder: this run uses the export it has just made, unwritten
                logger.warning(
                    f"cannot write the ONNX export {path} ({type(e).__name__}: {e}): this run uses it without "
                    "keeping it, and the next exports it again; make the folder writable to keep it"
                )
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(self.num_threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def _run(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        net = _inner(self.network)
        if hasattr(net, "check_input"):
            net.check_input(x)
        array = as_plain_tensor(x).detach().to("cpu", torch.float32).contiguous().numpy()
        results = self.session(tuple(array.shape[2:]), kind).run(list(OUTPUTS[kind]), {"image": array})
        # on the input's device, with its meta data when it is a MetaTensor (as the eager network's outputs carry)
        return [convert_to_dst_type(torch.from_numpy(np.asarray(r)), x)[0] for r in results]

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask, logits = self._run(x, "predict")
        return {"mask": mask, "logits": logits}

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, "segment")[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.segment(x)
        return torch.cat([1 - mask, mask], dim=1)

    def extra_repr(self) -> str:
        return f"onnxruntime, exports in {self.export_dir}"
