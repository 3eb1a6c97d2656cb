from __future__ import annotations

from .backends import BACKENDS, OnnxNetwork, StaleExportError, resolve_backend, with_backend
from .inferer import CAM_METHODS, GradCAMInferer, WSLInferer
from .onnx_export import export_onnx
from .shard import SlideShards, balanced_shares, parse_shard, tissue_area_estimate
from .slide import SlideInferer, TissueWSISplitter, binary_entropy
