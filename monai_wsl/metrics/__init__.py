from __future__ import annotations

from .classification import ClassificationErrorMetric, as_class_indices, compute_classification_error
from .pixel import (
    REGIONS,
    PixelF1Metric,
    PixelFPRMetric,
    PixelIoUMetric,
    binarize,
    check_mask,
    compute_pixel_f1,
    compute_pixel_fpr,
    compute_pixel_iou,
    pixel_confusion,
)
from .pxap import PixelAPMetric, compute_pxap
