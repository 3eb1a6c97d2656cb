"""From class maps to masks: the one place where maps are upsampled, normalised and turned into soft masks.

Training, evaluation, inference, MONAI Label and the CAM baselines all go through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample", "minmax_normalize", "normalized_map", "soft_mask", "resize_by", "as_plain_tensor", "unwrap"]

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` without MONAI's meta data (a ``MetaTensor`` viewed as a plain tensor; anything else unchanged)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def upsample(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of ``(B, C, *spatial)`` maps to ``spatial_size``."""
    size = tuple(int(s) for s in spatial_size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=_INTERP[maps.ndim - 2], align_corners=False)


def resize_by(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``(B, C, *spatial)`` images by ``scale`` (each side at least one pixel); ``scale == 1`` is a no-op."""
    if scale == 1:
        return x
    return upsample(x, [max(1, int(s * scale)) for s in x.shape[2:]])


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each map of ``(B, C, *spatial)`` to [0, 1], per image and channel.

    A constant map (max == min) becomes all zeros instead of dividing by zero.
    """
    flat = maps.flatten(2)
    lo = flat.amin(-1).view(*maps.shape[:2], *([1] * (maps.ndim - 2)))
    hi = flat.amax(-1).view_as(lo)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def normalized_map(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Upsample ``(B, C, h, w)`` maps to ``spatial_size`` and min-max normalise each per image: values in [0, 1]."""
    return minmax_normalize(upsample(maps, spatial_size))


def soft_mask(
    class_maps: torch.Tensor,
    scores: torch.Tensor,
    spatial_size: Sequence[int],
    sigma: float | torch.Tensor = 0.15,
    w: float = 5.0,
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

    Returns:
        ``(B, 1, *spatial_size)`` mask in (0, 1).
    """
    if class_maps.shape[:2] != scores.shape:
        raise ValueError(
            f"class_maps (B, K, ...) and scores (B, K) disagree: {tuple(class_maps.shape)} vs {tuple(scores.shape)}."
        )
    probs = scores.softmax(1).view(*scores.shape, *([1] * (class_maps.ndim - 2)))
    mixed = (probs * class_maps).sum(1, keepdim=True)
    return torch.sigmoid(w * (normalized_map(mixed, spatial_size) - sigma))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper (any other module unchanged)."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, parallel) else module
