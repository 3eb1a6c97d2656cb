"""Ignite wrapper of PxAP, the one localization metric MONAI lacks (MONAI's ``MeanDice`` pattern)."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler

from monai_wsl.metrics import PixelAPMetric

__all__ = ["PixelAP"]


class PixelAP(IgniteMetricHandler):
    """PxAP pooled over every pixel of the epoch (:class:`~monai_wsl.metrics.PixelAPMetric`). ``output_transform``
    gives ``(y_pred, y)``: continuous maps in [0, 1] and binary ground truth. ``num_bins`` score bins (memory
    independent of the number of pixels; ``None``: every pixel kept, the exact value). Per-pixel details are not
    saved."""

    def __init__(self, output_transform: Callable = lambda x: x, num_bins: int | None = 1000) -> None:
        super().__init__(PixelAPMetric(num_bins), output_transform=output_transform, save_details=False)
