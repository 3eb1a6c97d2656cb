"""Inference that yields both outputs of a weakly-supervised network, the mask and the class: the network's own
prediction, or the Grad-CAM / Grad-CAM++ map of a trained CAM classifier."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, str2bool

from monai_wsl.inferers.backends import OnnxNetwork
from monai_wsl.networks.conversions import unwrap
from monai_wsl.networks.nets.base import MaskOutput
from monai_wsl.networks.utils import as_plain_tensor, normalized_map, spatial_flips, upsample
from monai_wsl.transforms.augment import ResizeShortSide

__all__ = ["WSLInferer", "GradCAMInferer", "CAM_METHODS"]

CAM_METHODS = ("gradcam", "gradcampp")


class WSLInferer(Inferer):
    """Runs ``network.predict(inputs)``: ``{"mask": (B, 1, *spatial), "logits": (B, K)}``, with only the passes the
    prediction needs (for max-min: no background pass).

    Works for every :class:`~monai_wsl.networks.nets.base.WSLNet`, for the :class:`~monai_wsl.networks.MaskOutput`
    view that ``inference.json`` and MONAI Label load, and through DDP / DataParallel wrappers. Follow it with
    :class:`~monai_wsl.transforms.SplitPredictiond` in the postprocessing.

    Args:
        short_side: ``None`` runs the network on the images as they are. A number resizes each image so that its
            shortest side has that many pixels (:class:`~monai_wsl.transforms.ResizeShortSide`, as the training
            augmentation does before its crops) and brings the mask back to the image's size (bilinear), so that
            the network sees tissue at the scale it was trained on.
        flips: average the mask over every flip of the spatial axes (4 in 2D, 8 in 3D; each flipped back), which
            the encoder's asymmetric padding and stride-2 grid do not give by themselves. Each flip's mask is the
            network's own for that flip (for the CAM baselines, the map of that flip's predicted class); the logits
            come from the image as it is.
    """

    def __init__(self, short_side: int | None = None, flips: bool | str = False) -> None:
        super().__init__()
        if short_side is not None and int(short_side) < 1:
            raise ValueError(f"short_side must be None or a positive number of pixels, got {short_side}.")
        self.short_side = None if short_side is None else int(short_side)
        self.flips = str2bool(flips)  # "false" from the command line is False

    def _predict(self, net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(net.predict(x))
        if self.flips:
            masks = [out["mask"]] + [net.segment(x.flip(d)).flip(d) for d in spatial_flips(x.ndim - 2)[1:]]
            out["mask"] = torch.stack(masks).mean(0)
        return out

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        net = unwrap(network)
        if not hasattr(net, "predict"):
            raise ValueError(
                f"WSLInferer needs a monai_wsl network with predict(), got {type(net).__name__}; use "
                "monai.inferers.SimpleInferer for other networks."
            )
        if self.short_side is None or min(inputs.shape[2:]) == self.short_side:
            return self._predict(net, inputs)
        resize = ResizeShortSide(self.short_side)
        out = self._predict(net, torch.stack([as_plain_tensor(resize(as_plain_tensor(x))) for x in inputs]))
        # back at the images' size, with their meta data (as the network's own outputs of them carry)
        out["mask"] = convert_to_dst_type(upsample(out["mask"], inputs.shape[2:]), inputs)[0]
        return out


class GradCAMInferer(Inferer):
    """The Grad-CAM (Selvaraju et al., ICCV 2017) or Grad-CAM++ (Chattopadhyay et al., WACV 2018) map of a trained
    :class:`~monai_wsl.networks.CAMClassifier`, and its class: ``{"mask": (B, 1, *spatial), "logits": (B, K)}``.

    The map is taken at the encoder's output (the feature map the head sees) for each image's predicted class, with
    the formulas of ``monai.visualize.GradCAM`` / ``GradCAMpp``, then upsampled and min-max normalised per image like
    every method's map (segmented at 0.5). Only the head is differentiated (``torch.autograd.grad`` with respect to
    the features), so it runs under ``torch.no_grad()`` / ``inference_mode`` as in the evaluators, and leaves the
    network's parameters, their ``.grad``, its train / eval modes and hooks as they were. Each image's gradient is
    that of its own score (a batch may mix predicted classes). Grad-CAM++'s ``exp(score)`` factor is left out: it is
    a positive factor per image, removed by the normalisation, that overflows float32 for a logit above about 88.

    Args:
        cam_method: ``"gradcam"`` or ``"gradcampp"``.
    """

    def __init__(self, cam_method: str = "gradcam") -> None:
        super().__init__()
        if cam_method not in CAM_METHODS:
            raise ValueError(f"cam_method must be one of {CAM_METHODS}, got {cam_method!r}.")
        self.cam_method = cam_method

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        net = unwrap(network)
        if isinstance(net, OnnxNetwork):  # Grad-CAM differentiates the network: PyTorch's, whatever the backend
            net = net.network
        if isinstance(net, MaskOutput):  # inference.json's view of the network
            net = net.network
        if not (hasattr(net, "encoder") and hasattr(net, "head")):
            raise ValueError(f"GradCAMInferer needs a CAMClassifier (encoder + head), got {type(net).__name__}.")
        net.check_input(inputs)
        features = net.encoder(inputs)
        with torch.inference_mode(False), torch.enable_grad():
            # A copy: tensors made under torch.inference_mode() cannot enter an autograd graph.
            acti = features.detach().clone().requires_grad_(True)
            logits, _ = net.head(acti)
            score = logits.gather(1, logits.argmax(1, keepdim=True))
            (grad,) = torch.autograd.grad(score.sum(), acti)
        acti = acti.detach()
        b, c = grad.shape[:2]
        spatial = [1] * (grad.ndim - 2)
        if self.cam_method == "gradcam":
            weights = grad.view(b, c, -1).mean(2).view(b, c, *spatial)
        else:
            alpha_nr = grad.pow(2)
            alpha_dr = alpha_nr.mul(2) + acti.mul(grad.pow(3)).view(b, c, -1).sum(-1).view(b, c, *spatial)
            alpha = alpha_nr.div(torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr)) + 1e-7)
            weights = (alpha * F.relu(grad)).view(b, c, -1).sum(-1).view(b, c, *spatial)
        cam = F.relu((weights * acti).sum(1, keepdim=True))
        return {"mask": normalized_map(cam, inputs.shape[2:]), "logits": logits.detach()}
