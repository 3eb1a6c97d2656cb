"""PxAP: area under the pixel precision-recall curve of a continuous map, pooled over all pixels of all images
(Rony et al., "Deep weakly-supervised learning methods for classification and localization in histology images: a
survey", MELBA 2023). It does not depend on the 0.5 threshold of the masks."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import evenly_divisible_all_gather

__all__ = ["compute_pxap", "PixelAPMetric"]


def check_mask(mask: torch.Tensor, name: str, binary: bool = False) -> torch.Tensor:
    """Validate a map ``(B, 1, *spatial)`` (or ``(B, 2, *spatial)`` ``[background, foreground]``, whose
    foreground channel is used) with values in [0, 1] (``{0, 1}`` when ``binary``); returns ``(B, 1, *spatial)``."""
    # Plain tensors: MONAI's per-image meta data does not survive the flattening done here.
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


def _scores_and_labels(y_score: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked maps and ground truth, ``(B, 1, *spatial)`` each, on the maps' device."""
    s = check_mask(y_score, "y_score")
    g = check_mask(y, "y", binary=True).to(s.device)  # a ground truth kept on the CPU meets a GPU prediction
    if s.shape != g.shape:
        raise ValueError(f"y_score and y must have the same shape, got {tuple(s.shape)} and {tuple(g.shape)}.")
    return s, g


def compute_pxap(y_score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pixel average precision of continuous maps ``(B, 1, *spatial)`` in [0, 1] against binary ground truth of the
    same shape, pooling every pixel of every image (a scalar tensor; NaN if no pixel is foreground).

    Equal to ``sklearn.metrics.average_precision_score(y.flatten(), y_score.flatten())``.
    """
    return _average_precision(*_scores_and_labels(y_score, y))


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
        s, g = _scores_and_labels(y_pred, y)
        return torch.stack([s.flatten().float(), g.flatten().float()], 1)  # (pixels, 2)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("PixelAPMetric has no data: call it on predictions first.")
        return _average_precision(data[:, 0], data[:, 1]).float()
