"""Array transforms that turn the image files users have (grey, RGBA, 16-bit, instance-id masks) into what the
networks expect, or stop with an error that names the file and says how to fix it.

Inputs are channel-first, as after ``LoadImage`` + ``EnsureChannelFirst``: ``(C, spatial_dim_0[, ...])``. For a
PNG/BMP/JPG read by MONAI's PILReader that is ``(C, W, H)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange, Transform
from monai.transforms.utils_pytorch_numpy_unification import repeat
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["EnsureRGB", "BinarizeMask", "filename_of", "intensity_on_tensors"]

logger = logging.getLogger(__name__)

_CHANNELS = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}
_UINT16_MAX = 65535.0


def filename_of(img: object, default: str | None = None) -> str | None:
    """The source file of ``img``: ``img.meta["filename_or_obj"]`` for a MetaTensor, ``img`` itself for a path
    string, else ``default``."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        return str(name) if name else default
    if isinstance(img, str):
        return img
    return default


def intensity_on_tensors(transform: Callable, x: torch.Tensor) -> torch.Tensor:
    """``transform(x)`` as a plain tensor, for a batch of patches that carries no meta data. MONAI's
    ``ScaleIntensityRange`` with both output bounds (the slide path's intensity transform) is computed here by its
    own operations on a plain tensor: the same values to the bit (tests), without a MetaTensor's dispatch on every
    operation. Any other transform is called as it is."""
    t = transform
    if (
        type(t) is ScaleIntensityRange
        and t.a_max != t.a_min
        and t.b_min is not None
        and t.b_max is not None
        and t.b_min <= t.b_max
        and x.dtype == torch.float32
        and t.dtype in (None, np.float32, torch.float32)
    ):
        # MONAI's own operations in its order, so the values are equal to the bit; in place after the first, which
        # makes the one new tensor (half the time of a new tensor per operation on a batch of 512-pixel patches)
        x = convert_to_tensor(x, track_meta=False) - t.a_min
        x.div_(t.a_max - t.a_min).mul_(t.b_max - t.b_min).add_(t.b_min)
        return x.clamp_(t.b_min, t.b_max) if t.clip else x
    return convert_to_tensor(transform(x), track_meta=False)


class EnsureRGB(Transform):
    """Make a channel-first image 3-channel RGB in ``[0, 255]``, or raise an error saying how to fix the file.

    - 3 channels (RGB) with values in ``[0, 255]`` pass unchanged.
    - 1 channel (grey) is repeated to 3; 2 channels (grey + alpha) keep the grey one, repeated to 3; 4 channels
      (RGBA) drop alpha. Only with ``mode="convert"``; ``mode="error"`` raises ``ValueError``.
    - Values above 255 (16-bit files) are rescaled by ``255 / 65535`` to float32 in ``[0, 255]`` with
      ``mode="convert"``; ``mode="error"`` raises. Values above 65535 always raise.
    - Any other channel count raises.

    With ``mode="convert"`` a warning is logged once per converted file.

    Args:
        mode: ``"convert"`` (default) or ``"error"``.

    Example::

        EnsureRGB()(torch.zeros(1, 64, 48)).shape  # (3, 64, 48)

    Shapes: ``(C, spatial_dim_0[, ...])`` -> ``(3, spatial_dim_0[, ...])``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    modes = ("convert", "error")

    def __init__(self, mode: str = "convert", fix_hint: str | None = None) -> None:
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}.")
        self.mode = mode
        self.fix_hint = fix_hint or "EnsureRGB(mode='convert')"
        self._warned: set[str] = set()

    def __call__(self, img: NdarrayOrTensor, filename: str | None = None) -> NdarrayOrTensor:
        """``img``: ``(C, spatial_dim_0[, ...])``; ``filename`` names the file in messages (default: from meta)."""
        name = filename or filename_of(img, "(no file name in meta)")
        channels = int(img.shape[0]) if img.ndim >= 2 else 0
        what = _CHANNELS.get(channels)
        if what is None:
            raise ValueError(
                f"image {name} has shape {tuple(img.shape)}: expected channel-first (C, ...) with 3 channels (RGB), "
                "or 1, 2 or 4 to convert; run EnsureChannelFirstd first or convert the file to RGB."
            )
        peak = float(img.max()) if min(img.shape) > 0 else 0.0
        if peak > _UINT16_MAX:
            raise ValueError(f"image {name} has values up to {peak:g}; expected [0, 255] (8-bit) or [0, 65535].")
        changes = []
        if channels != 3:
            changes.append(f"has {channels} channel{'s' * (channels > 1)} ({what}); expected 3 (RGB)")
        if peak > 255:
            changes.append(f"has values up to {peak:g} (16-bit); expected [0, 255]")
        if not changes:
            return img
        if self.mode == "error":
            raise ValueError(f"image {name} {' and '.join(changes)}: convert the file or use {self.fix_hint}.")
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("image %s %s: converting it (EnsureRGB mode='convert').", name, " and ".join(changes))
        out = img
        if channels in (1, 2):
            out = repeat(out[:1], 3, axis=0)
        elif channels == 4:
            out = out[:3]
        if peak > 255:
            out, *_ = convert_to_dst_type(out * (255.0 / _UINT16_MAX), img, dtype=torch.float32)
        return out


class BinarizeMask(Transform):
    """Turn a channel-first mask into a 1-channel float32 ``{0, 1}`` mask: any value ``> 0`` is foreground.

    Handles GlaS instance-id masks (0 = background, 1..n = glands) and binary 0/255 masks alike. A multi-channel
    mask (saved as RGB) is reduced with the max over channels; with ``ignore_alpha=True`` (default) the last
    channel of a 2- or 4-channel mask (grey + alpha, RGBA) is taken as alpha and ignored, since an opaque alpha
    channel would otherwise mark every pixel as foreground.

    Shapes: ``(C, spatial_dim_0[, ...])`` -> ``(1, spatial_dim_0[, ...])``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, ignore_alpha: bool = True) -> None:
        self.ignore_alpha = ignore_alpha

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``img``: ``(C, spatial_dim_0[, ...])``, channel-first."""
        if img.ndim < 2:
            raise ValueError(f"mask {filename_of(img, '')} has shape {tuple(img.shape)}; expected (C, ...).")
        if self.ignore_alpha and img.shape[0] in (2, 4):
            img = img[:-1]
        foreground = (img > 0).any(0)[None]  # max over channels > 0
        if isinstance(foreground, np.ndarray):
            return foreground.astype(np.float32)
        return foreground.to(torch.float32)
