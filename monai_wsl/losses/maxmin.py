"""The max-min uncertainty loss: classify the masked image, be uncertain on its complement, keep the mask balanced."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.utils import LossReduction, convert_to_tensor, str2bool
from torch.nn.modules.loss import _Loss

from monai_wsl.losses.barrier import ExtendedLogBarrier
from monai_wsl.losses.uniformity import MODES, uniformity

__all__ = ["MaxMinUncertaintyLoss", "MaxMinLoss", "as_class_labels"]


def as_class_labels(target: torch.Tensor, num_classes: int, batch_size: int) -> torch.Tensor:
    """Image-level labels ``(B,)`` or ``(B, 1)`` (integer-valued) -> ``(B,)`` long, checked to lie in
    ``[0, num_classes)``."""
    target = convert_to_tensor(target, track_meta=False, wrap_sequence=True)
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 1 or target.shape[0] != batch_size:
        raise ValueError(
            f"expected image-level labels of shape ({batch_size},) or ({batch_size}, 1), got {tuple(target.shape)}."
        )
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError(f"labels must be class indices, got non-integer values {target.tolist()}.")
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(f"labels must lie in [0, {num_classes}), got {target[bad].tolist()}.")
    return target.long()


class MaxMinUncertaintyLoss(_Loss):
    """Total loss of the max-min uncertainty method (Belharbi et al., IEEE TMI 2022)::

        L = CE(s, y) + CE(p+, y) + lambda_bg * R(p-) + (1/B) sum_i [psi_t(-S+_i) + psi_t(-S-_i)]

    ``s``: localizer scores, ``p+`` / ``p-``: classifier logits on ``x * M`` / ``x * (1 - M)``, ``R``: SEM or EEM
    uniformity (:func:`~monai_wsl.losses.uniformity.uniformity`), ``psi_t``: extended log-barrier on the mask's
    foreground / background sizes ``S+ = sum M`` and ``S- = sum (1 - M)`` in pixels (the absolute size constraint,
    ASC). Every term is computed in float32, so the loss is finite under fp16/bf16 autocast.

    After each call, :attr:`terms` holds the detached terms (``loss_ce_loc``, ``loss_ce_fg``, ``loss_bg``,
    ``loss_size``; a switched-off term is zero) whose sum is the returned total.

    Ablations: ``lambda_bg=0`` (or ``bg_term=None``) and ``size_constraint=False`` gives "FG" (the two CE terms);
    add ``bg_term`` for "FG+BG"; add ``size_constraint`` for "FG+BG+ASC", the full method.

    Args:
        lambda_bg: weight of the background uncertainty term (1e-7 in the published GlaS recipe).
        bg_term: ``"sem"``, ``"eem"`` or ``None`` (no background term).
        size_constraint: add the log-barrier size terms.
        min_foreground: with ``size_constraint``, a third barrier term ``psi_t(min_foreground - S+ / N)`` (``N``: the
            image's pixels) that holds each mask above this fraction of its image; 0 (the paper's recipe): none. Not
            in the paper: a candidate of the mask-quality study (docs/results.md, table J) that made the masks too
            large (a barrier pushes inside its feasible set too: at 0.25 the benign masks took 55 to 74 % of the
            image, the glands 39 %), so it stays off.
        t: initial log-barrier ``t`` (a buffer of :attr:`barrier`, so it is saved with the loss's state).
        reduction: ``"mean"`` (the paper) or ``"sum"`` over the batch, or ``"none"`` for per-image totals.

    Example::

        loss_fn = MaxMinUncertaintyLoss()
        loss = loss_fn(net(images), labels)   # net: MaxMinUncertaintyNet
        loss_fn.terms["loss_size"]
    """

    KEYS = ("logits", "logits_bg", "logits_loc", "mask")

    def __init__(
        self,
        lambda_bg: float = 1e-7,
        bg_term: str | None = "sem",
        size_constraint: bool | str = True,
        t: float = 5.0,
        min_foreground: float = 0.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if bg_term is not None and bg_term not in MODES:
            raise ValueError(f"bg_term must be one of {MODES} or None, got {bg_term!r}.")
        if lambda_bg < 0:
            raise ValueError(f"lambda_bg must be >= 0, got {lambda_bg}.")
        self.lambda_bg, self.bg_term, self.size_constraint = lambda_bg, bg_term, str2bool(size_constraint)
        if not 0.0 <= min_foreground < 1.0:
            raise ValueError(f"min_foreground must be a fraction of the image in [0, 1), got {min_foreground}.")
        self.min_foreground = float(min_foreground)
        self.barrier = ExtendedLogBarrier(t)
        self.terms: dict[str, torch.Tensor] = {}

    @property
    def t(self) -> float:
        return float(self.barrier.t)

    def forward(self, input: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: the network's output (keys ``logits``, ``logits_bg``, ``logits_loc``, ``mask``).
            target: image-level labels ``(B,)`` or ``(B, 1)``.
        """
        if not isinstance(input, Mapping) or any(k not in input for k in self.KEYS):
            got = sorted(input) if isinstance(input, Mapping) else type(input).__name__
            raise ValueError(f"expected the network's dict output with keys {self.KEYS}, got {got}.")
        # Plain tensors: a MetaTensor batch's per-image meta data would not survive the flattening below.
        logits, mask = (convert_to_tensor(x, track_meta=False) for x in (input["logits"], input["mask"]))
        if logits.ndim != 2:
            raise ValueError(f"expected logits of shape (B, K), got {tuple(logits.shape)}.")
        batch, num_classes = logits.shape
        if mask.shape[0] != batch or mask.shape[1] != 1:
            raise ValueError(f"expected a mask of shape ({batch}, 1, *spatial), got {tuple(mask.shape)}.")
        y = as_class_labels(target, num_classes, batch).to(logits.device)

        terms = {
            "loss_ce_loc": F.cross_entropy(input["logits_loc"].float(), y, reduction="none"),
            "loss_ce_fg": F.cross_entropy(logits.float(), y, reduction="none"),
        }
        # Switched-off terms stay in `terms` as zeros so that logs keep the same keys across ablations.
        terms["loss_bg"] = terms["loss_ce_fg"].new_zeros(batch)
        if self.bg_term is not None and self.lambda_bg > 0:
            terms["loss_bg"] = self.lambda_bg * uniformity(input["logits_bg"], self.bg_term)
        terms["loss_size"] = terms["loss_bg"].new_zeros(batch)
        if self.size_constraint:
            # Pixel counts in float32: an fp16 sum of a 416 x 416 mask overflows.
            fg = mask.float().flatten(1).sum(1)
            bg = mask[0].numel() - fg
            terms["loss_size"] = self.barrier(-fg) + self.barrier(-bg)
            if self.min_foreground > 0:
                terms["loss_size"] = terms["loss_size"] + self.barrier(self.min_foreground - fg / mask[0].numel())

        per_image = torch.stack(list(terms.values())).sum(0)
        if self.reduction == LossReduction.MEAN.value:
            reduce = torch.mean
        elif self.reduction == LossReduction.SUM.value:
            reduce = torch.sum
        else:
            reduce = None
        self.terms = {k: (reduce(v) if reduce else v).detach() for k, v in terms.items()}
        return reduce(per_image) if reduce else per_image


MaxMinLoss = MaxMinUncertaintyLoss
