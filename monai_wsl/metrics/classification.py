"""Image-level classification error (or accuracy), cumulative over iterations."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["as_class_indices", "compute_classification_error", "ClassificationErrorMetric"]


def as_class_indices(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, K)`` scores / one-hot (K > 1) -> argmax; ``(B,)`` or ``(B, 1)`` indices pass through. Returns ``(B,)``."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    if x.ndim == 0:
        x = x[None]
    if x.ndim == 2 and x.shape[1] > 1:
        return x.argmax(1)
    if x.ndim == 2 and x.shape[1] == 1:
        return x[:, 0].round().long()
    if x.ndim == 1:
        return x.round().long()
    raise ValueError(f"{name} must be (B, K) scores or (B,) class indices, got shape {tuple(x.shape)}.")


def compute_classification_error(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image ``(B, 1)`` error, 1.0 where the predicted class (argmax of ``y_pred`` logits / probabilities, or
    indices) differs from the label ``y`` (indices or one-hot)."""
    p, t = as_class_indices(y_pred, "y_pred"), as_class_indices(y, "y")
    if p.shape != t.shape:
        raise ValueError(f"y_pred and y disagree on the batch size: {tuple(p.shape)} vs {tuple(t.shape)}.")
    return (p != t.to(p.device)).float()[:, None]


class ClassificationErrorMetric(CumulativeIterationMetric):
    """Classification error over images, a fraction in [0, 1] (``accuracy=True`` gives ``1 - error``, the paper's
    model-selection criterion, greater is better).

    Args:
        accuracy: report accuracy instead of error.
        reduction: MONAI metric reduction over the per-image values.

    Example::

        metric = ClassificationErrorMetric()
        metric(y_pred=logits, y=labels)   # (B, K), (B,)
        error = metric.aggregate().item()
    """

    def __init__(self, accuracy: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.accuracy, self.reduction = accuracy, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        error = compute_classification_error(y_pred, y)
        return 1.0 - error if self.accuracy else error

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("ClassificationErrorMetric has no data: call it on predictions first.")
        f, _ = do_metric_reduction(data, reduction or self.reduction)
        return f
