"""A plain image classifier whose class maps give its segmentation: the CAM family of baselines."""

from __future__ import annotations

from typing import Any

import torch

from monai_wsl.networks.blocks.cam_head import POOLINGS, CAMHead
from monai_wsl.networks.blocks.wildcat import WildcatHead
from monai_wsl.networks.nets.base import WSLNet
from monai_wsl.networks.utils import normalized_map

__all__ = ["CAMClassifier", "CAMNet", "camnet", "class_map_of"]


def class_map_of(maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The map of each image's predicted class: ``(B, K, *spatial)``, ``(B, K)`` -> ``(B, 1, *spatial)``."""
    index = logits.argmax(1).view(-1, 1, *([1] * (maps.ndim - 2))).expand(-1, 1, *maps.shape[2:])
    return maps.gather(1, index)


class CAMClassifier(WSLNet):
    """Encoder + class-map head: CAM (``pooling="avg"``), CAM-Max (``"max"``), CAM-LSE (``"lse"``) or WILDCAT
    (``"wildcat"``).

    Its map is the class map of the predicted class, upsampled and min-max normalised per image (values in [0, 1],
    segmented at 0.5 like the max-min mask). The Grad-CAM and Grad-CAM++ baselines are maps of a trained
    ``CAMClassifier`` computed by :class:`~monai_wsl.inferers.GradCAMInferer`.

    Args:
        pooling: ``"avg"``, ``"max"``, ``"lse"`` or ``"wildcat"``.
        wildcat: :class:`WildcatHead` settings (``pooling="wildcat"``); the paper's values where left out.
        lse_r: sharpness of the log-sum-exp pooling.
        kwargs: the encoder settings of :class:`~monai_wsl.networks.nets.base.WSLNet`.

    ``forward`` returns ``logits`` ``(B, K)``, ``mask`` ``(B, 1, *spatial)`` and ``cams`` ``(B, K, *low)`` (the head's
    class maps).
    """

    def __init__(self, pooling: str = "avg", wildcat: dict | None = None, lse_r: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        head = (self.spatial_dims, self.encoder.out_channels, self.num_classes)
        if pooling == "wildcat":
            self.head = WildcatHead(*head, **(wildcat or {}))
        elif pooling in POOLINGS:
            self.head = CAMHead(*head, pooling=pooling, lse_r=lse_r)
        else:
            raise ValueError(f"pooling must be one of {(*POOLINGS, 'wildcat')}, got {pooling!r}.")
        self.pooling = pooling

    def get_config(self) -> dict[str, Any]:
        """Every constructor argument (:meth:`WSLNet.get_config`); with WILDCAT pooling, its settings in full."""
        config = super().get_config()
        if isinstance(self.head, WildcatHead):
            config["wildcat"] = self.head.settings
        return config

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits, maps = self.head(self.encoder(x))
        mask = normalized_map(class_map_of(maps, logits), x.shape[2:])
        return {"logits": logits, "mask": mask, "cams": maps}


CAMNet = camnet = CAMClassifier
