"""PxAP: area under the pixel precision-recall curve of a continuous map, pooled over all pixels of all images
(Rony et al., "Deep weakly-supervised learning methods for classification and localization in histology images: a
survey", MELBA 2023). It does not depend on the 0.5 threshold of the masks."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import evenly_divisible_all_gather

from monai_wsl.metrics.pixel import check_mask

__all__ = ["compute_pxap", "PixelAPMetric"]


def _average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, as scikit-learn's
    ``average_precision_score``; NaN without positives."""
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    num_pos = labels.sum()
    if num_pos == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    tp = labels.cumsum(0, dtype=torch.float64)
    # One operating point per distinct score: the last position of each run of equal scores.
    last = torch.cat(
        [torch.nonzero(scores[1:] != scores[:-1]).flatten(), scores.new_tensor([scores.numel() - 1]).long()]
    )
    tp = tp[last]
    precision = tp / (last + 1).double()
    recall = tp / num_pos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_step * precision).sum()


def compute_pxap(y_score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pixel average precision of continuous maps ``(B, 1, *spatial)`` in [0, 1] against binary ground truth of the
    same shape, pooling every pixel of every image (a scalar tensor; NaN if no pixel is foreground).

    Equal to ``sklearn.metrics.average_precision_score(y.flatten(), y_score.flatten())``.
    """
    s = check_mask(y_score, "y_score")
    g = check_mask(y, "y", binary=True).to(s.device)
    if s.shape != g.shape:
        raise ValueError(f"y_score and y must have the same shape, got {tuple(s.shape)} and {tuple(g.shape)}.")
    return _average_precision(s, g)


class PixelAPMetric(CumulativeIterationMetric):
    """Cumulative PxAP: keeps every pixel's score and label (images may differ in size) and pools them all at
    :meth:`aggregate`. Memory: 8 bytes per pixel (about 60 MB for the 18 GlaS validation images at full size).

    Example::

        metric = PixelAPMetric()
        for batch in loader:
            metric(y_pred=soft_masks, y=ground_truth)
        pxap = metric.aggregate().item()
    """

    def extend(self, *data: torch.Tensor) -> None:
        # One chunk per call: the base class would split the (pixels, 2) tensor into one entry per pixel.
        if self._buffers is None:
            self._buffers = [[] for _ in data]
        for buffer, chunk in zip(self._buffers, data):
            buffer.append(torch.as_tensor(chunk))
        self._synced = False

    def _sync(self) -> None:
        if self._synced or self._buffers is None:
            return
        self._synced_tensors = [evenly_divisible_all_gather(torch.cat(b, 0), concat=True) for b in self._buffers]
        self._synced = True

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        s = check_mask(y_pred, "y_pred")
        g = check_mask(y, "y", binary=True).to(s.device)  # a ground truth kept on the CPU meets a GPU prediction
        if s.shape != g.shape:
            raise ValueError(f"y_pred and y must have the same shape, got {tuple(s.shape)} and {tuple(g.shape)}.")
        return torch.stack([s.flatten().float(), g.flatten().float()], 1)  # (pixels, 2)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("PixelAPMetric has no data: call it on predictions first.")
        return _average_precision(data[:, 0], data[:, 1]).float()
