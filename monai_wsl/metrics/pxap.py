"""PxAP: area under the pixel precision-recall curve of a continuous map, pooled over all pixels of all images
(Rony et al., "Deep weakly-supervised learning methods for classification and localization in histology images: a
survey", MELBA 2023). It does not depend on the 0.5 threshold of the masks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor, evenly_divisible_all_gather

__all__ = ["compute_pxap", "PixelAPMetric", "pxap_histograms", "binned_average_precision"]


def check_mask(mask: torch.Tensor, name: str, binary: bool = False) -> torch.Tensor:
    """Validate a map ``(B, 1, *spatial)`` (or ``(B, 2, *spatial)`` ``[background, foreground]``, whose
    foreground channel is used) with values in [0, 1] (``{0, 1}`` when ``binary``); returns ``(B, 1, *spatial)``."""
    # Plain tensors: MONAI's per-image meta data does not survive the flattening done here.
    mask = convert_to_tensor(mask, track_meta=False, wrap_sequence=True)
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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def pxap_histograms(y_score: torch.Tensor, y: torch.Tensor, num_bins: int = 1000) -> torch.Tensor:
    """``(2, num_bins)`` int64 counts of the pixels of maps ``(B, 1, *spatial)`` in [0, 1] by score bin
    (``floor(score * num_bins)``, 1.0 in the last bin): row 0 background, row 1 foreground of ``y``."""
    s, g = _scores_and_labels(y_score, y)
    index = (s.flatten().double() * num_bins).long().clamp_(0, num_bins - 1)
    g = g.flatten().bool()
    return torch.stack(
        [torch.bincount(index[~g], minlength=num_bins), torch.bincount(index[g], minlength=num_bins)]
    ).long()


def binned_average_precision(histograms: torch.Tensor) -> torch.Tensor:
    """Average precision from :func:`pxap_histograms` counts, one operating point per bin edge (``score >=
    k / num_bins``), as the WSOL evaluators of the field compute PxAP: exactly the average precision of the scores
    rounded down to their bin (:func:`compute_pxap` of ``floor(s * num_bins) / num_bins``); NaN without foreground."""
    negatives, positives = histograms.double()
    tp, fp = positives.flip(0).cumsum(0), negatives.flip(0).cumsum(0)  # from the highest threshold down
    if tp[-1] == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    recall_step = torch.diff(tp / tp[-1], prepend=tp.new_zeros(1))
    precision = tp / (tp + fp).clamp_min(1)  # 0 / 0 only where nothing is above the threshold: no recall step
    return (recall_step * precision).sum()


def compute_pxap(y_score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pixel average precision of continuous maps ``(B, 1, *spatial)`` in [0, 1] against binary ground truth of the
    same shape, pooling every pixel of every image (a scalar tensor; NaN if no pixel is foreground).

    Equal to ``sklearn.metrics.average_precision_score(y.flatten(), y_score.flatten())``.
    """
    return _average_precision(*_scores_and_labels(y_score, y))


class PixelAPMetric(CumulativeIterationMetric):
    """Cumulative PxAP over every pixel of every image seen (images may differ in size).

    With ``num_bins`` (default 1000, the threshold step of 0.001 of the WSOL evaluators of the field), the metric
    keeps two ``(num_bins,)`` counts of background and foreground pixels by score: memory does not grow with the
    number of pixels (the thousands of 512-pixel patches of a CAMELYON16 validation set cost what 18 GlaS images
    cost), and the counts add across DDP ranks. The value is the average precision of the scores rounded down to a
    multiple of ``1 / num_bins`` (:func:`binned_average_precision`). ``num_bins=None`` keeps every pixel's score and
    label (8 bytes per pixel) and gives the exact value, :func:`compute_pxap` of all pixels pooled.

    Example::

        metric = PixelAPMetric()
        for batch in loader:
            metric(y_pred=soft_masks, y=ground_truth)
        pxap = metric.aggregate().item()
    """

    def __init__(self, num_bins: int | None = 1000) -> None:
        super().__init__()
        if num_bins is not None and int(num_bins) < 1:
            raise ValueError(f"num_bins must be at least 1 (or None for the exact value), not {num_bins}.")
        self.num_bins = None if num_bins is None else int(num_bins)

    def extend(self, *data: torch.Tensor) -> None:
        # One chunk per call: the base class would split the (pixels, 2) tensor into one entry per pixel. Binned,
        # the counts are summed into one tensor as they come.
        if self._buffers is None:
            self._buffers = [[] for _ in data]
        for buffer, chunk in zip(self._buffers, data):
            chunk = torch.as_tensor(chunk)
            if self.num_bins is not None:  # a list of images gives their counts one after the other
                chunk = chunk.reshape(-1, 2, self.num_bins).sum(0)
            if self.num_bins is not None and buffer:
                buffer[0] = buffer[0] + chunk.to(buffer[0].device)
            else:
                buffer.append(chunk)
        self._synced = False

    def _sync(self) -> None:
        if self._synced:
            return
        if self._buffers is None and self.num_bins is not None and _world_size() > 1:
            # a rank that saw no image (a validation set smaller than the ranks) still joins the gather
            self._buffers = [[torch.zeros(2, self.num_bins, dtype=torch.long)]]
        if self._buffers is None:
            return
        if self.num_bins is None:
            self._synced_tensors = [evenly_divisible_all_gather(torch.cat(b, 0), concat=True) for b in self._buffers]
        else:  # every rank's counts, gathered and summed
            self._synced_tensors = [evenly_divisible_all_gather(b[0][None], concat=True).sum(0) for b in self._buffers]
        self._synced = True

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.num_bins is not None:
            return pxap_histograms(y_pred, y, self.num_bins)  # (2, num_bins)
        s, g = _scores_and_labels(y_pred, y)
        return torch.stack([s.flatten().float(), g.flatten().float()], 1)  # (pixels, 2)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("PixelAPMetric has no data: call it on predictions first.")
        if self.num_bins is not None:
            return binned_average_precision(data).float()
        return _average_precision(data[:, 0], data[:, 1]).float()
