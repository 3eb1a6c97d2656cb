"""The recipe's geometry and colour transforms that MONAI lacks: resize by the short side, and colour jitter with
torchvision's semantics (without depending on torchvision)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Resize, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

__all__ = [
    "ResizeShortSide",
    "ResizeShortSided",
    "ResizeShortSideD",
    "ResizeShortSideDict",
    "RandColorJitterd",
    "RandColorJitterD",
    "RandColorJitterDict",
    "rgb_to_hsv",
    "hsv_to_rgb",
]


class ResizeShortSide(Transform):
    """Resize a channel-first image ``(C, *spatial)`` so that its shortest spatial side equals ``size``, keeping the
    aspect ratio (the recipe's "short side 432" before a random 416 crop). Images smaller than ``size`` are enlarged.
    Shrinking smooths first (MONAI's anti-aliasing) except for label maps.

    Args:
        size: target length of the shortest side.
        mode: interpolation (``"bilinear"`` for images, ``"nearest"`` for masks).
    """

    def __init__(self, size: int, mode: str = "bilinear") -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}.")
        self.size, self.mode = int(size), mode

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        spatial = img.shape[1:]
        scale = self.size / min(spatial)
        target = [max(self.size, int(round(s * scale))) for s in spatial]
        # Masks (nearest) must stay label maps: no corner alignment to choose, no smoothing before shrinking.
        exact = self.mode in ("nearest", "nearest-exact", "area")
        resize = Resize(
            target, mode=self.mode, align_corners=None if exact else False, anti_aliasing=scale < 1 and not exact
        )
        return resize(img)


class ResizeShortSided(MapTransform):
    """Dictionary version of :class:`ResizeShortSide`.

    Args:
        keys: keys to resize (all with the same spatial size, e.g. image and mask).
        size: target length of the shortest side.
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` for masks).
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int,
        mode: Sequence[str] | str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizers = [ResizeShortSide(size, m) for m in ensure_tuple_rep(mode, len(self.keys))]
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, resize in self.key_iterator(d, self.resizers):
            d[key] = resize(d[key])
        return d


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(3, ...)`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the circle)."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = (
        torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
        / 6.0
    )
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(0)
    i = torch.floor(h * 6) % 6
    f = h * 6 - torch.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(hsv)
    for k, (rr, gg, bb) in enumerate(table):
        sel = i == k
        out[0] = torch.where(sel, rr, out[0])
        out[1] = torch.where(sel, gg, out[1])
        out[2] = torch.where(sel, bb, out[2])
    return out


def _grey(img: torch.Tensor) -> torch.Tensor:
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


class RandColorJitterd(RandomizableTransform, MapTransform):
    """Random brightness, contrast, saturation and hue, applied in a random order, as torchvision's
    ``ColorJitter(brightness, contrast, saturation, hue)`` (the recipe: 0.5, 0.5, 0.5, 0.05).

    Works on RGB images ``(3, *spatial)`` with values in [0, 1]; the result is clipped to [0, 1].

    Args:
        keys: image keys.
        brightness, contrast, saturation: factors drawn from ``[max(0, 1 - v), 1 + v]``.
        hue: shift drawn from ``[-hue, hue]`` (fraction of the hue circle, at most 0.5).
        prob: probability of jittering an image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.05,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError("brightness, contrast and saturation must be >= 0 and hue in [0, 0.5].")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self._order: np.ndarray = np.arange(4)
        self._factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._order = self.R.permutation(4)

        def factor(v: float) -> float:
            return float(self.R.uniform(max(0.0, 1 - v), 1 + v)) if v > 0 else 1.0

        self._factors = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
            float(self.R.uniform(-self.hue, self.hue)) if self.hue > 0 else 0.0,
        )

    def jitter(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 3:
            raise ValueError(f"RandColorJitterd expects RGB images (3, ...), got shape {tuple(img.shape)}.")
        b, c, s, h = self._factors
        out = img
        for op in self._order:
            if op == 0 and b != 1:
                out = (out * b).clamp(0, 1)
            elif op == 1 and c != 1:
                out = (c * out + (1 - c) * _grey(out).mean()).clamp(0, 1)
            elif op == 2 and s != 1:
                out = (s * out + (1 - s) * _grey(out)).clamp(0, 1)
            elif op == 3 and h != 0:
                hsv = rgb_to_hsv(out)
                hsv[0] = (hsv[0] + h) % 1.0
                out = hsv_to_rgb(hsv).clamp(0, 1)
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            jittered = self.jitter(convert_to_tensor(d[key], dtype=torch.float32, track_meta=False))
            d[key] = convert_to_dst_type(jittered, dst=d[key], dtype=torch.float32)[0]  # keeps the meta data
        return d


ResizeShortSideD = ResizeShortSideDict = ResizeShortSided
RandColorJitterD = RandColorJitterDict = RandColorJitterd
