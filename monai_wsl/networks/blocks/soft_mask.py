"""The max-min soft mask: the localizer's class maps and scores -> ``M = sigmoid(w * (A_norm - sigma))``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_wsl.networks.utils import normalized_map

__all__ = ["soft_mask"]


def soft_mask(
    class_maps: torch.Tensor,
    scores: torch.Tensor,
    spatial_size: Sequence[int],
    sigma: float | torch.Tensor = 0.15,
    w: float = 5.0,
    per_image: bool = True,
) -> torch.Tensor:
    """The max-min soft mask ``M = sigmoid(w * (A_norm - sigma))``.

    ``A+ = sum_k softmax(scores)_k * A_k`` (a probability-weighted mix of every class map, nothing detached) is
    upsampled to ``spatial_size`` and min-max normalised per image (``A_norm``). ``M >= 0.5`` exactly where
    ``A_norm >= sigma``.

    Args:
        class_maps: ``(B, K, *spatial_low)`` localizer class maps.
        scores: ``(B, K)`` localizer class scores.
        spatial_size: the input image's spatial size.
        sigma: threshold, in [0, 1] of the normalised map.
        w: slope of the sigmoid.
        per_image: min-max normalise each image's map (the paper); ``False``: over the whole batch.

    Returns:
        ``(B, 1, *spatial_size)`` mask in (0, 1).
    """
    if class_maps.shape[:2] != scores.shape:
        raise ValueError(
            f"class_maps (B, K, ...) and scores (B, K) disagree: {tuple(class_maps.shape)} vs {tuple(scores.shape)}."
        )
    probs = scores.softmax(1).view(*scores.shape, *([1] * (class_maps.ndim - 2)))
    mixed = (probs * class_maps).sum(1, keepdim=True)
    return torch.sigmoid(w * (normalized_map(mixed, spatial_size, per_image) - sigma))
