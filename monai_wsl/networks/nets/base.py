"""What every monai_wsl network shares: the encoder, input checks, the prediction and the mask-tensor view."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn as nn
from monai.utils import str2bool

from monai_wsl.networks.config import RecordsConfig
from monai_wsl.networks.conversions import set_padding_mode
from monai_wsl.networks.nets.encoders import build_encoder

__all__ = ["WSLNet", "MaskOutput"]


class WSLNet(RecordsConfig, nn.Module):
    """Base of the weakly-supervised networks: an encoder, and heads that give class logits and a pixel map.

    A subclass builds its heads and implements ``forward``, which always returns a dict with at least ``logits``
    ``(B, K)`` and ``mask`` ``(B, 1, *spatial)`` in [0, 1] at the input's size (the map that is scored and segmented
    at 0.5). :meth:`predict` gives those two for inference and :meth:`segment` the map alone; a subclass may make them
    cheaper.

    A network knows its own definition: :meth:`get_config` gives every constructor argument (those of the subclass
    included) as a bundle config, which the model card records beside the trained model, so that evaluation and
    inference build the same network (:func:`monai_wsl.model_card.network_from_card`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: ``K``, at least 2 (e.g. benign / malignant).
        encoder: a name in :data:`~monai_wsl.networks.nets.encoders.ENCODERS` or an ``nn.Module``.
        pretrained: load the offline ImageNet weights (EfficientNet-lite0).
        pretrained_path: a local encoder state dict to load (e.g. ImageNet ResNet-18 from torchvision).
        padding_mode: how the encoder pads the image's borders: ``"zeros"`` (as built) or ``"replicate"`` (the
            edge repeated; :func:`~monai_wsl.networks.set_padding_mode`). Not in the state dict, so a model must be
            built with the padding it was trained with: the model card records it with the other arguments.
        output_stride: the encoder's, for a named encoder: 32 (as published), 16 or 8 (a finer map; the
            EfficientNet-lite encoders dilate their last stages, keeping the ImageNet weights' receptive fields).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 2,
        encoder: str | nn.Module = "resnet18",
        pretrained: bool | str = False,
        pretrained_path: str | Path | None = None,
        padding_mode: str = "zeros",
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (e.g. benign / malignant), got {num_classes}.")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self._encoder_args = (encoder, spatial_dims, in_channels, str2bool(pretrained), pretrained_path, output_stride)
        self.padding_mode = padding_mode
        self.encoder = set_padding_mode(build_encoder(*self._encoder_args), padding_mode)

    def new_encoder(self) -> nn.Module:
        """Another encoder built as ``self.encoder`` was (same architecture, same initial weights' source)."""
        if isinstance(self._encoder_args[0], nn.Module):
            raise ValueError("a second encoder needs an encoder name: a module cannot be duplicated safely.")
        return set_padding_mode(build_encoder(*self._encoder_args), self.padding_mode)

    #: the smallest factor by which the network resizes its input (the max-min classifier sees ``x`` at 0.8)
    _smallest_scale = 1.0

    @property
    def min_spatial_size(self) -> int:
        """Smallest side an input may have: one output stride of the encoder at every resolution seen."""
        return math.ceil(self.encoder.output_stride / self._smallest_scale)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming what was expected when ``x`` is not ``(B, in_channels, *spatial)``."""
        dims = ", ".join("HWD"[i] for i in range(self.spatial_dims))
        expected = f"(B, {self.in_channels}, {dims})"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected an image tensor {expected}, got {type(x).__name__}.")
        if x.ndim != self.spatial_dims + 2:
            hint = " (a single image? add a batch dimension: x[None])" if x.ndim == self.spatial_dims + 1 else ""
            raise ValueError(
                f"expected a {self.spatial_dims + 2}-d input {expected}, got shape {tuple(x.shape)}{hint}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels {expected}, got {x.shape[1]} (shape {tuple(x.shape)}); "
                "for RGBA drop the alpha channel, for grey images repeat the channel or build the network with "
                "in_channels=1."
            )
        small = [s for s in x.shape[2:] if s < self.min_spatial_size]
        if small:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is too small for this encoder: each side must be at least "
                f"{self.min_spatial_size} (output stride {self.encoder.output_stride}"
                + (f" at scale {self._smallest_scale}" if self._smallest_scale != 1 else "")
                + "); pad or resize the image."
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image tensor, got {x.dtype}; convert with x.float().")

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference: ``{"mask": (B, 1, *spatial) in [0, 1], "logits": (B, K)}``."""
        out = self(x)
        return {"mask": out["mask"], "logits": out["logits"]}

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """The map alone, ``(B, 1, *spatial)`` in [0, 1]: what an exported segmentation model computes."""
        return self.predict(x)["mask"]


def _check_traced_size(x: torch.Tensor, traced: list[int]) -> torch.Tensor:
    size = x.shape[2:]
    if size != traced:
        # str.format, as TorchScript compiles it (not f-strings)
        message = "this TorchScript model was exported (traced) for images of {} pixels and is given {}: resize the "
        message += "images to that size, or export it again with --input_shape for theirs"
        raise ValueError(message.format(traced, size))
    return x


@functools.cache
def _traced_size_guard():
    """:func:`_check_traced_size` compiled by TorchScript (once, when a model is first traced): a traced graph keeps
    the sizes it saw as constants, so the exported model carries this check instead of silently wrong masks."""
    return torch.jit.script(_check_traced_size)


class MaskOutput(nn.Module):
    """A :class:`WSLNet` seen as a segmentation network: ``(B, C, *spatial) -> (B, 2, *spatial)`` ``[1 - M, M]``
    (background, foreground), the tensor that ``verify_net_in_out``, TorchScript export and MONAI Label expect. A
    traced TorchScript export works at the traced size and refuses any other with an error that says so.

    It holds no parameters of its own and its state dict is the wrapped network's, key for key, so a ``model.pt``
    saved in training loads into it as is. :meth:`predict` is the wrapped network's, so the bundle's
    :class:`~monai_wsl.inferers.WSLInferer` still gets the class from the same passes.

    Args:
        network: the trained network.
    """

    def __init__(self, network: WSLNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # ckpt_export --use_trace: the export refuses other sizes with a clear error
            x = _traced_size_guard()(x, [int(s) for s in x.shape[2:]])
        mask = self.network.segment(x)
        return torch.cat([1 - mask, mask], dim=1)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.network.predict(x)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.segment(x)

    @property
    def min_spatial_size(self) -> int:
        return self.network.min_spatial_size

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)
