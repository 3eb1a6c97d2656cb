"""Ignite wrappers of the localization and classification metrics (MONAI's ``MeanDice`` pattern)."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.utils import MetricReduction

from monai_wsl.metrics import (
    ClassificationErrorMetric,
    PixelAPMetric,
    PixelF1Metric,
    PixelFPRMetric,
    PixelIoUMetric,
)

__all__ = ["PixelF1", "PixelIoU", "PixelFPR", "PixelAP", "ClassificationError"]


def _identity(x):
    return x


class _PixelRegionHandler(IgniteMetricHandler):
    metric_class: type = PixelF1Metric

    def __init__(
        self,
        region: str = "foreground",
        threshold: float = 0.5,
        ignore_empty: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric_fn = self.metric_class(region, threshold, ignore_empty, reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class PixelF1(_PixelRegionHandler):
    """F1+ (``region="foreground"``) or F1- (``"background"``) over the epoch; see
    :class:`~monai_wsl.metrics.PixelF1Metric`. ``output_transform`` must give ``(y_pred, y)``: soft or binary masks
    and binary ground truth, ``(B, 1, *spatial)`` batches or lists of ``(1, *spatial)`` items."""

    metric_class = PixelF1Metric


class PixelIoU(_PixelRegionHandler):
    """IoU+ / IoU- over the epoch; arguments as :class:`PixelF1`."""

    metric_class = PixelIoUMetric


class PixelFPR(IgniteMetricHandler):
    """Mean per-image pixel false-positive rate over the epoch."""

    def __init__(
        self, threshold: float = 0.5, output_transform: Callable = _identity, save_details: bool = True
    ) -> None:
        super().__init__(PixelFPRMetric(threshold), output_transform=output_transform, save_details=save_details)


class PixelAP(IgniteMetricHandler):
    """PxAP pooled over every pixel of the epoch. Per-pixel details are not saved (they are the whole buffer)."""

    def __init__(self, output_transform: Callable = _identity) -> None:
        super().__init__(PixelAPMetric(), output_transform=output_transform, save_details=False)


class ClassificationError(IgniteMetricHandler):
    """Classification error (``accuracy=True``: accuracy) over the epoch; ``output_transform`` gives
    ``(logits or probabilities, labels)``."""

    def __init__(
        self, accuracy: bool = False, output_transform: Callable = _identity, save_details: bool = True
    ) -> None:
        metric_fn = ClassificationErrorMetric(accuracy=accuracy)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
