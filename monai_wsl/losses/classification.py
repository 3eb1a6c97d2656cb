"""Plain image classification loss for the CAM-family and MIL baselines, on the networks' dict outputs."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_wsl.losses.maxmin import as_class_labels

__all__ = ["WSLCrossEntropyLoss"]


class WSLCrossEntropyLoss(_Loss):
    """Cross-entropy of ``input["logits"]`` (a dict output) or of a ``(B, K)`` logits tensor against image labels.

    Like :class:`~monai_wsl.losses.MaxMinUncertaintyLoss` it exposes :attr:`terms` (``loss_ce``) for logging, so
    every method trains through the same bundle handlers.
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, input: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = input["logits"] if isinstance(input, Mapping) else input
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError(f"expected logits of shape (B, K) (or a dict with 'logits'), got {type(logits).__name__}.")
        y = as_class_labels(target, logits.shape[1], logits.shape[0]).to(logits.device)
        loss = F.cross_entropy(logits.float(), y, reduction=self.reduction)
        self.terms = {"loss_ce": loss.detach().mean()}
        return loss
