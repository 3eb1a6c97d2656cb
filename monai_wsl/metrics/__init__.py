from __future__ import annotations

from .pxap import PixelAPMetric, binned_average_precision, compute_pxap, pxap_histograms
