from __future__ import annotations

from .pxap import PixelAPMetric, compute_pxap
