"""Inference that yields both outputs of a weakly-supervised network: the mask and the class."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer

__all__ = ["WSLInferer"]


class WSLInferer(Inferer):
    """Runs ``network.segment_and_classify(inputs)`` and returns ``{"mask": (B, 1, *spatial), "logits": (B, K)}``.

    The network itself may be configured with ``output="mask"`` (as ``verify_net_in_out``, TorchScript export and
    MONAI Label's checkpoint loading need); this inferer still gets the class, from the same forward passes.
    DDP / DataParallel wrappers are looked through. Follow it with
    :class:`~monai_wsl.transforms.SplitPredictiond` in the postprocessing.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        net = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
        if not hasattr(net, "segment_and_classify"):
            raise ValueError(
                f"WSLInferer needs a monai_wsl network with segment_and_classify(), got {type(net).__name__}; "
                "use monai.inferers.SimpleInferer for other networks."
            )
        return net.segment_and_classify(inputs)
