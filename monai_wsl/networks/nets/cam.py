"""A plain image classifier whose class maps give its segmentation: the CAM family of baselines."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from monai_wsl.networks.blocks.cam_head import make_class_map_head
from monai_wsl.networks.nets.base import WSLNetBase
from monai_wsl.networks.nets.encoders import build_encoder
from monai_wsl.networks.utils import normalized_map

__all__ = ["CAMClassifier", "CAMNet", "camnet", "class_map_of"]


def class_map_of(maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The map of each image's predicted class: ``(B, K, *spatial)``, ``(B, K)`` -> ``(B, 1, *spatial)``."""
    index = logits.argmax(1).view(-1, 1, *([1] * (maps.ndim - 2))).expand(-1, 1, *maps.shape[2:])
    return maps.gather(1, index)


class CAMClassifier(WSLNetBase):
    """Encoder + class-map head: CAM (``pooling="avg"``), CAM-Max (``"max"``), CAM-LSE (``"lse"``) or WILDCAT
    (``"wildcat"``).

    Its map is the class map of the predicted class, upsampled and min-max normalised per image (values in [0, 1],
    segmented at 0.5 like the max-min mask).

    Args:
        spatial_dims, in_channels, num_classes, encoder, pretrained, pretrained_path: as
            :class:`~monai_wsl.networks.nets.maxmin.MaxMinUncertaintyNet`.
        pooling: ``"avg"``, ``"max"``, ``"lse"`` or ``"wildcat"``.
        modalities, kmax, kmin, alpha, dropout: WILDCAT settings (``pooling="wildcat"``).
        lse_r: sharpness of the log-sum-exp pooling.
        output: ``"dict"`` (``logits``, ``mask``, ``cams``), ``"mask"`` or ``"logits"``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder: str | nn.Module = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        pooling: str = "avg",
        modalities: int = 5,
        kmax: float = 0.3,
        kmin: float = 0.0,
        alpha: float = 0.6,
        dropout: float = 0.1,
        lse_r: float = 10.0,
        output: str = "dict",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, output)
        self.encoder = build_encoder(encoder, spatial_dims, in_channels, pretrained, pretrained_path)
        self.head = make_class_map_head(
            pooling, spatial_dims, self.encoder.out_channels, num_classes, modalities, kmax, kmin, alpha, dropout, lse_r
        )
        self.pooling = pooling

    def segment_and_classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"mask": normalised map of the predicted class (B, 1, *spatial), "logits": (B, K)}``."""
        out = self._dict(x)
        return {"mask": out["mask"], "logits": out["logits"]}

    def _dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits, maps = self.head(self.encoder(x))
        mask = normalized_map(class_map_of(maps, logits), x.shape[2:])
        return {"logits": logits, "mask": mask, "cams": maps}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.output == "logits":
            self.check_input(x)
            return self.head(self.encoder(x))[0]
        out = self._dict(x)
        return self.mask_output(out["mask"]) if self.output == "mask" else out


CAMNet = camnet = CAMClassifier
