"""The max-min uncertainty network of Belharbi et al.: a localizer that yields a soft mask, and a classifier that sees
the masked image and its complement."""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import str2bool

from monai_wsl.networks.blocks.soft_mask import soft_mask
from monai_wsl.networks.blocks.wildcat import WildcatHead
from monai_wsl.networks.nets.base import WSLNet
from monai_wsl.networks.utils import as_plain_tensor, resize_by

__all__ = ["MaxMinUncertaintyNet", "MaxMinNet", "maxminnet"]


class MaxMinUncertaintyNet(WSLNet):
    """Max-min uncertainty network for weakly-supervised segmentation, 2D and 3D.

    Belharbi et al., "Deep Interpretable Classification and Weakly-Supervised Segmentation of Histology Images via
    Max-Min Uncertainty", IEEE TMI 41(3), 2022 (MIDL 2022 short version).

    The localizer (encoder + :class:`WildcatHead`) yields class scores ``s`` and class maps ``A``, from which
    :func:`~monai_wsl.networks.blocks.soft_mask` makes ``M``. The classifier (encoder + its own head) classifies
    ``x * M`` and ``x * (1 - M)``, both resized by ``scale_in_cl``, in one batched pass.

    Args:
        shared_encoder: one encoder (BatchNorm included) for localizer and classifier, as in the paper; ``False``
            gives the classifier its own copy (initialised the same way).
        wildcat: settings of both :class:`WildcatHead` (``modalities``, ``kmax``, ``kmin``, ``alpha``, ``dropout``);
            the paper's values where left out.
        sigma: initial mask threshold (a buffer, saved with the weights; the bundle's schedule grows it).
        w: sigmoid slope of the soft mask.
        scale_in_cl: resize factor of the classifier's inputs.
        train_mask_norm: ``"image"`` min-max normalises each image's map (the paper, and always at evaluation);
            ``"batch"`` normalises over the whole batch in training, as the authors' training code does.
        kwargs: the encoder settings of :class:`~monai_wsl.networks.nets.base.WSLNet` (``spatial_dims``,
            ``in_channels``, ``num_classes``, ``encoder``, ``pretrained``, ``pretrained_path``).

    ``forward`` returns::

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
        shared_encoder: bool | str = True,
        wildcat: dict | None = None,
        sigma: float = 0.15,
        w: float = 5.0,
        scale_in_cl: float = 0.8,
        train_mask_norm: str = "image",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_mask_norm not in ("image", "batch"):
            raise ValueError(f"train_mask_norm must be 'image' or 'batch', got {train_mask_norm!r}.")
        self.train_mask_norm = train_mask_norm
        if not 0 < scale_in_cl <= 1:
            raise ValueError(f"scale_in_cl must be in (0, 1], got {scale_in_cl}.")
        if not 0 <= sigma <= 1:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}.")
        self.shared_encoder = str2bool(shared_encoder)
        if not self.shared_encoder:
            self.classifier_encoder = self.new_encoder()
        head = (self.spatial_dims, self.encoder.out_channels, self.num_classes)
        self.localizer_head = WildcatHead(*head, **(wildcat or {}))
        self.classifier_head = WildcatHead(*head, **(wildcat or {}))
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.w, self.scale_in_cl = w, scale_in_cl
        self._smallest_scale = scale_in_cl

    def get_config(self) -> dict[str, Any]:
        """Every constructor argument (:meth:`WSLNet.get_config`), the WILDCAT settings in full (defaults included)."""
        return {**super().get_config(), "wildcat": self.localizer_head.settings}

    def localize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Localizer pass: ``(B, C, *spatial)`` -> scores ``(B, K)``, class maps ``(B, K, *low)`` and the soft mask
        ``(B, 1, *spatial)``."""
        scores, maps = self.localizer_head(self.encoder(x))
        per_image = not (self.training and self.train_mask_norm == "batch")
        return scores, maps, soft_mask(maps, scores, x.shape[2:], self.sigma, self.w, per_image)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier pass on already-masked images: ``(N, C, *spatial) -> (N, K)`` logits."""
        encoder = self.encoder if self.shared_encoder else self.classifier_encoder
        scores, _ = self.classifier_head(encoder(resize_by(x, self.scale_in_cl)))
        return scores

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"mask": M (B, 1, *spatial), "logits": classifier on x * M (B, K)}``: the localizer and one classifier
        pass (no background pass)."""
        self.check_input(x)
        _, _, mask = self.localize(x)
        return {"mask": mask, "logits": self.classify(x * mask)}

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """The soft mask ``M`` ``(B, 1, *spatial)``: the localizer pass only."""
        self.check_input(x)
        return self.localize(x)[2]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        scores, maps, mask = self.localize(x)
        # x * M and x * (1 - M) in one batch: one encoder call instead of two. Plain tensors: a MetaTensor batch
        # carries per-image meta data that a doubled batch would not match.
        xs, ms = as_plain_tensor(x), as_plain_tensor(mask)
        logits_fg, logits_bg = self.classify(torch.cat([xs * ms, xs * (1 - ms)], 0)).split(x.shape[0])
        return {"logits": logits_fg, "logits_bg": logits_bg, "logits_loc": scores, "mask": mask, "cams": maps}


MaxMinNet = maxminnet = MaxMinUncertaintyNet
