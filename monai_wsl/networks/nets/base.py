"""What every monai_wsl network shares: input checks and the three output modes."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["WSLNetBase", "OUTPUTS"]

#: ``dict``: every training output; ``mask``: ``(B, 2, *spatial)`` ``[1 - M, M]`` for inference, MONAI Label and
#: ``verify_net_in_out``; ``logits``: ``(B, K)`` class logits (e.g. for ``monai.visualize.GradCAM``).
OUTPUTS = ("dict", "mask", "logits")


class WSLNetBase(nn.Module):
    """Base of the weakly-supervised networks: one image in, class logits and a pixel map in [0, 1] out.

    Subclasses implement ``forward`` and return, by ``self.output``, the dict, the mask tensor or the logits.
    Switching ``output`` does not change the parameters, so the state dict keys are the same in every mode.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, output: str) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (e.g. benign / malignant), got {num_classes}.")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.output = output

    @property
    def output(self) -> str:
        return self._output

    @output.setter
    def output(self, value: str) -> None:
        if value not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {value!r}.")
        self._output = value

    @property
    def min_spatial_size(self) -> int:
        """Smallest side an input may have: one output stride of the encoder(s) at every resolution seen."""
        return math.ceil(self.encoder.output_stride / self._smallest_scale)

    _smallest_scale = 1.0

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

    def segment_and_classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference in one call, whatever ``output`` is: ``{"mask": (B, 1, *spatial) in [0, 1], "logits": (B, K)}``.

        Cheaper than ``output="dict"``: only the passes needed for the prediction run.
        """
        raise NotImplementedError

    @staticmethod
    def mask_output(mask: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *spatial)`` soft mask -> ``(B, 2, *spatial)`` ``[1 - M, M]`` (background, foreground)."""
        return torch.cat([1 - mask, mask], dim=1)
