"""Attention-based deep multiple-instance learning: the positions of the feature map are the instances of a bag."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv

from monai_wsl.networks.nets.base import WSLNetBase
from monai_wsl.networks.nets.encoders import build_encoder
from monai_wsl.networks.utils import normalized_map

__all__ = ["DeepMILNet", "DeepMIL", "deepmilnet"]


class DeepMILNet(WSLNetBase):
    """Attention-based deep multiple-instance learning (Deep MIL), 2D and 3D.

    Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.

    The encoder's feature map ``(B, C, *low)`` is a bag of ``N = prod(low)`` instances (one per position), optionally
    projected by a 1x1 convolution to ``embed_dim`` channels + ReLU: ``h_i``. Gated attention (or plain ``tanh``
    attention with ``gated=False``) gives one weight per instance,
    ``a = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``; the bag embedding ``z = sum_i a_i h_i`` is classified by a
    linear layer. The attention, reshaped to ``(B, 1, *low)``, upsampled and min-max normalised per image, is the
    map (segmented at 0.5 like every other method's).

    Args:
        spatial_dims, in_channels, num_classes, encoder, pretrained, pretrained_path: as
            :class:`~monai_wsl.networks.nets.cam.CAMClassifier`.
        embed_dim: channels of the 1x1 projection of the instances; ``None`` (or 0) uses the encoder's features as
            they are.
        attention_dim: hidden size ``L`` of the attention network (``V``, ``U``: ``D -> L``, ``w``: ``L -> 1``).
        gated: gated attention (``tanh * sigmoid``); ``False`` is the plain ``tanh`` attention of the paper.
        dropout: dropout probability on the instances (training only).
        output: ``"dict"`` (``logits``, ``mask``, ``attention``), ``"mask"`` (``(B, 2, *spatial)`` ``[1 - M, M]``) or
            ``"logits"`` (``(B, K)``). Parameters do not depend on it.

    ``output="dict"`` returns::

        logits      (B, K)                 bag (image) class logits
        mask        (B, 1, *spatial)       normalised attention in [0, 1] at input resolution
        attention   (B, 1, *low)           attention weights (sum to 1 over the positions of each image)

    Example::

        net = DeepMILNet(encoder="efficientnet-lite0", pretrained=True)
        out = net(torch.rand(4, 3, 416, 416))      # out["mask"]: (4, 1, 416, 416), out["attention"]: (4, 1, 13, 13)
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder: str | nn.Module = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        embed_dim: int | None = 128,
        attention_dim: int = 128,
        gated: bool = True,
        dropout: float = 0.0,
        output: str = "dict",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, output)
        if embed_dim is not None and embed_dim < 0:
            raise ValueError(f"embed_dim must be a positive int or None, got {embed_dim}.")
        if attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {attention_dim}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.encoder = build_encoder(encoder, spatial_dims, in_channels, pretrained, pretrained_path)
        channels = self.encoder.out_channels
        if embed_dim:
            self.projection = nn.Sequential(
                Conv[Conv.CONV, spatial_dims](channels, embed_dim, kernel_size=1), nn.ReLU()
            )
            channels = embed_dim
        else:
            self.projection = nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attention_v = nn.Linear(channels, attention_dim)
        self.attention_u = nn.Linear(channels, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(channels, num_classes)
        self.gated = gated

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *spatial)`` -> logits ``(B, K)`` and attention ``(B, 1, *low)`` (sums to 1 per image)."""
        features = self.projection(self.encoder(x))  # (B, D, *low)
        low = features.shape[2:]
        h = self.dropout(features.flatten(2).transpose(1, 2))  # (B, N, D): one instance per position
        hidden = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            hidden = hidden * torch.sigmoid(self.attention_u(h))
        attention = self.attention_w(hidden).squeeze(-1).softmax(-1)  # (B, N)
        bag = torch.bmm(attention.unsqueeze(1), h).squeeze(1)  # (B, D) = sum_i a_i h_i
        return self.classifier(bag), attention.view(x.shape[0], 1, *low)

    def segment_and_classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"mask": normalised attention (B, 1, *spatial), "logits": (B, K)}``."""
        out = self._dict(x)
        return {"mask": out["mask"], "logits": out["logits"]}

    def _dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits, attention = self.attend(x)
        return {"logits": logits, "mask": normalized_map(attention, x.shape[2:]), "attention": attention}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.output == "logits":
            self.check_input(x)
            return self.attend(x)[0]
        out = self._dict(x)
        return self.mask_output(out["mask"]) if self.output == "mask" else out


DeepMIL = deepmilnet = DeepMILNet
