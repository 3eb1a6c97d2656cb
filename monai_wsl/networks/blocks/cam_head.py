"""Class-activation-map heads of the CAM family: one 1x1 convolution to class maps, then a global pooling."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv

__all__ = ["CAMHead", "global_pool", "POOLINGS"]

POOLINGS = ("avg", "max", "lse")


def global_pool(maps: torch.Tensor, pooling: str = "avg", lse_r: float = 10.0) -> torch.Tensor:
    """Pool class maps ``(B, K, *spatial)`` to scores ``(B, K)``.

    ``avg`` is CAM (Zhou et al., CVPR 2016), ``max`` CAM-Max (Oquab et al., CVPR 2015) and ``lse`` the log-sum-exp
    pooling of Pinheiro & Collobert (CVPR 2015): ``(1/r) log(mean(exp(r * A)))``, between mean (r -> 0) and max.
    """
    flat = maps.flatten(2)
    if pooling == "avg":
        return flat.mean(-1)
    if pooling == "max":
        return flat.amax(-1)
    if pooling == "lse":
        return (torch.logsumexp(lse_r * flat, dim=-1) - math.log(flat.shape[-1])) / lse_r
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")


class CAMHead(nn.Module):
    """1x1 convolution to ``K`` class maps followed by global pooling.

    With ``pooling="avg"`` this is exactly global-average-pooling + a linear layer, and the maps are the class
    activation maps of Zhou et al. (the order of the linear map and the average does not matter).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the encoder's feature map.
        num_classes: ``K``.
        pooling: ``"avg"``, ``"max"`` or ``"lse"``.
        lse_r: sharpness of the log-sum-exp pooling.
        dropout: dropout probability on the features before the 1x1 convolution (training only).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        pooling: str = "avg",
        lse_r: float = 10.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.pooling, self.lse_r = pooling, lse_r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *spatial) -> scores (B, K), class maps (B, K, *spatial)``."""
        maps = self.conv(self.dropout(features))
        return global_pool(maps, self.pooling, self.lse_r), maps
