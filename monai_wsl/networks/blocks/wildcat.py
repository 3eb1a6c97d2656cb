"""WILDCAT class-map head (Durand et al., CVPR 2017), in 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv

__all__ = ["WildcatHead", "WildcatPool", "wildcat_pool", "num_selected"]


def num_selected(k: float, n: int) -> int:
    """Number of spatial positions a WILDCAT ``k`` selects out of ``n``.

    ``0 < k < 1`` is a fraction of ``n`` (at least one position); ``k >= 1`` is a count (at most ``n``); ``k <= 0``
    selects nothing. This is WILDCAT's own convention.
    """
    if k <= 0:
        return 0
    if k < 1:
        return max(1, int(round(k * n)))
    return min(int(k), n)


def wildcat_pool(
    maps: torch.Tensor, kmax: float = 0.3, kmin: float = 0.0, alpha: float = 0.6, dropout: nn.Module | None = None
) -> torch.Tensor:
    """WILDCAT spatial pooling: mean of the top ``kmax`` values + ``alpha`` * mean of the bottom ``kmin`` values.

    Args:
        maps: class maps ``(B, K, *spatial)``.
        kmax: fraction (``< 1``) or count (``>= 1``) of the highest activations kept.
        kmin: fraction or count of the lowest activations kept; ``0`` disables the term.
        alpha: weight of the lowest-activation term.
        dropout: applied to the selected (sorted) values before averaging, e.g. ``nn.Dropout(0.1)``; it only acts
            in training mode.

    Returns:
        scores ``(B, K)``.
    """
    flat = maps.flatten(2)  # (B, K, N)
    n = int(flat.shape[-1])  # a traced size is a tensor: the trace keeps it as a constant
    n_max, n_min = num_selected(kmax, n), num_selected(kmin, n)
    if n_max == 0:
        raise ValueError(f"kmax must select at least one position, got kmax={kmax}.")
    # topk returns the largest values sorted: cheaper than a full sort when kmax is small.
    top = flat.topk(n_max, dim=-1, sorted=False).values
    if dropout is not None:
        top = dropout(top)
    scores = top.mean(-1)
    if n_min > 0 and alpha != 0:
        bottom = flat.topk(n_min, dim=-1, largest=False, sorted=False).values
        if dropout is not None:
            bottom = dropout(bottom)
        scores = scores + alpha * bottom.mean(-1)
    return scores


class WildcatPool(nn.Module):
    """Module form of :func:`wildcat_pool` (dropout on the selected values, training only).

    Args:
        kmax, kmin, alpha: see :func:`wildcat_pool`.
        dropout: dropout probability on the selected values.

    The defaults are the settings of the max-min paper's GlaS recipe.
    """

    def __init__(self, kmax: float = 0.3, kmin: float = 0.0, alpha: float = 0.6, dropout: float = 0.1) -> None:
        super().__init__()
        if kmax <= 0:
            raise ValueError(f"kmax must be > 0, got {kmax}.")
        if kmin < 0:
            raise ValueError(f"kmin must be >= 0, got {kmin}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.kmax, self.kmin, self.alpha = kmax, kmin, alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, K, *spatial) -> (B, K)``."""
        return wildcat_pool(maps, self.kmax, self.kmin, self.alpha, self.dropout)

    def extra_repr(self) -> str:
        return f"kmax={self.kmax}, kmin={self.kmin}, alpha={self.alpha}"


class WildcatHead(nn.Module):
    """WILDCAT head: 1x1 convolution to ``K * M`` maps, class-wise mean over the ``M`` modalities, WILDCAT pooling.

    Durand et al., "WILDCAT: Weakly Supervised Learning of Deep ConvNets for Image Classification, Pointwise
    Localization and Segmentation", CVPR 2017.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the encoder's feature map.
        num_classes: ``K``.
        modalities: ``M``, maps per class (channels are grouped class-major: ``k * M .. k * M + M - 1``).
        pooling: ``kmax``, ``kmin``, ``alpha``, ``dropout`` of :class:`WildcatPool` (its defaults are the paper's).

    Example::

        head = WildcatHead(2, 512, 2)
        scores, maps = head(torch.rand(4, 512, 13, 13))  # (4, 2), (4, 2, 13, 13)
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, modalities: int = 5, **pooling: float
    ) -> None:
        super().__init__()
        if num_classes < 1 or modalities < 1:
            raise ValueError(f"num_classes and modalities must be >= 1, got {num_classes} and {modalities}.")
        self.num_classes, self.modalities = num_classes, modalities
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, num_classes * modalities, kernel_size=1)
        self.pool = WildcatPool(**pooling)

    @property
    def settings(self) -> dict[str, float]:
        """Every setting of the head (``modalities``, ``kmax``, ``kmin``, ``alpha``, ``dropout``), defaults included:
        the ``wildcat`` argument that builds this head again."""
        pool = self.pool
        dropout = pool.dropout.p if pool.dropout is not None else 0.0
        return {
            "modalities": self.modalities,
            "kmax": pool.kmax,
            "kmin": pool.kmin,
            "alpha": pool.alpha,
            "dropout": dropout,
        }

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *spatial) -> scores (B, K), class maps (B, K, *spatial)``."""
        x = self.conv(features)
        maps = x.view(x.shape[0], self.num_classes, self.modalities, *x.shape[2:]).mean(2)
        return self.pool(maps), maps
