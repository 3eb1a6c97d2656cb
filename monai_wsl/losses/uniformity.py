"""Uncertainty terms that are minimal when the class posterior is uniform (the "max" of max-min)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["UniformityLoss", "uniformity", "MODES"]

MODES = ("sem", "eem")
_LN2 = math.log(2.0)


def uniformity(logits: torch.Tensor, mode: str = "sem") -> torch.Tensor:
    """Per-sample uniformity penalty of ``(B, K)`` logits, in bits, computed from ``log_softmax`` in float32.

    - ``"sem"``: cross-entropy from the uniform distribution, ``mean_k(-log2 p_k)``; minimum ``log2 K``.
    - ``"eem"``: negative entropy, ``sum_k p_k log2 p_k``; minimum ``-log2 K``.

    Both are minimal at the uniform posterior and finite for saturated logits (e.g. +-1e4), where ``log(softmax)``
    would give ``-inf``.

    Returns:
        ``(B,)``.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, K), got {tuple(logits.shape)}.")
    log_p = F.log_softmax(logits.float(), dim=1)
    if mode == "sem":
        return -log_p.mean(1) / _LN2
    if mode == "eem":
        return (log_p.exp() * log_p).sum(1) / _LN2
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


class UniformityLoss(_Loss):
    """Pushes a classifier towards maximal uncertainty (a uniform posterior), in bits.

    Used on the background image ``x * (1 - M)`` of the max-min method: what the mask leaves out should carry no
    class evidence. ``mode="sem"`` is the cross-entropy from the uniform distribution, ``"eem"`` the negative
    entropy (see :func:`uniformity`).

    Args:
        mode: ``"sem"`` or ``"eem"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.

    Example::

        loss = UniformityLoss("sem")(torch.zeros(4, 2))  # 1 bit: log2(2)
    """

    def __init__(self, mode: str = "sem", reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` logits -> scalar (or ``(B,)`` with ``reduction="none"``)."""
        per_sample = uniformity(input, self.mode)
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
