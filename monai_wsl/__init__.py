"""monai_wsl: weakly-supervised segmentation of histology images with max-min uncertainty, as MONAI components."""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, handlers, inferers, losses, metrics, model_card, networks, transforms, utils, visualize

__all__ = [
    "data",
    "handlers",
    "inferers",
    "losses",
    "metrics",
    "model_card",
    "networks",
    "transforms",
    "utils",
    "visualize",
]
