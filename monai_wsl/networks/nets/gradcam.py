"""Grad-CAM and Grad-CAM++ maps of a CAM classifier, computed by ``monai.visualize``: the gradient-based baselines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from monai.visualize import GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import ModelWithHooks

from monai_wsl.networks.nets.cam import CAMClassifier, class_map_of
from monai_wsl.networks.utils import normalized_map

__all__ = ["GradCAMClassifier", "GradCAMNet", "gradcamnet", "CAM_METHODS"]

#: ``monai.visualize`` class of each ``cam_method``.
CAM_METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMpp}


class _Logits(nn.Module):
    """A view of a CAM classifier that returns only its logits ``(B, K)``: what ``monai.visualize`` needs.

    Made afresh for each map (never stored on the classifier, so the classifier's state dict is unchanged).
    """

    def __init__(self, net: CAMClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.encoder(x))[0]


class _Hooks(ModelWithHooks):
    """``monai.visualize``'s ``ModelWithHooks`` with four fixes for use inside a network's forward:

    - hooks are removable (MONAI's stay on the module for good, so a new map would add hooks at every call and
      every later training forward would keep the activations alive);
    - the class score is taken per image (``logits[:, class_idx]`` with a ``(B,)`` index is ``(B, B)``: with a
      batch whose images predict different classes every image's gradient would mix the classes), shaped
      ``(B, 1, *[1] * spatial_dims)`` so that GradCAM++'s ``exp(score) * grad`` broadcasts per image (a ``(B,)``
      score broadcasts against the last spatial axis instead);
    - the ``inplace`` flag MONAI switches off on the target layer is put back afterwards;
    - GradCAM++ scales each image's map by ``exp(score)``, a positive per-image factor that the per-image min-max
      normalisation removes anyway but that overflows for a logit above ~88 (float32) and turns the map into NaN:
      the score it reads is set to 0 after the backward pass (factor 1).
    """

    def __init__(self, nn_module: nn.Module, target_layer: str, spatial_dims: int) -> None:
        super().__init__(nn_module, target_layer, register_forward=False, register_backward=False)
        self.register_forward = self.register_backward = True
        self.spatial_dims = spatial_dims
        module = nn_module.get_submodule(target_layer)
        self._inplace = module.__dict__.get("inplace")
        if self._inplace:  # a full backward hook on an in-place module fails
            module.__dict__["inplace"] = False
        self._module = module
        self._handles = [
            module.register_forward_hook(self.forward_hook(target_layer)),
            module.register_full_backward_hook(self.backward_hook(target_layer)),
        ]

    def class_score(self, logits: torch.Tensor, class_idx: int | torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1).expand(logits.shape[0])
        return logits.gather(1, index[:, None]).view(-1, 1, *([1] * self.spatial_dims))

    def __call__(self, x, class_idx=None, retain_graph=False, **kwargs):
        out = super().__call__(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        self.score = torch.zeros_like(self.score.detach())  # read only by GradCAMpp, as exp(score)
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._inplace:
            self._module.__dict__["inplace"] = True
        self.activations.clear()
        self.gradients.clear()


class GradCAMClassifier(CAMClassifier):
    """A CAM classifier whose map is the Grad-CAM (Selvaraju et al., ICCV 2017) or Grad-CAM++ (Chattopadhyay et al.,
    WACV 2018) map of the predicted class, computed with ``monai.visualize.GradCAM`` / ``GradCAMpp``.

    Same parameters and state dict as :class:`~monai_wsl.networks.nets.cam.CAMClassifier` (train a plain CAM
    classifier, or this one: the logits and the loss are the same; a checkpoint of either loads strictly into the
    other). Only the map differs: MONAI's Grad-CAM of ``target_layer`` for the class of the returned logits' argmax,
    without MONAI's default post-processing (which flips the values), then upsampled and min-max normalised per image
    by :func:`~monai_wsl.networks.utils.normalized_map` like every other method's map (segmented at 0.5).

    The map needs one extra forward and backward pass, run in eval mode with gradients switched on locally (so it
    also works under ``torch.no_grad()`` and ``torch.inference_mode()``, as in the evaluation engines). Parameters'
    ``.grad``, ``requires_grad`` and every module's train/eval mode are left as they were. In training mode the dict's
    ``mask`` is the plain CAM (training is classification; the Grad-CAM map would cost a backward pass per step and
    not change the loss). ``torch.jit.trace``
    of ``output="mask"`` or ``"dict"`` fails (the map needs a backward pass); a traced export works for ``"logits"``.

    Args:
        spatial_dims, in_channels, num_classes, encoder, pretrained, pretrained_path, pooling, modalities, kmax, kmin,
            alpha, dropout, lse_r, output: as :class:`~monai_wsl.networks.nets.cam.CAMClassifier`.
        cam_method: ``"gradcam"`` or ``"gradcampp"``.
        target_layer: name (as in ``named_modules()``) of the layer whose activations and gradients give the map.
            Default ``"encoder"``: the encoder's output, i.e. the feature map the head sees, for every encoder
            (``encoder.layer4`` of a ResNet; for EfficientNet-lite0 the last ``_swish`` module is shared with the
            stem and so cannot be a target). The layer must run exactly once per forward pass.

    ``output="dict"`` returns ``logits`` ``(B, K)``, ``mask`` ``(B, 1, *spatial)`` (the normalised Grad-CAM map; the CAM
    in training mode) and
    ``cams`` ``(B, K, *low)`` (the head's class maps, as :class:`CAMClassifier`).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder: str | nn.Module = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | Path | None = None,
        pooling: str = "avg",
        modalities: int = 5,
        kmax: float = 0.3,
        kmin: float = 0.0,
        alpha: float = 0.6,
        dropout: float = 0.1,
        lse_r: float = 10.0,
        output: str = "dict",
        cam_method: str = "gradcam",
        target_layer: str | None = None,
    ) -> None:
        super().__init__(
            spatial_dims,
            in_channels,
            num_classes,
            encoder,
            pretrained,
            pretrained_path,
            pooling,
            modalities,
            kmax,
            kmin,
            alpha,
            dropout,
            lse_r,
            output,
        )
        if cam_method not in CAM_METHODS:
            raise ValueError(f"cam_method must be one of {tuple(CAM_METHODS)}, got {cam_method!r}.")
        target_layer = "encoder" if target_layer is None else target_layer
        names = dict(self.named_modules())
        if target_layer not in names or target_layer == "":
            examples = [n for n in names if n.startswith("encoder")][-3:]
            raise ValueError(
                f"target_layer {target_layer!r} is not a module of this network (e.g. 'encoder', {examples})."
            )
        self.cam_method, self.target_layer = cam_method, target_layer

    def grad_cam(self, x: torch.Tensor, class_idx: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Raw (non-negative, not normalised) Grad-CAM / Grad-CAM++ map ``(B, 1, *low)`` at ``target_layer``'s
        resolution, detached.

        Args:
            x: ``(B, in_channels, *spatial)``.
            class_idx: the class of each image (``(B,)``) or one class for all; ``None``: the predicted class.
        """
        params = list(self.parameters())
        saved_grads = [p.grad for p in params]
        saved_requires = [p.requires_grad for p in params]
        saved_modes = [(m, m.training) for m in self.modules()]
        hooks = _Hooks(_Logits(self), f"net.{self.target_layer}", self.spatial_dims)
        cam = CAM_METHODS[self.cam_method](
            nn_module=hooks,
            target_layers=f"net.{self.target_layer}",
            upsampler=lambda size: lambda m: m,  # normalized_map upsamples, as for every method
            postprocessing=lambda m: m,  # MONAI's default flips the map (max -> 0)
        )
        try:
            with torch.inference_mode(False), torch.enable_grad():
                # Gradients flow from the input, not into the parameters (cheaper, and frozen encoders still work).
                for p in params:
                    p.grad = None
                    p.requires_grad_(False)
                # Clones: tensors made under torch.inference_mode() cannot enter an autograd graph.
                x = x.detach().clone().requires_grad_(True)
                if class_idx is not None and not isinstance(class_idx, int):
                    class_idx = torch.as_tensor(class_idx, device=x.device).clone()
                acti_map = cam(x, class_idx=class_idx)
        finally:
            for p, grad, requires in zip(params, saved_grads, saved_requires):
                p.requires_grad_(requires)
                p.grad = grad
            for module, training in saved_modes:
                module.training = training
            hooks.remove()
        return acti_map.detach()

    def _dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        logits, maps = self.head(self.encoder(x))
        if self.training:
            # Training is plain classification: the CAM stands in for the map, sparing a backward pass per step.
            mask = normalized_map(class_map_of(maps, logits), x.shape[2:])
        else:
            mask = normalized_map(self.grad_cam(x, logits.detach().argmax(1)), x.shape[2:])
        return {"logits": logits, "mask": mask, "cams": maps}


GradCAMNet = gradcamnet = GradCAMClassifier
