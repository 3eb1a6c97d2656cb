"""The max-min uncertainty network of Belharbi et al.: a localizer that yields a soft mask, and a classifier that sees
the masked image and its complement."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from monai_wsl.networks.blocks.wildcat import WildcatHead
from monai_wsl.networks.nets.base import WSLNetBase
from monai_wsl.networks.nets.encoders import build_encoder
from monai_wsl.networks.utils import as_plain_tensor, resize_by, soft_mask

__all__ = ["MaxMinUncertaintyNet", "MaxMinNet", "maxminnet"]


class MaxMinUncertaintyNet(WSLNetBase):
    """Max-min uncertainty network for weakly-supervised segmentation, 2D and 3D.

    Belharbi et al., "Deep Interpretable Classification and Weakly-Supervised Segmentation of Histology Images via
    Max-Min Uncertainty", IEEE TMI 41(3), 2022 (MIDL 2022 short version).

    The localizer (encoder + :class:`WildcatHead`) yields class scores ``s`` and class maps ``A``, from which
    :func:`~monai_wsl.networks.utils.soft_mask` makes ``M``. The classifier (encoder + its own head) classifies
    ``x * M`` and ``x * (1 - M)``, both resized by ``scale_in_cl``, in one batched pass.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: ``K``.
        encoder: a name in :data:`~monai_wsl.networks.nets.encoders.ENCODERS` or an ``nn.Module``.
        pretrained: load the offline ImageNet weights (EfficientNet-lite0).
        pretrained_path: a local encoder state dict to load (e.g. ImageNet ResNet-18 from torchvision).
        shared_encoder: one encoder (BatchNorm included) for localizer and classifier, as in the paper; ``False``
            gives the classifier its own copy (initialised the same way).
        modalities, kmax, kmin, alpha, dropout: :class:`WildcatHead` settings of both heads.
        sigma: initial mask threshold (a buffer, saved with the weights; grown during training by a handler).
        w: sigmoid slope of the soft mask.
        scale_in_cl: resize factor of the classifier's inputs.
        output: ``"dict"`` (training), ``"mask"`` (``(B, 2, *spatial)`` ``[1 - M, M]``, inference) or
            ``"logits"`` (``(B, K)`` classifier logits on ``x * M``). Parameters do not depend on it.

    ``output="dict"`` returns::

        logits      (B, K)                 classifier on x * M ("foreground logits", the class prediction)
        logits_bg   (B, K)                 classifier on x * (1 - M) ("background logits")
        logits_loc  (B, K)                 localizer scores s
        mask        (B, 1, *spatial)       soft mask M in (0, 1); M >= 0.5 is the segmentation
        cams        (B, K, *spatial / 32)  localizer class maps A

    Example::

        net = MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True)
        out = net(torch.rand(4, 3, 416, 416))      # out["mask"]: (4, 1, 416, 416)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder: str | nn.Module = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        shared_encoder: bool = True,
        modalities: int = 5,
        kmax: float = 0.3,
        kmin: float = 0.0,
        alpha: float = 0.6,
        dropout: float = 0.1,
        sigma: float = 0.15,
        w: float = 5.0,
        scale_in_cl: float = 0.8,
        output: str = "dict",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, output)
        if not 0 < scale_in_cl <= 1:
            raise ValueError(f"scale_in_cl must be in (0, 1], got {scale_in_cl}.")
        if not 0 <= sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}.")
        self.encoder = build_encoder(encoder, spatial_dims, in_channels, pretrained, pretrained_path)
        if not shared_encoder:
            if isinstance(encoder, nn.Module):
                raise ValueError("shared_encoder=False needs an encoder name: a module cannot be duplicated safely.")
            self.classifier_encoder = build_encoder(encoder, spatial_dims, in_channels, pretrained, pretrained_path)
        head = dict(modalities=modalities, kmax=kmax, kmin=kmin, alpha=alpha, dropout=dropout)
        channels = self.encoder.out_channels
        self.localizer_head = WildcatHead(spatial_dims, channels, num_classes, **head)
        self.classifier_head = WildcatHead(spatial_dims, channels, num_classes, **head)
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.w, self.scale_in_cl, self.shared_encoder = w, scale_in_cl, shared_encoder
        self._smallest_scale = scale_in_cl

    def _classifier_encoder(self) -> nn.Module:
        return self.encoder if self.shared_encoder else self.classifier_encoder

    def localize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Localizer pass: ``(B, C, *spatial)`` -> scores ``(B, K)``, class maps ``(B, K, *low)`` and the soft mask
        ``(B, 1, *spatial)``."""
        scores, maps = self.localizer_head(self.encoder(x))
        return scores, maps, soft_mask(maps, scores, x.shape[2:], self.sigma, self.w)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier pass on already-masked images: ``(N, C, *spatial) -> (N, K)`` logits."""
        scores, _ = self.classifier_head(self._classifier_encoder()(resize_by(x, self.scale_in_cl)))
        return scores

    def segment_and_classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"mask": M (B, 1, *spatial), "logits": classifier on x * M (B, K)}``: the localizer and one classifier
        pass (no background pass)."""
        self.check_input(x)
        _, _, mask = self.localize(x)
        return {"mask": mask, "logits": self.classify(x * mask)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        self.check_input(x)
        scores, maps, mask = self.localize(x)
        if self.output == "mask":
            return self.mask_output(mask)
        if self.output == "logits":
            return self.classify(x * mask)
        # x * M and x * (1 - M) in one batch: one encoder call instead of two. Plain tensors: a MetaTensor batch
        # carries per-image meta data that a doubled batch would not match.
        xs, ms = as_plain_tensor(x), as_plain_tensor(mask)
        logits_fg, logits_bg = self.classify(torch.cat([xs * ms, xs * (1 - ms)], 0)).split(x.shape[0])
        return {"logits": logits_fg, "logits_bg": logits_bg, "logits_loc": scores, "mask": mask, "cams": maps}


MaxMinNet = maxminnet = MaxMinUncertaintyNet
