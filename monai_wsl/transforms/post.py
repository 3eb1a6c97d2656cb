"""Postprocessing of the networks' dict predictions, for evaluators, inference and MONAI Label."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["SplitPredictiond", "SplitPredictionD", "SplitPredictionDict"]


class SplitPredictiond(MapTransform):
    """Split a per-image dict prediction ``{"mask": (1, *spatial), "logits": (K,)}`` (from
    :class:`~monai_wsl.inferers.WSLInferer` or a network's forward, after decollation) into plain entries:
    ``mask_key`` <- the soft mask, ``logits_key`` <- the logits, ``prob_key`` <- their softmax.

    With ``mask_key`` equal to the input key, the dict is replaced by the mask (what ``SaveImaged``, MONAI Label and
    the metrics expect). A prediction that is already a tensor (from :class:`~monai_wsl.networks.MaskOutput` or its
    TorchScript export, ``(2, *spatial)`` ``[1 - M, M]``) gives its foreground channel and no logits.

    Args:
        keys: key(s) of the dict prediction, usually ``"pred"``.
        mask_key: where to put the soft mask ``(1, *spatial)``.
        logits_key: where to put the logits ``(K,)``; ``None`` drops them.
        prob_key: where to put the class probabilities ``(K,)``; ``None`` drops them.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        mask_key: str = "pred",
        logits_key: str | None = "logits",
        prob_key: str | None = "prob",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.logits_key, self.prob_key = mask_key, logits_key, prob_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if isinstance(pred, torch.Tensor):
                if pred.shape[0] == 2:
                    pred = {"mask": pred[1:]}
                elif pred.shape[0] == 1:
                    pred = {"mask": pred}
                else:
                    raise ValueError(f"expected a (1 or 2, *spatial) mask prediction, got {tuple(pred.shape)}.")
            if not isinstance(pred, Mapping) or "mask" not in pred:
                got = sorted(pred) if isinstance(pred, Mapping) else type(pred).__name__
                raise ValueError(f"{key!r} must be a dict prediction with 'mask' (and 'logits'), got {got}.")
            d[self.mask_key] = pred["mask"]
            logits = pred.get("logits")
            if logits is not None and self.logits_key:
                d[self.logits_key] = logits
            if logits is not None and self.prob_key:
                d[self.prob_key] = torch.softmax(logits.float(), dim=-1)
        return d


SplitPredictionD = SplitPredictionDict = SplitPredictiond
