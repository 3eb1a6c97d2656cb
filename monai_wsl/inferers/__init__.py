from __future__ import annotations

from .backends import BACKENDS, OnnxNetwork, StaleExportError, export_onnx, resolve_backend, with_backend
from .inferer import CAM_METHODS, GradCAMInferer, WSLInferer
from .shard import SlideShards, balanced_shares, parse_shard, tissue_area_estimate
from .slide import SlideInferer, TissueWSISplitter, binary_entropy
