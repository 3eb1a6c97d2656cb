"""From class maps to masks: the one place where maps are upsampled and normalised (the max-min soft mask on top of
them is :mod:`monai_wsl.networks.blocks.soft_mask`; the DDP and padding conversions of a network are
:mod:`monai_wsl.networks.conversions`).

Training, evaluation, inference, MONAI Label and the CAM baselines all go through these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor

from .conversions import CPUSyncBatchNorm, convert_sync_batchnorm, fold_same_padding, set_padding_mode, unwrap

__all__ = [
    "upsample",
    "minmax_normalize",
    "normalized_map",
    "fold_same_padding",
    "set_padding_mode",
    "resize_by",
    "as_plain_tensor",
    "spatial_flips",
    "binary_entropy",
    "unwrap",
    "CPUSyncBatchNorm",
    "convert_sync_batchnorm",
]

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` without MONAI's meta data (a ``MetaTensor`` viewed as a plain tensor, an array as a tensor): MONAI's
    ``convert_to_tensor(x, track_meta=False)``."""
    return convert_to_tensor(x, track_meta=False)


def upsample(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of ``(B, C, *spatial)`` maps to ``spatial_size``."""
    size = tuple(int(s) for s in spatial_size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=_INTERP[maps.ndim - 2], align_corners=False)


def spatial_flips(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of flips of the spatial axes of ``(B, C, *spatial)`` tensors, as ``flip`` dims (identity
    ``()`` first): 4 in 2D, 8 in 3D."""
    combos: list[tuple[int, ...]] = [()]
    for axis in range(2, 2 + spatial_dims):
        combos += [c + (axis,) for c in combos]
    return combos


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """The entropy of a Bernoulli probability, in bits: 0 where ``p`` is 0 or 1, 1 at 0.5 (the uncertainty of a mask
    averaged over flips)."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2.0)


def resize_by(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``(B, C, *spatial)`` images by ``scale`` (each side at least one pixel); ``scale == 1`` is a no-op."""
    if scale == 1:
        return x
    return upsample(x, [max(1, int(s * scale)) for s in x.shape[2:]])


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8, per_image: bool = True) -> torch.Tensor:
    """Min-max normalise each map of ``(B, C, *spatial)`` to [0, 1], per image and channel (``per_image=False``:
    one minimum and maximum per channel over the whole batch, as the authors' training code does).

    A constant map (max == min) becomes all zeros instead of dividing by zero.
    """
    flat = maps.flatten(2) if per_image else maps.transpose(0, 1).flatten(1)[None]
    lo = flat.amin(-1).view(*flat.shape[:2], *([1] * (maps.ndim - 2)))
    hi = flat.amax(-1).view_as(lo)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def normalized_map(maps: torch.Tensor, spatial_size: Sequence[int], per_image: bool = True) -> torch.Tensor:
    """Upsample ``(B, C, h, w)`` maps to ``spatial_size`` and min-max normalise each per image (or over the batch):
    values in [0, 1]."""
    return minmax_normalize(upsample(maps, spatial_size), per_image=per_image)


def __getattr__(name: str) -> Any:
    if name == "soft_mask":  # moved to monai_wsl.networks.blocks.soft_mask (it builds on this module); importable here
        from .blocks.soft_mask import soft_mask

        return soft_mask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
