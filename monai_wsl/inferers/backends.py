"""Inference backends: the network as eager PyTorch, or its prediction exported to ONNX
(:mod:`monai_wsl.inferers.onnx_export`) and run by ONNX Runtime on CPUs, where EfficientNet-lite's mask and class
run 2.4 to 2.7 times as fast as in eager PyTorch (2 cores, README "Speed").

:func:`with_backend` gives the network an inference path runs: the network itself (``"torch"``), or an
:class:`OnnxNetwork` (``"onnxruntime"``), an ``nn.Module`` with the same ``predict`` / ``segment`` / ``forward``, so
that ``SlideInferer``, ``WSLInferer`` and MONAI's evaluators run it unchanged. ``"auto"`` picks ONNX Runtime on a CPU
when it is installed (a dependency of the package), PyTorch otherwise (GPUs). An export is used only when its sidecar
matches the network being run, weights included; any other (stale, damaged, from another model, another torch) is
rebuilt, with a warning that names the file and why, or, with ``rebuild=False``, refused with an error that names the
file and the fix. The session is made from the bytes that were checked (or exported), so a file replaced meanwhile is
never run.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.utils import convert_to_dst_type

from monai_wsl.networks.utils import as_plain_tensor

from .onnx_export import OUTPUTS, export_key, export_mismatch, export_paths, inner_network, make_export, write_export

__all__ = [
    "BACKENDS",
    "StaleExportError",
    "onnxruntime_available",
    "resolve_backend",
    "with_backend",
    "OnnxNetwork",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
_INSTALL = "pip install onnxruntime onnx (dependencies of monai_wsl: pip install -e . installs them)"


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "OPSET", "weights_digest", "structure_digest", "export_key", "export_paths"):
        from . import onnx_export  # moved to monai_wsl.inferers.onnx_export; importable here

        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class OnnxNetwork(nn.Module):
    """A monai_wsl network run by ONNX Runtime on the CPU: ``predict(x) -> {"mask", "logits"}``, ``segment(x)`` (the
    mask alone, from an export of its own) and ``forward(x)`` ``[1 - M, M]`` as
    :class:`~monai_wsl.networks.MaskOutput` gives, on ``(B, C, *spatial)`` float images, outputs on the input's
    device.

    Nothing is exported until images arrive: at the first batch of each spatial size, the network's weights as they
    are then (a checkpoint loaded after this module was made included) are looked up in the export beside
    ``checkpoint`` (:mod:`monai_wsl.inferers.onnx_export`: its names and sidecar), which is used when its sidecar
    matches, else rebuilt (``rebuild=False``: refused with :class:`StaleExportError`). Loading other weights later
    (into this module or the network) is noticed at the next batch, which then uses a matching export.

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
        return int(getattr(inner_network(self.network), "in_channels", 3))

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def export_path(self, spatial_size: tuple[int, ...], kind: str = "predict") -> Path:
        """The ONNX file for images of ``spatial_size`` (``kind``: ``"predict"`` or ``"segment"``)."""
        return export_paths(self.export_dir, self.stem, spatial_size, kind)[0]

    def _versions(self) -> tuple:
        """The tensors' version counters: they move when the weights are changed in place (``load_state_dict``)."""
        net = inner_network(self.network)
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
        why, data = export_mismatch(path, key)
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
            data, sidecar = make_export(self.network, spatial_size, self.in_channels, self.checkpoint, kind)
            try:
                write_export(path, data, sidecar)
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
        net = inner_network(self.network)
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
