"""Pixel-level localization scores of binary masks: F1+ / F1- (Dice of foreground / background), IoU and the pixel
false-positive rate, per image.

Empty-mask convention (``ignore_empty=True``, as MONAI's ``DiceMetric``): a score whose ground-truth region is empty
is NaN and left out of the mean. A benign image with no gland/tumour pixel therefore has F1+ = NaN and a valid F1-;
this is the CAMELYON16 protocol of the paper (F1+ over metastatic patches only, F1- over patches with some
background). With ``ignore_empty=False`` an empty ground-truth region scores 1 if the prediction is empty too, else 0.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = [
    "check_mask",
    "binarize",
    "pixel_confusion",
    "compute_pixel_f1",
    "compute_pixel_iou",
    "compute_pixel_fpr",
    "PixelF1Metric",
    "PixelIoUMetric",
    "PixelFPRMetric",
    "REGIONS",
]

REGIONS = ("both", "foreground", "background")


def check_mask(mask: torch.Tensor, name: str, binary: bool = False) -> torch.Tensor:
    """Validate a mask ``(B, 1, *spatial)`` (or ``(B, 2, *spatial)`` ``[background, foreground]``, whose
    foreground channel is used) with values in [0, 1] (``{0, 1}`` when ``binary``); returns ``(B, 1, *spatial)``."""
    # Plain tensors: MONAI's per-image meta data does not survive the flattening and pooling done here.
    mask = mask.as_tensor() if hasattr(mask, "as_tensor") else torch.as_tensor(mask)
    if mask.ndim < 3 or mask.shape[1] not in (1, 2):
        raise ValueError(f"{name} must have shape (B, 1, *spatial), got {tuple(mask.shape)}.")
    if mask.shape[1] == 2:
        mask = mask[:, 1:]
    if mask.dtype == torch.bool:
        return mask
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(
            f"{name} must hold values in [0, 1], got [{mask.min().item():g}, {mask.max().item():g}]; for a label "
            "map with instance ids or 255 for foreground, binarise it first (e.g. `mask > 0`)."
        )
    if binary and not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name} must be binary (0 / 1); threshold it first (e.g. `AsDiscrete(threshold=0.5)`).")
    return mask


def binarize(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``mask >= threshold`` after :func:`check_mask` (a binary mask passes unchanged)."""
    return check_mask(mask, "y_pred") >= threshold


def pixel_confusion(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image pixel counts ``(B, 4)``: ``[TP, FP, FN, TN]`` of binary masks ``(B, 1, *spatial)``."""
    p = check_mask(y_pred, "y_pred", binary=True).bool()
    g = check_mask(y, "y", binary=True).bool().to(p.device)  # a ground truth kept on the CPU meets a GPU prediction
    if p.shape != g.shape:
        raise ValueError(
            f"y_pred and y must have the same shape, got {tuple(p.shape)} and {tuple(g.shape)}; map the prediction "
            "back to the ground truth's size first."
        )
    p, g = p.flatten(1), g.flatten(1)
    tp = (p & g).sum(1)
    fp = (p & ~g).sum(1)
    fn = (~p & g).sum(1)
    tn = (~p & ~g).sum(1)
    return torch.stack([tp, fp, fn, tn], 1).double()


def _ratio(num: torch.Tensor, den: torch.Tensor, empty: torch.Tensor, ignore_empty: bool) -> torch.Tensor:
    """num / den; where the ground-truth region is empty: NaN, or 1 when the prediction is empty too (den == 0)."""
    out = num / den.clamp_min(1)
    fallback = torch.full_like(out, float("nan")) if ignore_empty else (den == 0).to(out.dtype)
    return torch.where(empty, fallback, out).float()


def compute_pixel_f1(y_pred: torch.Tensor, y: torch.Tensor, ignore_empty: bool = True) -> torch.Tensor:
    """Per-image ``(B, 2)`` ``[F1+, F1-]``: Dice of the foreground, ``2|P n G| / (|P| + |G|)``, and of the background,
    the same on ``1 - P`` and ``1 - G``. Binary masks ``(B, 1, *spatial)``; see the module doc for empty regions."""
    tp, fp, fn, tn = pixel_confusion(y_pred, y).unbind(1)
    f1_fg = _ratio(2 * tp, 2 * tp + fp + fn, (tp + fn) == 0, ignore_empty)
    f1_bg = _ratio(2 * tn, 2 * tn + fn + fp, (tn + fp) == 0, ignore_empty)
    return torch.stack([f1_fg, f1_bg], 1)


def compute_pixel_iou(y_pred: torch.Tensor, y: torch.Tensor, ignore_empty: bool = True) -> torch.Tensor:
    """Per-image ``(B, 2)`` ``[IoU+, IoU-]`` of binary masks ``(B, 1, *spatial)``: ``|P n G| / |P u G|`` of the
    foreground and of the background."""
    tp, fp, fn, tn = pixel_confusion(y_pred, y).unbind(1)
    iou_fg = _ratio(tp, tp + fp + fn, (tp + fn) == 0, ignore_empty)
    iou_bg = _ratio(tn, tn + fn + fp, (tn + fp) == 0, ignore_empty)
    return torch.stack([iou_fg, iou_bg], 1)


def compute_pixel_fpr(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image ``(B, 1)`` pixel false-positive rate ``FP / (FP + TN)``: the share of true background marked as
    foreground. NaN for an image without background."""
    tp, fp, fn, tn = pixel_confusion(y_pred, y).unbind(1)
    return _ratio(fp, fp + tn, (fp + tn) == 0, ignore_empty=True)[:, None]


class _PixelMetric(CumulativeIterationMetric):
    """Shared machinery: binarise ``y_pred`` at ``threshold``, score each image, keep the region's columns."""

    def __init__(
        self,
        region: str = "both",
        threshold: float = 0.5,
        ignore_empty: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}.")
        self.region, self.threshold, self.ignore_empty = region, threshold, ignore_empty
        self.reduction, self.get_not_nans = reduction, get_not_nans

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scores = self._score(binarize(y_pred, self.threshold), y)
        return {"both": scores, "foreground": scores[:, :1], "background": scores[:, 1:]}[self.region]

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the buffer must be a tensor, got {type(data).__name__}: call the metric first.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class PixelF1Metric(_PixelMetric):
    """Cumulative F1+ / F1- over images (mean over images with the region present; see :func:`compute_pixel_f1`).

    Args:
        region: ``"foreground"`` (F1+), ``"background"`` (F1-) or ``"both"`` (columns ``[F1+, F1-]``).
        threshold: ``y_pred`` (a soft mask in [0, 1] or a binary mask) is segmented as ``y_pred >= threshold``.
        ignore_empty: empty ground-truth regions give NaN (skipped by the reduction); else 1 or 0.
        reduction: MONAI metric reduction; ``"mean_batch"`` with ``region="both"`` gives ``[F1+, F1-]``.
        get_not_nans: also return the number of images counted.

    Example::

        metric = PixelF1Metric(region="background")
        metric(y_pred=soft_masks, y=ground_truth)   # (B, 1, H, W) each, any number of batches
        f1_minus = metric.aggregate().item()
    """

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return compute_pixel_f1(y_pred, y, self.ignore_empty)


class PixelIoUMetric(_PixelMetric):
    """Cumulative IoU+ / IoU- over images; arguments as :class:`PixelF1Metric`."""

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return compute_pixel_iou(y_pred, y, self.ignore_empty)


class PixelFPRMetric(_PixelMetric):
    """Cumulative pixel false-positive rate over images (mean of per-image ``FP / (FP + TN)``)."""

    def __init__(
        self,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__("foreground", threshold, True, reduction, get_not_nans)

    def _score(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return compute_pixel_fpr(y_pred, y)
