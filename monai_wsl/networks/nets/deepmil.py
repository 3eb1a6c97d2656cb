"""Attention-based deep multiple-instance learning: the positions of the feature map are the instances of a bag."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.utils import str2bool

from monai_wsl.networks.nets.base import WSLNet
from monai_wsl.networks.utils import normalized_map

__all__ = ["DeepMILNet", "DeepMIL", "deepmilnet"]


class DeepMILNet(WSLNet):
    """Attention-based deep multiple-instance learning (Deep MIL), 2D and 3D.

    Ilse, Tomczak, Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018.

    The encoder's feature map ``(B, C, *low)`` is a bag of ``N = prod(low)`` instances (one per position), optionally
    projected by a 1x1 convolution to ``embed_dim`` channels + ReLU: ``h_i``. Gated attention (or plain ``tanh``
    attention with ``gated=False``) gives one weight per instance,
    ``a = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``; the bag embedding ``z = sum_i a_i h_i`` is classified by a
    linear layer. The attention, reshaped to ``(B, 1, *low)``, upsampled and min-max normalised per image, is the
    map (segmented at 0.5 like every other method's).

    Args:
        embed_dim: channels of the 1x1 projection of the instances; ``None`` (or 0) uses the encoder's features as
            they are.
        attention_dim: hidden size ``L`` of the attention network (``V``, ``U``: ``D -> L``, ``w``: ``L -> 1``).
        gated: gated attention (``tanh * sigmoid``); ``False`` is the plain ``tanh`` attention of the paper.
        dropout: dropout probability on the instances (training only).
        kwargs: the encoder settings of :class:`~monai_wsl.networks.nets.base.WSLNet`.

    ``forward`` returns::

        logits      (B, K)                 bag (image) class logits
        mask        (B, 1, *spatial)       normalised attention in [0, 1] at input resolution
        attention   (B, 1, *low)           attention weights (sum to 1 over the positions of each image)

    Example::

        net = DeepMILNet(encoder="efficientnet-lite0", pretrained=True)
        out = net(torch.rand(4, 3, 416, 416))      # out["mask"]: (4, 1, 416, 416), out["attention"]: (4, 1, 13, 13)
    """

    def __init__(
        self,
        embed_dim: int | None = 128,
        attention_dim: int = 128,
        gated: bool | str = True,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if embed_dim is not None and embed_dim < 0:
            raise ValueError(f"embed_dim must be a positive int or None, got {embed_dim}.")
        if attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {attention_dim}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        channels = self.encoder.out_channels
        if embed_dim:
            self.projection = nn.Sequential(
                Conv[Conv.CONV, self.spatial_dims](channels, embed_dim, kernel_size=1), nn.ReLU()
            )
            channels = embed_dim
        else:
            self.projection = nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attention_v = nn.Linear(channels, attention_dim)
        self.gated = str2bool(gated)
        self.attention_u = nn.Linear(channels, attention_dim) if self.gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(channels, self.num_classes)

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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits, attention = self.attend(x)
        return {"logits": logits, "mask": normalized_map(attention, x.shape[2:]), "attention": attention}


DeepMIL = deepmilnet = DeepMILNet
